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

# _SKINNY: the rank-r products (N × r results, N tokens) are taken as r × N products and transposed (a view):
# BLAS on a CPU runs a product whose long side is the output's rows several times slower than the same product
# with a few rows of output (MKL here: x·Aᵀ 1.4×, g·B 2.2–2.6×, gᵀ·xa up to 13× slower; docs/benchmarks.md).


def lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale: float):
    """(out, xa) for 2-D ``x2`` (N × in): ``out = x2·Wᵀ + bias + scale·xa·Bᵀ`` with ``xa = x2·Aᵀ`` (N × r)."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    out = x2 @ weight.T if bias is None else torch.addmm(bias.to(x2.dtype), x2, weight.T)
    xa = (A @ x2.T).T  # see _SKINNY
    out.addmm_(xa, B.T, alpha=scale)
    return out, xa


def lora_linear_backward(g2, x2, xa, weight, lora_A, lora_B, scale: float, needs):
    """Gradients (x2, bias, A, B) for output gradient ``g2`` (N × out); ``needs`` says which (4 flags)."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    gb = (B.T @ g2.T).T  # N × r; see _SKINNY
    grad_x = (g2 @ weight).addmm_(gb, A, alpha=scale) if needs[0] else None
    grad_bias = g2.sum(0) if needs[1] else None
    grad_A = (scale * (gb.T @ x2)).to(lora_A.dtype) if needs[2] else None
    grad_B = (scale * (xa.T @ g2).T).to(lora_B.dtype) if needs[3] else None
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
            grad_out.reshape(-1, grad_out.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            xa,
            weight,
            lora_A,
            lora_B,
            ctx.scale,
            (needs[0], needs[2], needs[3], needs[4]),
        )
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None
        return grad_x, None, grad_bias, grad_A, grad_B, None


def lora_linear(x, source, bias, lora_A, lora_B, scale: float) -> torch.Tensor:
    """``x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ`` with lean autograd (see the module docstring)."""
    return LoraLinearFunction.apply(x, source, bias, lora_A, lora_B, scale)


def dora_linear_forward(x2, weight, bias, lora_A, lora_B, magnitude, norms, scale: float, strength: float):
    """(out, xa, kept, kept_is_out) for 2-D ``x2`` (N × in) and a DoRA term: ``out = x2·Wᵀ + bias +
    t·((g − 1) ⊙ x2·Wᵀ + g ⊙ s·xa·Bᵀ)`` with ``xa = x2·Aᵀ`` and ``g = m / norms`` (the row norms of W + s·B·A,
    a constant). ``kept`` is what m's gradient needs: ``out`` itself at strength 1 (no extra memory: the next
    operation usually keeps it too), else ``v = x2·Wᵀ + s·xa·Bᵀ``."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    gain = magnitude.detach().to(norms.dtype) / norms
    xa = x2 @ A.T
    z = x2 @ weight.T
    kept_is_out = strength == 1 and bool((magnitude != 0).all())
    if kept_is_out:
        out = kept = z.addmm_(xa, B.T, alpha=scale).mul_(gain.to(x2.dtype))
    else:
        kept = torch.addmm(z, xa, B.T, alpha=scale)
        out = (kept * (strength * gain).to(x2.dtype)).add_(z, alpha=1 - strength)
    if bias is not None:
        out.add_(bias.to(x2.dtype))
    return out, xa, kept, kept_is_out


def dora_linear_backward(
    g2,
    x2,
    xa,
    kept,
    kept_is_out: bool,
    weight,
    bias,
    lora_A,
    lora_B,
    magnitude,
    norms,
    scale: float,
    strength: float,
    needs,
):
    """Gradients (x2, bias, A, B, m) of ``dora_linear_forward`` for output gradient ``g2`` (N × out); ``needs``
    says which (5 flags); ``kept`` and ``kept_is_out`` as that function returned them."""
    A, B = lora_A.to(x2.dtype), lora_B.to(x2.dtype)
    m = magnitude.detach().to(norms.dtype)
    grad_v = g2 * (strength * m / norms).to(g2.dtype)  # also the gradient of x2·Wᵀ, plus (1 − t)·g2 when t ≠ 1
    gb = (grad_v @ B).mul_(scale)  # N × r: the gradient of xa
    grad_x = grad_bias = grad_A = grad_B = grad_m = None
    if needs[0]:
        grad_z = grad_v if strength == 1 else grad_v.add(g2, alpha=1 - strength)
        grad_x = (grad_z @ weight).addmm_(gb, A)
    if needs[1] or (needs[4] and kept_is_out and bias is not None):
        grad_bias = g2.sum(0, dtype=norms.dtype)
    if needs[2]:
        grad_A = (gb.T @ x2).to(lora_A.dtype)
    if needs[3]:
        grad_B = (scale * (grad_v.T @ xa)).to(lora_B.dtype)
    if needs[4]:
        # dout/dm = t·v / norms; with kept = out (t = 1), v = (out − bias)·norms/m, so the gradient is Σ g2⊙(out −
        # bias) / m
        product = (g2 * kept).sum(0, dtype=norms.dtype)
        if not kept_is_out:
            grad_m = strength * product / norms
        else:
            grad_m = (product if bias is None else product - bias.to(m.dtype) * grad_bias) / m
        grad_m = grad_m.to(magnitude.dtype)
    return grad_x, grad_bias, grad_A, grad_B, grad_m


class DoraLinearFunction(torch.autograd.Function):
    """DoRA's layer output (see ``dora_linear_forward``) with W from ``layer.dense_weight`` and the row norms from
    it, so a 4-bit weight is dequantized once per pass. Saves x, x·Aᵀ and one N × out tensor for m's gradient
    (the output itself at strength 1), never the dense update."""

    @staticmethod
    def forward(ctx, x, layer, term, bias, lora_A, lora_B, magnitude):
        x2 = x.reshape(-1, x.shape[-1])
        weight = layer.dense_weight(x.dtype)
        norms = dora.row_norms(weight, lora_A, lora_B, term.scaling, layer.base_row_norms_squared())
        out, xa, kept, ctx.kept_is_out = dora_linear_forward(
            x2, weight, bias, lora_A, lora_B, magnitude, norms, term.scaling, term.strength
        )
        del weight
        ctx.save_for_backward(x, lora_A, lora_B, magnitude, xa, kept, norms, bias)
        ctx.layer, ctx.scaling, ctx.strength = layer, term.scaling, term.strength
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, lora_A, lora_B, magnitude, xa, kept, norms, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        weight = ctx.layer.dense_weight(x.dtype) if needs[0] else None
        grad_x, grad_bias, grad_A, grad_B, grad_m = dora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            xa,
            kept,
            ctx.kept_is_out,
            weight,
            bias,
            lora_A,
            lora_B,
            magnitude,
            norms,
            ctx.scaling,
            ctx.strength,
            (needs[0], *needs[3:7]),
        )
        grad_x = grad_x.view(x.shape) if grad_x is not None else None
        grad_bias = grad_bias.to(bias.dtype) if needs[3] else None
        return grad_x, None, None, grad_bias, grad_A, grad_B, grad_m


def dora_linear(x, layer, term, bias) -> torch.Tensor:
    """A DoRA term's layer output with lean autograd (see ``DoraLinearFunction``)."""
    return DoraLinearFunction.apply(x, layer, term, bias, term.A, term.B, term.magnitude)
