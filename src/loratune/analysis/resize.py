"""Resize an adapter: replace each module's update s·B·A by its best rank-k approximation (Eckart–Young:
the truncated SVD, computed from the factors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.factors import (
    adapter_factors,
    balanced_factors,
    is_expert_key,
    low_rank_svd,
    per_expert,
    restack,
    unit_scaling_fields,
)
from loratune.analysis.spectrum import check_thresholds, energy_curve, rank_for_energy
from loratune.errors import ConfigError


@dataclass(frozen=True)
class ResizeResult:
    """The resized adapter (``config``, PEFT-keyed ``tensors``) and per module ``name``, ``r`` (before), ``k``
    (after) and ``energy`` (E(k), the share of ‖s·B·A‖_F² kept)."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    modules: list[dict]


def check_rank_or_energy(rank: int | None, energy: float | None) -> None:
    """Raises ``ConfigError`` unless exactly one of a rank ≥ 1 and an energy in (0, 1] is given."""
    if (rank is None) == (energy is None):
        raise ConfigError("give either --rank R or --energy E (the share of each update's energy to keep)")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be at least 1, not {rank}")
    if energy is not None:
        check_thresholds([energy])


def resize_adapter(
    config: LoraConfig, tensors: dict[str, torch.Tensor], *, rank: int | None = None, energy: float | None = None
) -> ResizeResult:
    """Each module's update truncated to rank k = min(``rank``, r), or the smallest k with E(k) ≥ ``energy``.

    The result has scaling 1 in every module (lora_alpha = r, ranks that differ in ``rank_pattern`` and
    ``alpha_pattern``), factors with √σ on each side, in the input factors' dtype; modules_to_save copies are
    kept. Its error is the Eckart–Young error ‖Δ − Δ_k‖_F² = Σ_{i>k} σᵢ². An expert stack is truncated expert by
    expert and written with its experts' largest k (zero-padded; with ``energy``, every stack then gets the
    adapter's common rank, as ``rank_pattern`` cannot name a stack). Raises ``ConfigError`` for a bad rank or
    energy, or an adapter without LoRA factors."""
    check_rank_or_energy(rank, energy)
    factors, others = adapter_factors(config, tensors)
    factors = per_expert(factors)
    if not factors:
        raise ConfigError("the adapter holds no LoRA factors (lora_A / lora_B tensors); nothing to resize")
    out: dict[str, torch.Tensor] = {}
    modules, ranks, experts = [], {}, {}
    for path, f in sorted(factors.items()):
        U, S, Vh = low_rank_svd(f.scaling * f.B.double(), f.A.double())
        curve = energy_curve(S)
        k = min(rank, f.rank) if rank is not None else rank_for_energy(curve, energy) or f.rank
        A, B, kept = balanced_factors(U, S, Vh, k)
        modules.append({"name": path, "r": f.rank, "k": A.shape[0], "energy": kept})
        if is_expert_key(path):
            experts[path] = (A, B)
            continue
        out.update(f.tensors(path, A, B))
        ranks[path] = A.shape[0]
    if experts:
        widest = max(A.shape[0] for A, _ in experts.values())
        common = unit_scaling_fields(ranks)["r"] if ranks else widest
        if widest > common:
            raise ConfigError(
                f"some experts keep rank {widest} where the adapter's other modules keep {common}; an expert stack "
                "takes the adapter's common rank: give --rank"
            )
        padded = {key: _padded(A, B, common) for key, (A, B) in experts.items()}
        stacks, stack_ranks = restack(padded, next(iter(factors.values())).A.dtype)
        out.update(stacks)
        ranks.update(stack_ranks)
    out.update(others)
    return ResizeResult(config.model_copy(update=unit_scaling_fields(ranks)), out, modules)


def _padded(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank ≥ ``k``: zero rows of A and columns of B added up to k (the product is unchanged)."""
    if A.shape[0] >= k:
        return A, B
    extra = k - A.shape[0]
    return torch.cat([A, A.new_zeros(extra, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
