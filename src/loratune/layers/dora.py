"""DoRA (weight-decomposed LoRA): the one place that knows its math.

An adapter with a magnitude vector ``m`` (one entry per output row) turns the base weight into

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c          ‖·‖_c: the norm of each output row of an out × in weight

with the norm treated as a constant in the backward pass (the paper's §4.3, as PEFT does). With
``g = m / ‖W0 + s·B·A‖_c`` a layer's output is ``base(x) + (g − 1) ⊙ W0·x + g ⊙ s·B·A·x``.

**Strength** ``t`` scales the change to the weight, as it does for plain LoRA: ``W0 + t·(W' − W0)``, so
strength 0 is the base model, 1 the adapter as trained, and weighted sums of adapters are sums of their
changes. (PEFT's ``set_scale`` multiplies ``s`` inside the norm instead, which leaves ``m/‖W0‖ ⊙ W0`` at
scale 0; the two agree at strength 1.)

The row norms never form the out × in sum: ``‖W0 + sBA‖²`` per row is ``‖W0‖² + 2s·(W0·Aᵀ ⊙ B)·1 + s²·(B·(A·Aᵀ) ⊙
B)·1``,
an out × r product and an r × r Gram matrix on top of the base's row norms (constant, computed once).
"""

from __future__ import annotations

import torch


def _exact_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for a float64 weight


def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W0‖²`` of each row of ``weight`` (out × in), in float32 (float64 for a float64 weight)."""
    return weight.to(_exact_dtype(weight.dtype)).square().sum(1)


def row_norms(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, weight_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """``‖W0 + scale·B·A‖`` of each output row (float32, or float64 for a float64 weight; no gradient), without
    forming the sum.

    ``weight``: W0 (out × in, any float dtype: the product W0·Aᵀ runs in it); ``A`` r × in, ``B`` out × r;
    ``weight_sq``: ``squared_row_norms(weight)`` when the caller keeps it.
    """
    with torch.no_grad():
        if weight_sq is None:
            weight_sq = squared_row_norms(weight)
        exact = _exact_dtype(weight.dtype)
        A32, B32 = A.detach().to(exact), B.detach().to(exact)
        cross = (weight @ A.detach().to(weight.dtype).T).to(exact)  # out × r
        squares = weight_sq + (2 * scale) * (cross * B32).sum(1) + scale * scale * ((B32 @ (A32 @ A32.T)) * B32).sum(1)
        return squares.clamp_min_(0).sqrt_()


def weight_change(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, gain: torch.Tensor, strength: float
) -> torch.Tensor:
    """``t·(W' − W0) = t·((g − 1) ⊙ W0 + g ⊙ s·B·A)`` (out × in, float32) for gain ``g`` and strength ``t``."""
    g = gain.float()[:, None]
    return strength * ((g - 1) * weight.float() + (g * scale) * (B.float() @ A.float()))


def undo_change(
    merged: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, gain: torch.Tensor, strength: float
) -> torch.Tensor:
    """W0 from ``merged = W0 + weight_change(W0, …)`` (float32): ``(merged − t·g ⊙ s·B·A) / (1 + t·(g − 1))``."""
    g = gain.float()[:, None]
    return (merged.float() - (strength * scale) * g * (B.float() @ A.float())) / (1 + strength * (g - 1))
