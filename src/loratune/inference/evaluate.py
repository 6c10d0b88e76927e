"""Evaluation: loss and perplexity over target tokens, and exact match from greedy generation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.data import Example, TokenizedExample, collate, prompt_ids, reference
from loratune.inference.decode import exact_match, generate_greedy
from loratune.inference.loss import causal_lm_loss_sum
from loratune.models.devices import model_device


@dataclass
class EvalResult:
    """``loss`` and ``perplexity`` over ``n_tokens`` target tokens of ``n`` examples; ``exact_match`` (0..1)
    over the examples with a reference, None when there are none. A classifier's result has the task's
    ``metrics`` (accuracy, macro_f1, mcc; or pearson, spearman, mse) and no perplexity."""

    loss: float
    perplexity: float | None
    n: int
    n_tokens: int
    exact_match: float | None = None
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
            "n": self.n,
            "n_tokens": self.n_tokens,
            **self.metrics,
        }


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int = 16):
    """(mean loss per target token, number of target tokens) over ``examples``, batched by length."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
            loss_sum, n = causal_lm_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss_sum), count + n
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


def score_exact_match(
    model: nn.Module, tokenizer, examples: Sequence[Example], *, max_new_tokens: int = 32, batch_size: int = 32
) -> tuple[float | None, list[str], list[str]]:
    """(exact match, predictions, references) over the examples that have a reference (None if none do).

    Prompts are formatted exactly as training formatted them (chat template for chat-style rows)."""
    with_reference = [ex for ex in examples if reference(ex) is not None]
    if not with_reference:
        return None, [], []
    prompts = [prompt_ids(ex, tokenizer) for ex in with_reference]
    predictions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    references = [reference(ex) for ex in with_reference]
    return exact_match(predictions, references), predictions, references


def evaluate(
    model: nn.Module,
    tokenizer,
    tokenized: Sequence[TokenizedExample],
    examples: Sequence[Example] = (),
    *,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    with_exact_match: bool = True,
) -> EvalResult:
    """Loss/perplexity over ``tokenized`` and, when ``with_exact_match``, exact match over ``examples``."""
    loss, n_tokens = evaluate_loss(model, tokenized, tokenizer.pad_token_id, batch_size=max(1, batch_size // 2))
    perplexity = math.exp(loss) if loss < 50 else float("inf")
    result = EvalResult(loss=loss, perplexity=perplexity, n=len(tokenized), n_tokens=n_tokens)
    if with_exact_match and examples:
        result.exact_match, result.predictions, result.references = score_exact_match(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    return result
