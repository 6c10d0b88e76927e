"""Training a sequence or token classifier: what LoRA adapts in an encoder, the head trained in full, the run's
labels and data (its loss, evaluation and predictions are ``inference.classify``'s).

The head (``classifier``; ``score`` for decoder models; and any other module outside the encoder that the
checkpoint lacked, such as DistilBERT's ``pre_classifier`` or ModernBERT's ``head``) is new, so it is trained in
full as ``modules_to_save`` — PEFT's ``SEQ_CLS`` task type does the same for ``classifier`` and ``score`` — and
LoRA adapts the encoder's attention: W_q and W_v by default, the LoRA paper's choice for its GLUE table.
"""

from __future__ import annotations

from torch import nn

from loratune.adapters import LoraConfig
from loratune.data import split_eval
from loratune.data.classification import (
    LabelSpace,
    check_layout,
    label_space,
    read_classification,
    read_token_classification,
    tag_space,
)
from loratune.errors import ConfigError

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
        "data.retain": config.data.retain is not None,
        "data.packing": config.data.packing,
        "model.quantize": config.model.quantize is not None,
        "train.method: intrinsic": config.train.method == "intrinsic",
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


__all__ = [
    "QUERY_VALUE",
    "TASK_TYPE",
    "check_classifier_config",
    "classification_examples",
    "classification_lora",
    "describe_labels",
    "head_modules",
]
