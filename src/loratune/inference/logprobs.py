"""Log-probabilities of a batch's target tokens under a causal LM, per token and summed per row, without the full
logits tensor: what preference and policy-gradient objectives score sequences by.

The same chunked path as the training loss (``loss.py``): the output head runs only on positions that predict a
target, fused with the log-softmax, and with a frozen head the gradient w.r.t. the hidden states is computed in
the same pass. Targets are marked as in training (``labels``: the token where it is scored, ``IGNORE_INDEX``
elsewhere; position t is predicted from t-1). Rows that start with the same prompt read it once
(``shared_prefix``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.inference.loss import IGNORE_INDEX, fused_head, linear_token_cross_entropy
from loratune.inference.shared_prefix import shared_prefix_hidden


def target_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token, float32; the row it belongs to), both of length N = the batch's
    target tokens in row-major order. Differentiable w.r.t. the model's trainable parameters.

    ``batch`` has ``input_ids`` and ``labels`` and optionally ``attention_mask``/``position_ids``. ``temperature``:
    the log-probabilities of ``softmax(logits / temperature)``, the distribution tokens were sampled from (GRPO)."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero()[:, 0]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    inputs["use_cache"] = False
    head = fused_head(model)
    if head is None:
        logits = model(**inputs).logits[:, :-1]
        return -F.cross_entropy(logits[mask].float() / temperature, targets[mask], reduction="none"), rows
    hidden = shared_prefix_hidden(model, batch, mask)  # rows starting alike (a pair, a group) read it once
    if hidden is None:
        hidden = model.base_model(**inputs).last_hidden_state[:, :-1][mask]
    if temperature != 1.0:
        hidden = hidden / temperature  # (h / T)·Wᵀ = logits / T: the head stays fused
    return -linear_token_cross_entropy(hidden, head.weight, targets[mask], chunk_size), rows


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128) -> torch.Tensor:
    """Each row's summed log-probability of its target tokens (float32, one per row of ``input_ids``; 0 for a row
    without targets). Differentiable w.r.t. the model's trainable parameters."""
    logps, rows = target_logprobs(model, batch, chunk_size)
    return row_sums(logps, rows, batch["input_ids"].shape[0])


def row_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``values`` (one per target token, as ``target_logprobs`` orders them) summed per row: a vector of ``n_rows``."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def target_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's number of target tokens (long, one per row)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


__all__ = ["row_sums", "sequence_logprobs", "target_counts", "target_logprobs"]
