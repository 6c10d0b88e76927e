"""``base(x) + s·B·A·x`` for an ``nn.Linear`` base as one autograd function that saves only what its backward
needs: the input ``x`` (by reference) and the rank-r product ``A·x``.

Left to autograd, the same computation on a CPU in bf16 keeps a transposed copy of every frozen base weight
and a 2-D copy of every 3-D input (matmul folds the batch dimensions), per layer and per step.
Shapes: x (..., in), W (out, in), A (r, in), B (out, r); the factors run in x's dtype, their gradients come
back in their own dtype.
"""

from __future__ import annotations

import torch


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float):
        x2 = x.reshape(-1, x.shape[-1])  # a view for contiguous x
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        out = x2 @ weight.T if bias is None else torch.addmm(bias, x2, weight.T)
        xa = x2 @ A.T  # N × r
        out.addmm_(xa, B.T, alpha=scale)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        scale = ctx.scale
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        gb = g2 @ B  # N × r
        grad_x = grad_weight = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).addmm_(gb, A, alpha=scale).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = g2.T @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            grad_A = (scale * (gb.T @ x2)).to(lora_A.dtype)
        if ctx.needs_input_grad[4]:
            grad_B = (scale * (g2.T @ xa)).to(lora_B.dtype)
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None


def lora_linear(x, weight, bias, lora_A, lora_B, scale: float) -> torch.Tensor:
    """``x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` with lean autograd (see the module docstring)."""
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scale)
