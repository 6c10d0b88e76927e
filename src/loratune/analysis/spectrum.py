"""Singular values and energy of weight updates: an adapter's s·B·A (from its factors, never forming the dense
matrix) or a full fine-tune's W_tuned − W_base (read a block of rows at a time).

E(k) = Σ_{i≤k} σᵢ² / Σ_i σᵢ²; ``rank_at[t]`` is the smallest k with E(k) ≥ t.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.factors import Factors, adapter_factors, low_rank_svd, per_expert
from loratune.analysis.weights import WeightReader
from loratune.errors import ConfigError

DEFAULT_THRESHOLDS = (0.5, 0.9, 0.99)
DEFAULT_MAX_RANK = 64
BLOCK_ELEMENTS = 1 << 22  # rows of a delta read at a time: 16 MB of float32
EXACT_ELEMENTS = 1 << 22  # a delta this small gets an exact float64 SVD
# Below E(k) = 1 − this, a truncation counts as lossy (float rounding leaves E(full) a hair under 1).
ENERGY_SLACK = 1e-12


def threshold_key(threshold: float) -> str:
    """How a threshold is written in JSON: ``0.9`` -> ``"0.9"``."""
    return f"{threshold:g}"


def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """``thresholds`` sorted; raises ``ConfigError`` for one outside (0, 1] or none at all."""
    if not thresholds:
        raise ConfigError("give at least one energy threshold, e.g. --energy 0.9")
    for t in thresholds:
        if not 0 < t <= 1:
            raise ConfigError(f"energy threshold {t:g} is outside (0, 1]; e.g. 0.9 keeps 90% of the update's energy")
    return sorted(set(thresholds))


def energy_curve(singular_values: torch.Tensor, total: float | None = None) -> list[float]:
    """E(1..n) for descending ``singular_values``; ``total`` = Σ σᵢ² over all of them when only the top n are
    given (default: the sum over those given). All ones for a zero update."""
    squares = singular_values.double() ** 2
    total = float(squares.sum()) if total is None else total
    if total <= 0:
        return [1.0] * squares.numel()
    return [min(1.0, float(v)) for v in squares.cumsum(0) / total]


def rank_for_energy(energy: Sequence[float], threshold: float) -> int | None:
    """The smallest k with E(k) ≥ ``threshold`` (k counts from 1), or None when the curve never gets there."""
    for k, e in enumerate(energy, start=1):
        if e >= threshold - ENERGY_SLACK:
            return k
    return None


def factor_singular_values(factors: Factors) -> torch.Tensor:
    """σ of s·B·A (descending, float64, length r), from a QR of each factor and the SVD of an r × r core."""
    return low_rank_svd(factors.scaling * factors.B.double(), factors.A.double())[1]


def weight_shape(factors: Factors) -> list[int]:
    """The adapted weight's [out, in] (an embedding's [num_embeddings, embedding_dim], as its weight is)."""
    out, inp = factors.B.shape[0], factors.A.shape[1]
    return [inp, out] if factors.embedding else [out, inp]


def _entry(name, shape, r, scale, singular_values, total, thresholds) -> dict:
    energy = energy_curve(singular_values, total)
    return {
        "name": name,
        "shape": list(shape),
        "r": r,
        "scale": scale,
        "singular_values": [float(v) for v in singular_values],
        "energy": energy,
        "rank_at": {threshold_key(t): rank_for_energy(energy, t) for t in thresholds},
    }


def _recommended(modules: list[dict], thresholds) -> dict:
    recommended = {}
    for t in thresholds:
        ranks = [m["rank_at"][threshold_key(t)] for m in modules]
        recommended[threshold_key(t)] = None if None in ranks or not ranks else max(ranks)
    return recommended


def adapter_spectrum(
    config: LoraConfig, tensors: dict[str, torch.Tensor], thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict:
    """Per adapted module: ``name``, ``shape`` ([out, in]), ``r``, ``scale`` (s), ``singular_values`` (σ of
    s·B·A, descending), ``energy`` (E(1..r)), ``rank_at`` ({threshold: smallest k with E(k) ≥ threshold}); and
    ``recommended_rank``, the largest ``rank_at`` over modules per threshold. Thresholds are keys like "0.9".
    An expert stack counts each expert as a module (``path[e]``).

    Raises ``ConfigError`` for thresholds outside (0, 1] or an adapter without LoRA factors."""
    thresholds = check_thresholds(thresholds)
    factors = per_expert(adapter_factors(config, tensors)[0])
    if not factors:
        raise ConfigError("the adapter holds no LoRA factors (lora_A / lora_B tensors); nothing to measure")
    modules = [
        _entry(path, weight_shape(f), f.rank, f.scaling, factor_singular_values(f), None, thresholds)
        for path, f in sorted(factors.items())
    ]
    return {"modules": modules, "recommended_rank": _recommended(modules, thresholds)}


# --- full fine-tunes: W_tuned − W_base, streamed ------------------------------------------------------------


@dataclass(frozen=True)
class DeltaSVD:
    """The top singular triplets of one delta: U (out × k), S (k, descending), Vh (k × in), float64 (U and
    Vh None when not asked for); ``total`` = ‖Δ‖_F² exactly; ``method``: ``"exact"`` or ``"randomized"``."""

    U: torch.Tensor | None
    S: torch.Tensor
    Vh: torch.Tensor | None
    total: float
    method: str


RowReader = Callable[[int, int], torch.Tensor]


def _blocks(rows: int, columns: int):
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def delta_svd(
    read_rows: RowReader,
    shape: tuple[int, int],
    k: int,
    *,
    vectors: bool = False,
    seed: int = 0,
    power_iterations: int = 4,
) -> DeltaSVD:
    """The top ``k`` singular values (and vectors, with ``vectors``) of the matrix whose rows ``read_rows(a, b)``
    returns, holding at most one block of rows and the sketches (out × q, in × q) at a time — unless the matrix
    is small (≤ 4M elements) or k is at least half its rank, when it is read whole and decomposed exactly in
    float64. Otherwise a randomized range finder (Halko et al.) with q = k + max(10, k) columns and
    ``power_iterations`` passes, in float32; a zero matrix (``total`` 0) stops after the first pass."""
    rows, columns = shape
    full = min(rows, columns)
    k = max(1, min(k, full))
    if rows * columns <= EXACT_ELEMENTS or 2 * k >= full:
        delta = torch.cat([read_rows(a, b).double() for a, b in _blocks(rows, columns)])
        total = float(delta.square().sum())
        if vectors:
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            return DeltaSVD(U[:, :k], S[:k], Vh[:k], total, "exact")
        return DeltaSVD(None, torch.linalg.svdvals(delta)[:k], None, total, "exact")
    q = min(full, k + max(10, k))
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(columns, q, generator=generator)
    total = 0.0
    Y = torch.empty(rows, q)
    for a, b in _blocks(rows, columns):  # Y = Δ·Ω, and ‖Δ‖² on the way
        block = read_rows(a, b)
        total += float(block.double().square().sum())
        Y[a:b] = block.float() @ omega
    if total == 0:  # unchanged: nothing to decompose, no more passes
        return DeltaSVD(
            torch.zeros(rows, k, dtype=torch.float64) if vectors else None,
            torch.zeros(k, dtype=torch.float64),
            torch.zeros(k, columns, dtype=torch.float64) if vectors else None,
            0.0,
            "randomized",
        )
    for _ in range(power_iterations):
        Q = torch.linalg.qr(Y)[0]
        Z = torch.zeros(columns, q)
        for a, b in _blocks(rows, columns):  # Z = Δᵀ·Q
            Z += read_rows(a, b).float().T @ Q[a:b]
        Qz = torch.linalg.qr(Z)[0]
        for a, b in _blocks(rows, columns):  # Y = Δ·Qz
            Y[a:b] = read_rows(a, b).float() @ Qz
    Q = torch.linalg.qr(Y)[0]
    small = torch.zeros(q, columns, dtype=torch.float64)
    for a, b in _blocks(rows, columns):  # Qᵀ·Δ (q × in)
        small += Q[a:b].double().T @ read_rows(a, b).double()
    U_small, S, Vh = torch.linalg.svd(small, full_matrices=False)
    if not vectors:
        return DeltaSVD(None, S[:k], None, total, "randomized")
    return DeltaSVD(Q.double() @ U_small[:, :k], S[:k], Vh[:k], total, "randomized")


def weight_layout(base: WeightReader, tuned: WeightReader) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of two checkpoints that hold the same tensors with the same shapes.

    Raises ``ConfigError`` when they do not (another architecture or size)."""
    base_keys, tuned_keys = set(base.keys()), set(tuned.keys())
    if base_keys != tuned_keys:
        only = sorted(tuned_keys - base_keys)[:3] or sorted(base_keys - tuned_keys)[:3]
        where = "the tuned model" if tuned_keys - base_keys else "the base model"
        raise ConfigError(
            f"base and tuned models hold different tensors ({', '.join(only)} only in {where}); "
            "the tuned model must be a fine-tune of this base (same architecture and size)"
        )
    layout = {}
    for key in sorted(tuned_keys):
        shape_base, shape_tuned = base.shape(key), tuned.shape(key)
        if shape_base != shape_tuned:
            raise ConfigError(
                f"{key} is {list(shape_tuned)} in the tuned model but {list(shape_base)} in the base; the tuned "
                "model must be a fine-tune of this base (same architecture and size)"
            )
        layout[key] = shape_tuned
    return layout


