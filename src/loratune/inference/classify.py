"""A classifier's outputs: its loss (cross-entropy over classes or labelled sub-tokens, squared error for
regression), its logits over rows batched by length, evaluation with the GLUE metrics (entity F1 for tokens), and
predictions by label name."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loratune.data.classification import IGNORE, LabelSpace, TokenizedClassExample, collate_classification
from loratune.inference.evaluate import EvalResult
from loratune.inference.scores import classification_scores, entity_scores, regression_scores
from loratune.models.devices import model_device


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


__all__ = [
    "classification_loss_sum",
    "classification_result",
    "classifier_logits",
    "evaluate_classification",
    "predictions",
]
