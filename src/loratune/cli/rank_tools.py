"""What the rank tools (``rank``, ``resize``, ``extract``, ``compare``) share: their definitions, short labels,
status lines, and reading a model's weights tensor by tensor."""

from __future__ import annotations

import sys
from pathlib import Path

DEFINITIONS = """\
definitions:
  update     ΔW = s·B·A for an adapter module (s = alpha/r, or alpha/√r with rsLoRA, after rank_pattern and
             alpha_pattern); W_tuned − W_base for a full fine-tune. σ₁ ≥ σ₂ ≥ … are its singular values.
  energy     E(k) = Σ_{i≤k} σᵢ² / Σ_i σᵢ²: the share of ‖ΔW‖_F² its best rank-k approximation keeps.
  rank_at    for a threshold t, the smallest k with E(k) ≥ t; recommended_rank[t]: the largest over modules.
  φ(i, j)    subspace similarity (LoRA paper §7): ‖U₁[:, :i]ᵀ·U₂[:, :j]‖_F² / min(i, j), U the right-singular
             vectors of each adapter's A (input space); 1 = the smaller subspace lies in the other, 0 = orthogonal.
"""


def label(path: str) -> str:
    """A short name for an adapter in a figure: its directory, or the run's for ``runs/NAME/adapter``."""
    p = Path(path).resolve()
    return p.parent.name if p.name in ("adapter", "best") else p.name


def status(message: str) -> None:
    """A progress line on stderr (stdout stays the verb's result)."""
    print(message, file=sys.stderr, flush=True)


def weights(name: str):
    """The safetensors weights of a model (alias, .gguf or directory), read tensor by tensor."""
    from loratune.analysis import WeightReader
    from loratune.models.loader import resolve_model_dir

    return WeightReader(resolve_model_dir(name))
