"""Training a sequence or token classifier (``task: seq_cls`` / ``token_cls``): what LoRA adapts in an encoder, the
head trained in full, the run's labels and data, and the objective the recipe runs (the loss, evaluation and
predictions themselves are ``inference.classify``'s).

The head (``classifier``; ``score`` for decoder models; and any other module outside the encoder that the
checkpoint lacked, such as DistilBERT's ``pre_classifier`` or ModernBERT's ``head``) is new, so it is trained in
full as ``modules_to_save`` — PEFT's ``SEQ_CLS`` task type does the same for ``classifier`` and ``score`` — and
LoRA adapts the encoder's attention: W_q and W_v by default, the LoRA paper's choice for its GLUE table.
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters import LoraConfig
from loratune.data import split_eval
from loratune.data.classification import (
    IGNORE,
    LabelSpace,
    check_layout,
    collate_classification,
    label_space,
    read_classification,
    read_token_classification,
    tag_space,
    tokenize_classification,
    tokenize_tokens,
)
from loratune.errors import ConfigError
from loratune.inference.classify import classification_loss_sum, classification_result, classifier_logits
from loratune.inference.evaluate import EvalResult
from loratune.inference.forgetting import encoder_representations, representation_drift, retain_texts
from loratune.models import load_classifier
from loratune.train import distributed
from loratune.train.config import resolved_task
from loratune.train.objectives.base import ObjectiveDefaults, RunData

TASK_TYPE = "SEQ_CLS"  # PEFT's task type for sequence classification
TOKEN_TASK_TYPE = "TOKEN_CLS"  # and for token classification
HEAD_MODULES = ("classifier", "score")
# the attention query and value projections, by transformers model type (the paper's W_q, W_v)
QUERY_VALUE = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "camembert": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def head_modules(model: nn.Module) -> list[str]:
    """The direct children of ``model`` that make its new head: those in ``HEAD_MODULES`` and those the
    checkpoint lacked (``new_head_modules``, recorded by ``models.load_classifier``)."""
    children = dict(model.named_children())
    new = getattr(model, "new_head_modules", [])
    return [name for name in children if name in HEAD_MODULES or name in new]


def classification_lora(lora: LoraConfig, model: nn.Module, token: bool = False) -> LoraConfig:
    """``lora`` for a classifier (``token``: a token classifier): the head trained in full (added to
    ``modules_to_save``), PEFT's task type, and — unless ``target_modules`` was given — the attention's query
    and value projections."""
    update = {
        "modules_to_save": sorted({*(lora.modules_to_save or []), *head_modules(model)}),
        "task_type": TOKEN_TASK_TYPE if token else TASK_TYPE,
    }
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if "target_modules" not in lora.model_fields_set and model_type in QUERY_VALUE:
        update["target_modules"] = QUERY_VALUE[model_type]
    return lora.model_copy(update=update)


def check_classifier_config(config) -> None:
    """Raise ``ConfigError`` for options a classification run cannot take."""
    refused = {
        "data.packing": config.data.packing,
        "model.quantize": config.model.quantize is not None,
    }
    for option, given in refused.items():
        if given:
            raise ConfigError(f"{option} does not apply to a classification run (task: seq_cls); remove it")
    if config.train.best_metric == "eval_exact_match":
        raise ConfigError(
            "train.best_metric: eval_exact_match is for language models; use eval_accuracy, "
            "eval_macro_f1, eval_mcc (or eval_pearson / eval_spearman for regression) or eval_loss"
        )


def classification_examples(config, token: bool = False) -> tuple[LabelSpace, list, list]:
    """(label space, training rows, evaluation rows) of a classification run (``token``: token
    classification): ``data.eval`` or a seeded ``data.eval_split`` of the training file. Raises ``DataError``
    for rows without labels, an evaluation label the training data never has, or evaluation rows of the other
    layout (pairs vs single texts)."""
    d = config.data
    read = read_token_classification if token else read_classification
    train = read(d.train)
    space = tag_space(train) if token else label_space(train)
    if d.eval is not None:
        evaluation = read(d.eval)
        if not token:
            check_layout(space, evaluation, "data.eval")
    elif d.eval_split > 0:
        train, evaluation = split_eval(train, d.eval_split, config.train.seed)
    else:
        evaluation = []
    for example in evaluation:  # an unseen label fails here, naming its row
        if token:
            for tag in example.tags:
                space.tag_id(tag, example.location)
        else:
            space.encode(example)
    if d.eval_max_examples is not None:
        evaluation = evaluation[: d.eval_max_examples]
    return space, train, evaluation


def describe_labels(space: LabelSpace, n_train: int, n_eval: int) -> str:
    """One line for the run log: rows, and the labels or regression."""
    what = (
        "regression (one score)"
        if space.regression
        else f"{space.num_labels} labels ({', '.join(space.names[:8])}" + (", …)" if space.num_labels > 8 else ")")
    )
    layout = "tagged sentences" if space.token else "text pairs" if space.pair else "texts"
    return f"classification: {n_train} training and {n_eval} eval {layout}; {what}"


class Classification(ObjectiveDefaults):
    """A classifier learning its rows' labels: cross-entropy over the classes (squared error for regression; per
    labelled word for tokens), evaluated with the GLUE metrics, and once before the first step (the new head's
    chance level, for comparison)."""

    evaluates_at_start = True

    def __init__(self, config):
        check_classifier_config(config)
        self.token = resolved_task(config) == "token_cls"
        self.retain_base: torch.Tensor | None = None  # the base's representations of the retain set
        # the labels decide the head, so the rows are read before the model
        self.space, self.train_rows, self.eval_rows = classification_examples(config, token=self.token)

    def load(self, config, load_hook):
        m = config.model
        return load_classifier(m.name, self.space, m.dtype, m.device, m.trust_remote_code)

    def fit(self, config, model: nn.Module, log):
        """``config`` with the task it runs and the LoRA targets that fit this encoder (``classification_lora``)."""
        lora = classification_lora(config.lora, model, token=self.token)
        update = {"task": "token_cls" if self.token else "seq_cls", "lora": lora}
        if config.train.method == "bitfit":  # the new head trains whole beside the biases, as in BitFit
            modules = sorted({*(config.train.full_modules or []), *head_modules(model)})
            update["train"] = config.train.model_copy(update={"full_modules": modules})
        return config.model_copy(update=update)

    def data(self, config, tokenizer) -> RunData:
        tokenize = tokenize_tokens if self.token else tokenize_classification
        train, evaluation = (
            tokenize(rows, tokenizer, self.space, config.data.max_length) for rows in (self.train_rows, self.eval_rows)
        )
        retain = []
        if config.data.retain is not None:
            retain = tokenize_classification(retain_texts(config.data.retain), tokenizer, None, config.data.max_length)
        return RunData(train, evaluation, [], None, retain, labels=self.space)

    def retain_loss(self, model, retain, pad_id: int, batch_size: int) -> float:
        """How far the encoder's representations of the retain texts moved from the base's (the first call's,
        before training; kept in checkpoints): see ``inference.forgetting``."""
        now = encoder_representations(model, retain, pad_id, batch_size)
        if self.retain_base is None:
            self.retain_base = now
        return representation_drift(now, self.retain_base)

    def state(self) -> dict[str, torch.Tensor]:
        return {} if self.retain_base is None else {"retain_base": self.retain_base}

    def load_state(self, tensors: dict[str, torch.Tensor], device) -> None:
        self.retain_base = tensors.get("retain_base", self.retain_base)

    def collate(self, rows, pad_id: int):
        return collate_classification(rows, pad_id)

    def loss_sum(self, model, batch):
        return classification_loss_sum(model, batch)

    def count(self, batch) -> int:
        """What a micro-batch's loss sums over: its rows, or a token classifier's labelled words."""
        labels = batch["labels"]
        return int((labels != IGNORE).sum()) if labels.ndim == 2 else labels.shape[0]

    def evaluate(self, model, tokenizer, data: RunData, t, processes) -> EvalResult | None:
        """Each process runs every N-th row; rank 0 scores all outputs together (the others get None)."""
        rows = data.eval[processes.rank :: processes.world]
        logits = classifier_logits(model, rows, tokenizer.pad_token_id, t.eval_batch_size)
        parts = distributed.gathered(processes, (list(logits), rows))
        if not processes.main:
            return None
        every = [(logit, row) for part_logits, part_rows in parts for logit, row in zip(part_logits, part_rows)]
        outputs = [logit for logit, _ in every]
        return classification_result(
            outputs if data.labels.token else torch.stack(outputs), [row for _, row in every], data.labels
        )

    def describe(self, data: RunData) -> list[str]:
        return [describe_labels(data.labels, len(data.train), len(data.eval))]


__all__ = [
    "QUERY_VALUE",
    "TASK_TYPE",
    "Classification",
    "check_classifier_config",
    "classification_examples",
    "classification_lora",
    "describe_labels",
    "head_modules",
]
