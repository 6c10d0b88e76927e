"""The GLUE metrics, as GLUE defines them: accuracy, macro-F1, Matthews correlation (CoLA), Pearson and
Spearman correlation (STS-B); and for token classification, entity-level precision, recall and F1 as seqeval
(CoNLL's conlleval) computes them. Plain functions on label lists; nothing is averaged over batches."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """The share of rows whose predicted class is the gold one."""
    return sum(p == g for p, g in zip(predicted, gold)) / len(gold) if gold else float("nan")


def macro_f1(predicted: Sequence[int], gold: Sequence[int], classes: int) -> float:
    """F1 per class, 2·TP / (2·TP + FP + FN), averaged over the classes that occur in ``gold`` or
    ``predicted`` (scikit-learn's ``f1_score(average="macro")``)."""
    scores = []
    for c in range(classes):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def matthews(predicted: Sequence[int], gold: Sequence[int], classes: int) -> float:
    """The Matthews correlation coefficient, multiclass (Gorodkin's R_K; the binary MCC for two classes);
    0 when either side is constant."""
    n = len(gold)
    correct = sum(p == g for p, g in zip(predicted, gold))
    pred_counts = [sum(p == c for p in predicted) for c in range(classes)]
    gold_counts = [sum(g == c for g in gold) for c in range(classes)]
    cov = correct * n - sum(p * g for p, g in zip(pred_counts, gold_counts))
    denom = math.sqrt(n * n - sum(p * p for p in pred_counts)) * math.sqrt(n * n - sum(g * g for g in gold_counts))
    return cov / denom if denom else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; NaN when either side is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            result[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's correlation: Pearson's on the ranks (ties averaged)."""
    return pearson(ranks(x), ranks(y))


def classification_scores(predicted: Sequence[int], gold: Sequence[int], classes: int) -> dict[str, float]:
    """``accuracy``, ``macro_f1`` and ``mcc`` of class predictions."""
    return {
        "accuracy": accuracy(predicted, gold),
        "macro_f1": macro_f1(predicted, gold, classes),
        "mcc": matthews(predicted, gold, classes),
    }


def regression_scores(predicted: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """``pearson``, ``spearman`` and ``mse`` of real-valued predictions."""
    mse = sum((p - g) ** 2 for p, g in zip(predicted, gold)) / len(gold) if gold else float("nan")
    return {"pearson": pearson(predicted, gold), "spearman": spearman(predicted, gold), "mse": mse}


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The (type, start, end) spans of a tag sequence in the IOB2 scheme, read as conlleval does: an entity
    starts at ``B-X``, or at ``I-X`` after ``O`` or after another type; a tag without a prefix is ``I-`` of its
    name; ``O`` is outside."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, name = (tag[0], tag[2:]) if len(tag) > 1 and tag[1] == "-" else ("I", tag)
        if tag == "O" or prefix in "BS" or name != kind or prefix not in "IE":
            if kind is not None:
                spans.add((kind, start, i))
            start, kind = (i, name) if tag != "O" else (None, None)
        if prefix in "ES" and kind is not None:
            spans.add((kind, start, i + 1))
            start, kind = None, None
    return spans


def entity_scores(predicted: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity ``precision``, ``recall`` and ``f1`` (exact span and type) over all rows, and the
    token ``accuracy``."""
    found = correct = expected = 0
    right = total = 0
    for p, g in zip(predicted, gold):
        p_spans, g_spans = entities(p), entities(g)
        found, expected, correct = found + len(p_spans), expected + len(g_spans), correct + len(p_spans & g_spans)
        right, total = right + sum(a == b for a, b in zip(p, g)), total + len(g)
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": right / total if total else float("nan"), "precision": precision, "recall": recall, "f1": f1}


__all__ = [
    "accuracy",
    "classification_scores",
    "entities",
    "entity_scores",
    "macro_f1",
    "matthews",
    "pearson",
    "ranks",
    "regression_scores",
    "spearman",
]
