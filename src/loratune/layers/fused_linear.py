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

from loratune.layers import dora


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


class DoraLinearFunction(torch.autograd.Function):
    """DoRA's ``x·Wᵀ + bias + t·((g − 1) ⊙ x·Wᵀ + g ⊙ s·(x·Aᵀ)·Bᵀ)`` with ``g = m / ‖W + s·B·A‖_c`` (the norm a
    constant, see ``layers.dora``), W from ``layer.dense_weight`` and the norms from it, so a
    4-bit weight is dequantized once per pass. Saves x, x·Aᵀ and ``v = x·Wᵀ + s·x·Aᵀ·Bᵀ`` (what m's gradient
    needs), never the dense update."""

    @staticmethod
    def forward(ctx, x, layer, term, bias, lora_A, lora_B, magnitude):
        x2 = x.reshape(-1, x.shape[-1])
        weight = layer.dense_weight(x.dtype)
        s, t = term.scaling, term.strength
        norms = dora.row_norms(weight, lora_A, lora_B, s, layer.base_row_norms_squared())  # float32, out
        gain = magnitude.detach().float() / norms
        z = x2 @ weight.T
        del weight
        xa = x2 @ lora_A.to(x.dtype).T
        v = torch.addmm(z, xa, lora_B.to(x.dtype).T, alpha=s)
        out = v * (t * gain).to(x.dtype)
        if t != 1:
            out.add_(z, alpha=1 - t)
        del z
        if bias is not None:
            out.add_(bias.to(x.dtype))
        ctx.save_for_backward(x, lora_A, lora_B, xa, v, gain, norms)
        ctx.layer, ctx.scaling, ctx.strength = layer, s, t
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.magnitude_dtype = magnitude.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, xa, v, gain, norms = ctx.saved_tensors
        needs = ctx.needs_input_grad
        s, t = ctx.scaling, ctx.strength
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        grad_v = g2 * (t * gain).to(g2.dtype)  # also the gradient of W·x, plus (1 − t)·g2 when t ≠ 1
        gb = (grad_v @ B).mul_(s)  # N × r: the gradient of x·Aᵀ
        grad_x = grad_bias = grad_A = grad_B = grad_m = None
        if needs[0]:
            grad_z = grad_v if t == 1 else grad_v.add(g2, alpha=1 - t)
            grad_x = (grad_z @ ctx.layer.dense_weight(x.dtype)).addmm_(gb, A).view(x.shape)
        if needs[3]:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        if needs[4]:
            grad_A = (gb.T @ x2).to(lora_A.dtype)
        if needs[5]:
            grad_B = (s * (grad_v.T @ xa)).to(lora_B.dtype)
        if needs[6]:
            grad_m = (t * (g2 * v).sum(0, dtype=torch.float32) / norms).to(ctx.magnitude_dtype)
        return grad_x, None, None, grad_bias, grad_A, grad_B, grad_m


def dora_linear(x, layer, term, bias) -> torch.Tensor:
    """A DoRA term's layer output with lean autograd (see ``DoraLinearFunction``)."""
    return DoraLinearFunction.apply(x, layer, term, bias, term.A, term.B, term.magnitude)
