"""The training loss of a causal LM, without the full logits tensor.

A plain forward computes logits for every position (batch × seq × 49k vocabulary for SmolLM2), upcasts them
to float32 and keeps both for backward: most of the memory of a LoRA step. Here the output projection runs
only on positions that have a target, chunk by chunk, fused with the cross-entropy; with a frozen output
head the gradient w.r.t. the hidden states is computed in the same pass, so no logits survive the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.kernels import fused as fused_cpu

IGNORE_INDEX = -100

# Architectures whose logits are exactly ``lm_head(final hidden state)`` (no soft-capping or scaling).
_PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "smollm3", "olmo2", "gemma"}


def _cross_entropy_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, want_grad: bool, each
) -> torch.Tensor | None:
    """Hand each chunk's per-row cross-entropy ``CE(hidden_i · Wᵀ, target_i)`` (float32, or float64 for float64
    inputs) to ``each``, chunk by chunk; return, with ``want_grad``, the gradient of each row's cross-entropy
    w.r.t. its hidden row (N × H, computed chunk by chunk as the logits go), else None."""
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 math for bf16/fp16 inputs
    # One set of chunk buffers, reused: a fresh 25 MB logits tensor per chunk costs more in page faults
    # than the arithmetic on it. The compiled kernel needs no float32 copy of the logits.
    rows = min(chunk_size, hidden.shape[0])
    logits_low = torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    logits = None
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        n = h.shape[0]
        low = logits_low[:n]
        torch.mm(h, weight.T, out=low)
        picked = low.gather(1, t[:, None])[:, 0].to(acc)
        lse = fused_cpu.cross_entropy_rows(low, t, want_grad) if acc == torch.float32 else None
        if lse is None:  # PyTorch operations, in a float32 (or float64) copy of the chunk
            if logits is None:
                logits = torch.empty(rows, weight.shape[0], dtype=acc, device=hidden.device)
            full = logits[:n]
            full.copy_(low)
            top = full.amax(dim=-1, keepdim=True)
            full.sub_(top).exp_()  # exp(logits - max)
            sums = full.sum(dim=-1, keepdim=True)
            lse = sums.log().add_(top)[:, 0]
            if want_grad:
                full.div_(sums)  # softmax
                full[torch.arange(n, device=t.device), t] -= 1.0
                low.copy_(full)
        each(lse - picked)
        if want_grad:  # low holds the logits' gradient now
            torch.mm(low, weight, out=grad_hidden[start : start + chunk_size])
    return grad_hidden


class LinearCrossEntropy(torch.autograd.Function):
    """``Σ_i CE(hidden_i · Wᵀ, target_i)`` over rows, in chunks; W is frozen (no gradient for it).

    hidden: N × H, weight: V × H, targets: N (no ignored entries). Returns a float32 (or float64) scalar.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)

        def add(losses: torch.Tensor) -> None:
            total.add_(losses.sum())

        ctx.save_for_backward(_cross_entropy_chunks(hidden, weight, targets, chunk_size, ctx.needs_input_grad[0], add))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


class LinearTokenCrossEntropy(torch.autograd.Function):
    """Each row's ``CE(hidden_i · Wᵀ, target_i)`` (a vector of N), in chunks; W is frozen (no gradient for it).

    The per-row form of ``LinearCrossEntropy`` for losses that weigh tokens differently (a preference pair's
    log-probabilities, a policy-gradient term): the gradient w.r.t. each hidden row is computed in the forward as
    there, and the backward scales row i by the incoming gradient of CE_i.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        parts: list[torch.Tensor] = []
        ctx.save_for_backward(
            _cross_entropy_chunks(hidden, weight, targets, chunk_size, ctx.needs_input_grad[0], parts.append)
        )
        return torch.cat(parts) if parts else torch.zeros(0, dtype=acc, device=hidden.device)

    @staticmethod
    def backward(ctx, grad_rows):
        (grad_hidden,) = ctx.saved_tensors
        # scaled in float32 (the rows' weights differ, and bf16 would round each to 3 digits), stored as the hidden's
        scaled = grad_hidden.to(grad_rows.dtype) * grad_rows[:, None]
        return scaled.to(grad_hidden.dtype), None, None, None


def linear_cross_entropy_sum(hidden, weight, targets, chunk_size: int = 128) -> torch.Tensor:
    """Summed cross-entropy of ``hidden · weightᵀ`` against ``targets`` (rows with a target only)."""
    if weight.requires_grad:  # a trained output head: let autograd keep what it needs
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)


def linear_token_cross_entropy(hidden, weight, targets, chunk_size: int = 128) -> torch.Tensor:
    """Each row's cross-entropy of ``hidden · weightᵀ`` against ``targets`` (float32; rows with a target only)."""
    if weight.requires_grad:  # a trained output head: let autograd keep what it needs
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    return LinearTokenCrossEntropy.apply(hidden, weight, targets, chunk_size)


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when the loss may bypass ``model.forward`` (a plain, frozen, bias-free Linear
    on an architecture whose logits are exactly the head's output), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if type(head) is not nn.Linear or head.bias is not None or model_type not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    return head


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 128):
    """(summed next-token loss over target tokens, number of target tokens) for one batch.

    ``batch`` has ``input_ids`` and ``labels`` (``IGNORE_INDEX`` where there is no target), and optionally
    ``attention_mask`` and ``position_ids`` (packed rows). Labels are shifted here: position i predicts i+1.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    inputs["use_cache"] = False  # also what lets transformers see packed rows (position_ids restarting at 0)
    head = fused_head(model)
    if head is None:
        logits = model(**inputs).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), count
    hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
    return linear_cross_entropy_sum(hidden[mask], head.weight, targets[mask], chunk_size), count
