"""Sequence classification: what LoRA adapts in an encoder, the head trained in full, the loss, evaluation
with the GLUE metrics, and predictions.

The head (``classifier``; DistilBERT's ``pre_classifier`` too; ``score`` for decoder models) is new, so it is
trained in full as ``modules_to_save`` — PEFT's ``SEQ_CLS`` task type does the same — and LoRA adapts the
encoder's attention: W_q and W_v by default, the LoRA paper's choice for its GLUE table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters import LoraConfig
from loratune.data import split_eval
from loratune.data.classification import (
    ClassExample,
    LabelSpace,
    TokenizedClassExample,
    check_layout,
    collate_classification,
    label_space,
    read_classification,
)
from loratune.errors import ConfigError
from loratune.train.evaluate import EvalResult
from loratune.train.generation import model_device
from loratune.train.scores import classification_scores, regression_scores

TASK_TYPE = "SEQ_CLS"  # PEFT's task type for sequence classification
HEAD_MODULES = ("classifier", "pre_classifier", "score")
# the attention query and value projections, by transformers model type (the paper's W_q, W_v)
QUERY_VALUE = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "albert": ["query", "value"], "camembert": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"], "modernbert": ["Wqkv"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
}


def head_modules(model: nn.Module) -> list[str]:
    """The names in ``HEAD_MODULES`` that are direct children of ``model`` (its classification head)."""
    children = dict(model.named_children())
    return [name for name in HEAD_MODULES if name in children]


def classification_lora(lora: LoraConfig, model: nn.Module) -> LoraConfig:
    """``lora`` for a classifier: the head trained in full (added to ``modules_to_save``), PEFT's task type,
    and — unless ``target_modules`` was given — the attention's query and value projections."""
    update = {"modules_to_save": sorted({*(lora.modules_to_save or []), *head_modules(model)}), "task_type": TASK_TYPE}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if "target_modules" not in lora.model_fields_set and model_type in QUERY_VALUE:
        update["target_modules"] = QUERY_VALUE[model_type]
    return lora.model_copy(update=update)


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def classification_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """(summed loss over the batch's rows, rows): cross-entropy over the classes, or squared error for
    regression (one output), computed in float32."""
    logits = model(**_inputs(batch)).logits.float()
    labels = batch["labels"]
    if labels.dtype.is_floating_point:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum"), labels.shape[0]
    return F.cross_entropy(logits, labels, reduction="sum"), labels.shape[0]


@torch.no_grad()
def classifier_logits(model: nn.Module, rows: Sequence[TokenizedClassExample], pad_id: int,
                      batch_size: int = 32) -> torch.Tensor:
    """The model's outputs (float32, rows × outputs) in the order of ``rows``, batched by length."""
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
                out[i] = row
    finally:
        model.train(was_training)
    return torch.stack(out)


def evaluate_classification(model: nn.Module, rows: Sequence[TokenizedClassExample], space: LabelSpace,
                            pad_id: int, batch_size: int = 32) -> EvalResult:
    """Loss (mean over rows) and the GLUE metrics that fit the task (``accuracy``, ``macro_f1``, ``mcc``; or
    ``pearson``, ``spearman``, ``mse``); perplexity and exact match do not apply (None)."""
    logits = classifier_logits(model, rows, pad_id, batch_size)
    if space.regression:
        gold = torch.tensor([row.label for row in rows], dtype=torch.float32)
        scores = logits.squeeze(-1)
        loss = float(F.mse_loss(scores, gold))
        metrics = regression_scores(scores.tolist(), gold.tolist())
    else:
        gold = torch.tensor([row.label for row in rows], dtype=torch.long)
        loss = float(F.cross_entropy(logits, gold))
        metrics = classification_scores(logits.argmax(-1).tolist(), gold.tolist(), space.num_labels)
    return EvalResult(loss=loss, perplexity=None, n=len(rows), n_tokens=sum(len(r) for r in rows), metrics=metrics)


def predictions(logits: torch.Tensor, space: LabelSpace) -> list[dict]:
    """One dict per row: ``label`` and ``probabilities`` (by label name) for classes; ``score`` for regression."""
    if space.regression:
        return [{"score": float(value)} for value in logits.squeeze(-1)]
    probabilities = logits.softmax(-1)
    return [{"label": space.names[int(p.argmax())],
             "probabilities": {name: round(float(q), 6) for name, q in zip(space.names, p)}} for p in probabilities]




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
        raise ConfigError("train.best_metric: eval_exact_match is for language models; use eval_accuracy, "
                          "eval_macro_f1, eval_mcc (or eval_pearson / eval_spearman for regression) or eval_loss")


def classification_examples(config) -> tuple[LabelSpace, list[ClassExample], list[ClassExample]]:
    """(label space, training rows, evaluation rows) of a classification run: ``data.eval`` or a seeded
    ``data.eval_split`` of the training file. Raises ``DataError`` for rows without labels, an evaluation label
    the training data never has, or evaluation rows of the other layout (pairs vs single texts)."""
    d = config.data
    train = read_classification(d.train)
    space = label_space(train)
    if d.eval is not None:
        evaluation = read_classification(d.eval)
        check_layout(space, evaluation, "data.eval")
    elif d.eval_split > 0:
        train, evaluation = split_eval(train, d.eval_split, config.train.seed)
    else:
        evaluation = []
    for example in evaluation:
        space.encode(example)  # an unseen label fails here, naming its row
    if d.eval_max_examples is not None:
        evaluation = evaluation[: d.eval_max_examples]
    return space, train, evaluation


def describe_labels(space: LabelSpace, n_train: int, n_eval: int) -> str:
    """One line for the run log: rows, and the labels or regression."""
    what = "regression (one score)" if space.regression else f"{space.num_labels} labels ({', '.join(space.names[:8])}" \
        + (", …)" if space.num_labels > 8 else ")")
    layout = "text pairs" if space.pair else "texts"
    return f"classification: {n_train} training and {n_eval} eval {layout}; {what}"


__all__ = ["QUERY_VALUE", "TASK_TYPE", "check_classifier_config", "classification_examples", "classification_lora",
           "classification_loss_sum", "classifier_logits", "describe_labels", "evaluate_classification",
           "head_modules", "predictions"]
