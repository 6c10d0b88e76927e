"""How alike two adapters' learned subspaces are (LoRA paper §7.2), and how much an update amplifies
directions of the base weight (§7.3)."""

from __future__ import annotations

import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.factors import Factors, adapter_factors, is_expert_key, low_rank_svd, per_expert
from loratune.analysis.weights import WeightReader
from loratune.errors import ConfigError

# Module kinds whose stored weight is the transpose of the [out, in] update s·B·A.
TRANSPOSED_KINDS = ("conv1d", "embedding")


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖U₁[:, :i]ᵀ·U₂[:, :j]‖_F² / min(i, j) for i ≤ r₁, j ≤ r₂ (float64, r₁ × r₂; entry [i-1, j-1]),
    U the right-singular vectors of each A (r × in), by descending singular value. Each entry is in [0, 1]:
    1 where the smaller subspace lies inside the other, 0 where they are orthogonal."""
    if A1.ndim != 2 or A2.ndim != 2 or A1.shape[1] != A2.shape[1]:
        raise ConfigError(f"A matrices of shapes {list(A1.shape)} and {list(A2.shape)} do not share an input space")
    U1 = torch.linalg.svd(A1.double(), full_matrices=False)[2].T  # in × r₁
    U2 = torch.linalg.svd(A2.double(), full_matrices=False)[2].T
    overlap = (U1.T @ U2).square().cumsum(0).cumsum(1)  # [i-1, j-1] = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F²
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64)[None, :]
    return (overlap / torch.minimum(i, j)).clamp(0.0, 1.0)


def amplification(factors: Factors, weight: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖Uᵀ·W·V‖_F with ΔW = s·B·A and U, V its top-r left and right singular vectors; ``weight`` is
    the base W in the update's [out, in] orientation. Large values: the update amplifies directions W barely
    uses (the paper finds ~20 for r = 4 on GPT-3's W_q). Infinite when W has no component there."""
    U, S, Vh = low_rank_svd(factors.scaling * factors.B.double(), factors.A.double())
    projected = float(torch.linalg.matrix_norm(U.T @ weight.double() @ Vh.T))
    norm = float(S.square().sum().sqrt())
    return norm / projected if projected > 0 else float("inf")


def _base_weight(base: WeightReader, kinds: dict[str, str], path: str, factors: Factors) -> torch.Tensor:
    key = f"{path}.weight"
    if key not in base:
        raise ConfigError(f"the base model has no {key}; is it the base these adapters were trained on?")
    weight = base.get(key)
    if kinds.get(path) in TRANSPOSED_KINDS or factors.embedding:
        weight = weight.T
    expected = (factors.B.shape[0], factors.A.shape[1])
    if tuple(weight.shape) != expected:
        raise ConfigError(
            f"{key} is {list(weight.shape)}, the adapter's update is {list(expected)}; "
            "is this the base these adapters were trained on?"
        )
    return weight


def compare_adapters(
    a: tuple[LoraConfig, dict[str, torch.Tensor]],
    b: tuple[LoraConfig, dict[str, torch.Tensor]],
    base: WeightReader | None = None,
    kinds: dict[str, str] | None = None,
) -> dict:
    """Per module both adapters adapt: ``name``, ``r_a``, ``r_b``, ``phi`` (r_a lists of r_b numbers:
    ``phi[i-1][j-1]`` = φ(i, j)), ``phi_top`` = φ(1, 1), ``phi_full`` = φ(m, m) with m = min(r_a, r_b); with
    ``base`` (the base model's weights; ``kinds`` says which modules store a transposed weight: Conv1D), also
    ``amplification_a`` and ``amplification_b``. Top level: ``modules``, ``only_in_a``, ``only_in_b``.

    An expert stack compares expert by expert (``path[e]``; no amplification: the base's fused stacks are not
    read). Raises ``ConfigError`` when the adapters share no module or their inputs differ in size."""
    factors_a = per_expert(adapter_factors(*a, source="first adapter")[0])
    factors_b = per_expert(adapter_factors(*b, source="second adapter")[0])
    common = sorted(set(factors_a) & set(factors_b))
    if not common:
        raise ConfigError("the two adapters adapt no module in common; nothing to compare")
    modules = []
    for path in common:
        fa, fb = factors_a[path], factors_b[path]
        phi = subspace_similarity(fa.A, fb.A)
        m = min(fa.rank, fb.rank)
        entry = {
            "name": path,
            "r_a": fa.rank,
            "r_b": fb.rank,
            "phi": phi.tolist(),
            "phi_top": float(phi[0, 0]),
            "phi_full": float(phi[m - 1, m - 1]),
        }
        if base is not None and not is_expert_key(path):
            weight = _base_weight(base, kinds or {}, path, fa)
            entry["amplification_a"] = amplification(fa, weight)
            entry["amplification_b"] = amplification(fb, weight)
        modules.append(entry)
    return {
        "modules": modules,
        "only_in_a": sorted(set(factors_a) - set(factors_b)),
        "only_in_b": sorted(set(factors_b) - set(factors_a)),
    }
