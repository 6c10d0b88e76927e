"""Dropout for training on a CPU, where drawing the mask with PyTorch (``bernoulli_``) can take a third of an
encoder's step: the compiled kernel draws it from a counter-based hash instead (``fused_cpu.dropout``), one pass
that writes the output, and the backward pass regenerates the mask from its seed instead of storing it.

The mask has the same distribution as ``nn.Dropout``'s (each element kept with probability 1 − p, to 2⁻³² —
the seeds come from torch's generator, so ``torch.manual_seed`` and a checkpoint's RNG state reproduce it), not
the same draws. ``patch_dropout`` gives a model's ``nn.Dropout`` modules this forward; ``attention`` is
transformers' SDPA attention, except that while training with attention dropout on a CPU the probabilities are
dropped by the kernel (PyTorch's SDPA would take its math path and ``bernoulli_``); ``train.attention`` routes
a model's attention through it. Anywhere else (a GPU, p = 0, evaluation, no kernel) everything runs as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.kernels import fused as fused_cpu


def _seed() -> int:
    return int(torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64))


class _KernelDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return fused_cpu.dropout(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return fused_cpu.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None  # the same mask, on the gradient


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask drawn by the compiled kernel where it can take ``x``."""
    if not training or p == 0.0:
        return x
    if 0.0 < p < 1.0 and fused_cpu.dropout_fits(x):
        return _KernelDropout.apply(x, p, _seed())
    return F.dropout(x, p, training)


class KernelDropout(nn.Dropout):
    """``nn.Dropout`` whose training-time mask the compiled kernel draws (see ``dropout``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training) if not self.inplace else F.dropout(x, self.p, self.training, True)


def attention(
    module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' SDPA attention, with the probabilities' dropout drawn by the kernel while training on a
    CPU: softmax((q·scaling)·kᵀ + mask), dropped, times v. Other calls go to SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kernel_takes = fused_cpu.dropout_fits(query.new_empty(0))  # the probabilities' device and dtype (made contiguous)
    plain = (
        dropout > 0.0
        and module.training
        and kernel_takes
        and not (causal and attention_mask is None)
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and getattr(module, "num_key_value_groups", 1) == 1
    )
    if not plain:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, key.transpose(-1, -2))  # scaling q: L/d× fewer products than the scores
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)  # (in bf16 too PyTorch sums in float32)
    probs = _KernelDropout.apply(probs.contiguous(), dropout, _seed())
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def patch_dropout(model: nn.Module) -> int:
    """Give ``model``'s ``nn.Dropout`` modules (p > 0) the kernel's mask; return how many changed. (Attention
    dropout reaches ``attention`` through ``train.attention.patch_attention``.)"""
    if not fused_cpu.kernel_available():
        return 0
    patched = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = KernelDropout
            patched += 1
    return patched


__all__ = ["KernelDropout", "attention", "dropout", "patch_dropout"]
