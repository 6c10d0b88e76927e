"""Training backend: ``base(x) + s·B·A·x`` for a Linear-like base as one autograd function that saves only what
its backward needs: the input ``x`` (by reference) and the rank-r product ``A·x``.

The frozen base weight comes from a *weight source* (anything with ``dense_weight(dtype)``: a LoRA layer),
asked once in forward and again in backward: a plain weight is returned as it is, a 4-bit one is dequantized
and dropped each time, so no dense copy lives between the two. Left to autograd, the same computation on a
CPU in bf16 keeps a transposed copy of every frozen weight and a 2-D copy of every 3-D input per layer.

Shapes: x (..., in), W (out, in), A (r, in), B (out, r); the factors run in x's dtype, their gradients come
back in their own dtype. ``lora_linear_forward`` / ``lora_linear_backward`` are the two halves, for fused
functions that feed a LoRA linear with something they recompute (see ``train.fused_ops``).
"""

from __future__ import annotations

import torch


def lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale: float):
    """(out, xa) for 2-D ``x2`` (N × in): ``out = x2·Wᵀ + bias + scale·xa·Bᵀ`` with ``xa = x2·Aᵀ`` (N × r)."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    out = x2 @ weight.T if bias is None else torch.addmm(bias.to(x2.dtype), x2, weight.T)
    xa = x2 @ A.T
    out.addmm_(xa, B.T, alpha=scale)
    return out, xa


def lora_linear_backward(g2, x2, xa, weight, lora_A, lora_B, scale: float, needs):
    """Gradients (x2, bias, A, B) for output gradient ``g2`` (N × out); ``needs`` says which (4 flags)."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    gb = g2 @ B  # N × r
    grad_x = (g2 @ weight).addmm_(gb, A, alpha=scale) if needs[0] else None
    grad_bias = g2.sum(0) if needs[1] else None
    grad_A = (scale * (gb.T @ x2)).to(lora_A.dtype) if needs[2] else None
    grad_B = (scale * (g2.T @ xa)).to(lora_B.dtype) if needs[3] else None
    return grad_x, grad_bias, grad_A, grad_B


class LoraLinearFunction(torch.autograd.Function):
    """``x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` with W from ``source.dense_weight`` (never a gradient for W)."""

    @staticmethod
    def forward(ctx, x, source, bias, lora_A, lora_B, scale: float):
        weight = source.dense_weight(x.dtype)
        out, xa = lora_linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scale)
        del weight
        ctx.save_for_backward(x, lora_A, lora_B, xa)
        ctx.source, ctx.scale = source, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, xa = ctx.saved_tensors
        needs = ctx.needs_input_grad
        weight = ctx.source.dense_weight(x.dtype) if needs[0] else None
        grad_x, grad_bias, grad_A, grad_B = lora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]), xa, weight, lora_A, lora_B,
            ctx.scale, (needs[0], needs[2], needs[3], needs[4]),
        )
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None
        return grad_x, None, grad_bias, grad_A, grad_B, None


def lora_linear(x, source, bias, lora_A, lora_B, scale: float) -> torch.Tensor:
    """``x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` with lean autograd (see the module docstring)."""
    return LoraLinearFunction.apply(x, source, bias, lora_A, lora_B, scale)
