"""``base(x) + s·B·A·x`` for an ``nn.Linear`` base as one autograd function that saves only what its backward
needs: the input ``x`` (by reference) and the rank-r product ``A·x``.

Left to autograd, the same computation on a CPU in bf16 keeps a transposed copy of every frozen base weight
and a 2-D copy of every 3-D input (matmul folds the batch dimensions), per layer and per step.
Shapes: x (..., in), W (out, in), A (r, in), B (out, r); the factors run in x's dtype, their gradients come
back in their own dtype. ``lora_linear_forward`` / ``lora_linear_backward`` are the two halves, for fused
functions that feed a LoRA linear with something they recompute (see ``train.fused_ops``).
"""

from __future__ import annotations

import torch


def lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale: float):
    """(out, xa) for 2-D ``x2`` (N × in): ``out = x2·Wᵀ + bias + scale·xa·Bᵀ`` with ``xa = x2·Aᵀ`` (N × r)."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    out = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
    xa = x2 @ A.T
    out.addmm_(xa, B.T, alpha=scale)
    return out, xa


def lora_linear_backward(g2, x2, xa, weight, lora_A, lora_B, scale: float, needs):
    """Gradients (x2, weight, bias, A, B) for output gradient ``g2`` (N × out); ``needs`` says which (5 flags)."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    gb = g2 @ B  # N × r
    grad_x = (g2 @ weight).addmm_(gb, A, alpha=scale) if needs[0] else None
    grad_weight = g2.T @ x2 if needs[1] else None
    grad_bias = g2.sum(0) if needs[2] else None
    grad_A = (scale * (gb.T @ x2)).to(lora_A.dtype) if needs[3] else None
    grad_B = (scale * (g2.T @ xa)).to(lora_B.dtype) if needs[4] else None
    return grad_x, grad_weight, grad_bias, grad_A, grad_B


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float):
        out, xa = lora_linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scale)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scale = scale
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        grads = lora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]), xa, weight, lora_A, lora_B,
            ctx.scale, ctx.needs_input_grad[:5],
        )
        grad_x = grads[0].view(x.shape) if grads[0] is not None else None
        return (grad_x, *grads[1:], None)


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float) -> torch.Tensor:
    """``x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` with lean autograd (see the module docstring)."""
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scale)