def changed_others(base: WeightReader, tuned: WeightReader, layout: dict[str, tuple[int, ...]]) -> list[str]:
    """The tensors that are not matrices (norm weights, biases) and differ between the checkpoints."""
    return [key for key, shape in layout.items() if len(shape) != 2 and not torch.equal(base.get(key), tuned.get(key))]


def matrix_changed(base: WeightReader, tuned: WeightReader, key: str, shape: tuple[int, int]) -> bool:
    """Whether the matrix ``key`` differs, compared a block of rows at a time."""
    return any(not torch.equal(base.rows(key, a, b), tuned.rows(key, a, b)) for a, b in _blocks(*shape))


def delta_reader(base: WeightReader, tuned: WeightReader, key: str) -> RowReader:
    """``read_rows(a, b)`` = rows a:b of W_tuned − W_base for ``key``, in float64 (exact for stored floats)."""
    return lambda a, b: tuned.rows(key, a, b).double() - base.rows(key, a, b).double()


def module_of(key: str) -> str:
    """The module path of a weight key (``model.layers.0.mlp.up_proj.weight`` -> ``...up_proj``)."""
    return key.removesuffix(".weight")


def full_finetune_spectrum(
    base: WeightReader,
    tuned: WeightReader,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_rank: int = DEFAULT_MAX_RANK,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """``adapter_spectrum`` for a full fine-tune: every 2-D weight that changed, with ``r`` None,
    ``singular_values`` the top ``max_rank``, ``energy`` relative to the exact ‖ΔW‖_F², ``rank_at`` None
    where max_rank does not reach a threshold; plus ``method`` per module (exact or randomized SVD) and
    ``other_changed`` (tensors that are not matrices: norms, biases). Reads one block of rows at a time.

    Raises ``ConfigError`` when the checkpoints differ in architecture, when nothing changed, or for bad
    thresholds or ``max_rank``."""
    thresholds = check_thresholds(thresholds)
    if max_rank < 1:
        raise ConfigError(f"--max-rank must be at least 1, not {max_rank}")
    layout = weight_layout(base, tuned)
    matrices = [key for key, shape in layout.items() if len(shape) == 2]
    modules = []
    for index, key in enumerate(matrices, start=1):
        if progress is not None:
            progress(f"[{index}/{len(matrices)}] {module_of(key)} {list(layout[key])}")
        svd = delta_svd(delta_reader(base, tuned, key), layout[key], max_rank)
        if svd.total == 0:
            continue  # unchanged
        entry = _entry(module_of(key), layout[key], None, None, svd.S, svd.total, thresholds)
        del entry["scale"]
        entry["method"] = svd.method
        modules.append(entry)
    if not modules:
        raise ConfigError("no weight matrix differs between the base and the tuned model; nothing to measure")
    return {
        "modules": modules,
        "recommended_rank": _recommended(modules, thresholds),
        "other_changed": changed_others(base, tuned, layout),
    }
