"""Sequence and token classification: what LoRA adapts in an encoder, the head trained in full, the loss,
evaluation with the GLUE metrics (entity F1 for tokens), and predictions.

The head (``classifier``; ``score`` for decoder models; and any other module outside the encoder that the
checkpoint lacked, such as DistilBERT's ``pre_classifier`` or ModernBERT's ``head``) is new, so it is trained in
full as ``modules_to_save`` — PEFT's ``SEQ_CLS`` task type does the same for ``classifier`` and ``score`` — and
LoRA adapts the encoder's attention: W_q and W_v by default, the LoRA paper's choice for its GLUE table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters import LoraConfig
from loratune.data import split_eval
from loratune.data.classification import (
    IGNORE,
    LabelSpace,
    TokenizedClassExample,
    check_layout,
    collate_classification,
    label_space,
    read_classification,
    read_token_classification,
    tag_space,
)
from loratune.errors import ConfigError
from loratune.train.evaluate import EvalResult
from loratune.train.generation import model_device
from loratune.train.scores import classification_scores, entity_scores, regression_scores

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


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def classification_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss, what it sums over): cross-entropy over the classes per row, squared error for regression
    (one output), or cross-entropy per labelled sub-token for token classification; in float32."""
    logits = model(**_inputs(batch)).logits.float()
    labels = batch["labels"]
    if labels.ndim == 2:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"), int(
            (labels != IGNORE).sum()
        )
    if labels.dtype.is_floating_point:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum"), labels.shape[0]
    return F.cross_entropy(logits, labels, reduction="sum"), labels.shape[0]


@torch.no_grad()
def classifier_logits(
    model: nn.Module, rows: Sequence[TokenizedClassExample], pad_id: int, batch_size: int = 32
) -> torch.Tensor:
    """The model's outputs (float32, rows × outputs; a token classifier's: one tensor per row) in the order of
    ``rows``, batched by length."""
    if not rows:
        return []
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [None] * len(rows)
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = collate_classification([rows[i] for i in chosen], pad_id)
            logits = model(**{k: v.to(device) for k, v in _inputs(batch).items()}).logits.float().cpu()
            for i, row in zip(chosen, logits):
                out[i] = row[: len(rows[i])] if row.ndim == 2 else row  # a token classifier's: unpadded
    finally:
        model.train(was_training)
    return out if out and out[0].ndim == 2 else torch.stack(out)


def evaluate_classification(
    model: nn.Module, rows: Sequence[TokenizedClassExample], space: LabelSpace, pad_id: int, batch_size: int = 32
) -> EvalResult:
    """Loss (mean over rows; over labelled words for tokens) and the metrics that fit the task (``accuracy``,
    ``macro_f1``, ``mcc``; ``pearson``, ``spearman``, ``mse`` for regression; entity ``precision``, ``recall``,
    ``f1`` and word ``accuracy`` for tokens); perplexity and exact match do not apply (None)."""
    return classification_result(classifier_logits(model, rows, pad_id, batch_size), rows, space)


def classification_result(logits, rows: Sequence[TokenizedClassExample], space: LabelSpace) -> EvalResult:
    """``evaluate_classification``'s result from the model's outputs for ``rows`` (``classifier_logits``)."""
    if space.token:
        gold = torch.cat([torch.tensor(row.label) for row in rows])
        loss = float(F.cross_entropy(torch.cat(logits), gold, ignore_index=IGNORE))
        predicted, expected = [], []
        for row, row_logits in zip(rows, logits):
            kept = [k for k, label in enumerate(row.label) if label != IGNORE]
            predicted.append([space.names[int(row_logits[k].argmax())] for k in kept])
            expected.append([space.names[row.label[k]] for k in kept])
        metrics = entity_scores(predicted, expected)
    elif space.regression:
        gold = torch.tensor([row.label for row in rows], dtype=torch.float32)
        scores = logits.squeeze(-1)
        loss = float(F.mse_loss(scores, gold))
        metrics = regression_scores(scores.tolist(), gold.tolist())
    else:
        gold = torch.tensor([row.label for row in rows], dtype=torch.long)
        loss = float(F.cross_entropy(logits, gold))
        metrics = classification_scores(logits.argmax(-1).tolist(), gold.tolist(), space.num_labels)
    return EvalResult(loss=loss, perplexity=None, n=len(rows), n_tokens=sum(len(r) for r in rows), metrics=metrics)


def predictions(logits, space: LabelSpace, rows: Sequence[TokenizedClassExample] = ()) -> list[dict]:
    """One dict per row: ``label`` and ``probabilities`` (by label name) for classes; ``score`` for regression;
    ``tags`` (one per word, None for words cut off by max_length) for tokens (``rows``: the tokenized rows)."""
    if space.token:
        out = []
        for row, row_logits in zip(rows, logits):
            tags = [None] * row.n_words
            for position, word in row.words:
                tags[word] = space.names[int(row_logits[position].argmax())]
            out.append({"tags": tags})
        return out
    if space.regression:
        return [{"score": float(value)} for value in logits.squeeze(-1)]
    probabilities = logits.softmax(-1)
    return [
        {
            "label": space.names[int(p.argmax())],
            "probabilities": {name: round(float(q), 6) for name, q in zip(space.names, p)},
        }
        for p in probabilities
    ]


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
    "classification_loss_sum",
    "classification_result",
    "classifier_logits",
    "describe_labels",
    "evaluate_classification",
    "head_modules",
    "predictions",
]
