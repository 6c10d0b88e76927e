"""How much rank an update needs, and how two updates relate: pure functions on adapters and weight deltas.

Definitions (the same in ``--help`` and ``docs/``):

- The update of a module is ΔW = s·B·A (s = alpha/r, or alpha/√r with rsLoRA, after ``rank_pattern`` /
  ``alpha_pattern``), or W_tuned − W_base for a full fine-tune. σ₁ ≥ σ₂ ≥ … are its singular values.
- Energy kept by rank k: E(k) = Σ_{i≤k} σᵢ² / Σ_i σᵢ² (the Frobenius share).
- Subspace similarity (LoRA paper §7): for two adapters' A matrices (r × in) with right-singular vectors
  U₁, U₂ (columns in input space, by descending singular value), φ(i, j) = ‖U₁[:, :i]ᵀ·U₂[:, :j]‖_F² / min(i, j).

Everything here takes tensors and state dicts (or a ``WeightReader`` over safetensors files) and returns
results; nothing loads a model, and only ``plots`` writes files (the figures).
"""

from loratune.analysis.extract import ExtractResult, extract_adapter
from loratune.analysis.resize import ResizeResult, resize_adapter
from loratune.analysis.similarity import amplification, compare_adapters, subspace_similarity
from loratune.analysis.spectrum import (
    adapter_spectrum,
    delta_svd,
    energy_curve,
    factor_singular_values,
    full_finetune_spectrum,
    rank_for_energy,
)
from loratune.analysis.weights import WeightReader

__all__ = [
    "ExtractResult",
    "ResizeResult",
    "WeightReader",
    "adapter_spectrum",
    "amplification",
    "compare_adapters",
    "delta_svd",
    "energy_curve",
    "extract_adapter",
    "factor_singular_values",
    "full_finetune_spectrum",
    "rank_for_energy",
    "resize_adapter",
    "subspace_similarity",
]
