"""Combine adapters of one base model into one adapter: pure functions from (config, tensors) pairs to a
(config, tensors) pair, no model needed.

Adapter i changes a module by Δᵢ = sᵢ·Bᵢ·Aᵢ (sᵢ = alpha/r or alpha/√r with rsLoRA, after rank_pattern and
alpha_pattern). The result is written with lora_alpha = r for every module (alpha_pattern = rank_pattern,
no rsLoRA), so its scaling is 1 and whatever scale a method needs is folded into the factors. A module
that only some inputs adapt counts as Δ = 0 in the others. Embedding adapters are mixed the same way
(their Δ = B·A is embedding_dim × num_embeddings).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.convert import output_format, read_any, write_any
from loratune.adapters.factors import (
    Factors,
    adapter_factors,
    balanced_factors,
    is_expert_key,
    low_rank_svd,
    numerical_rank,
    per_expert,
    restack,
    unit_scaling_fields,
)
from loratune.adapters.peft_keys import is_base_copy_key
from loratune.errors import ConfigError
from loratune.outputs import guard_output, refuse_aliasing
from loratune.validation import closest

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
RANK_METHODS = ("svd", *DENSITY_METHODS)
SIGN_METHODS = ("total", "frequency")
FULL_RANK = "full"  # rank= for the density methods: keep the numerical rank (exact)

# One copy of the definitions, shown by ``loratune mix --help`` and appended to ``mix_adapters.__doc__``.
METHOD_DEFINITIONS = """\
methods (wᵢ: the weight given to adapter i; Δᵢ = sᵢ·Bᵢ·Aᵢ its delta; τᵢ = wᵢ·Δᵢ):
  cat              the exact weighted sum Σ τᵢ. A = [A₁; A₂; ...] (rows), B = [w₁s₁B₁, w₂s₂B₂, ...]
                   (columns): ranks add up. Any ranks, rsLoRA and rank/alpha patterns.
  svd              the best rank-R approximation (truncated SVD) of Σ τᵢ, computed from the factors (QR of
                   the stacked factors + SVD of a small core; the dense delta is never formed). R = --rank,
                   default the largest input rank. Prints the energy kept, Σ kept σ² / Σ σ².
  linear           PEFT's add_weighted_adapter(combination_type="linear"): with cᵢ = wᵢ·sᵢ,
                   A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ and B = Σ √|cᵢ|·Bᵢ. Needs equal ranks per module. Only
                   approximates the weighted sum: B·A also holds the cross terms Bᵢ·Aⱼ.
  magnitude_prune  Σ trim(τᵢ): trim keeps the ⌊density·n⌋ entries of largest magnitude, zeroes the rest.
  ties             TIES-Merging: trim each τᵢ as above; elect a sign per entry, γ = sign(Σᵢ trim(τᵢ))
                   ("total", the paper's rule; --majority-sign frequency: γ = sign(Σᵢ sign(trim(τᵢ)))),
                   γ = + where the sum is 0; result = mean of the trimmed entries whose sign is γ (0 if none).
  dare_linear      DARE: drop each entry of τᵢ with probability 1 − density, multiply the kept ones by
                   1/density, then sum. Seeded (--seed): the mask of adapter i in module M depends only on
                   (seed, M, i).
  dare_ties        DARE drop-and-rescale instead of trim, then TIES sign election and disjoint mean.
The last four act on the full out × in deltas τᵢ and factorise the result by SVD: rank R = --rank, default
the sum of the input ranks in that module (the inputs' size together; the energy kept is printed).
--rank full keeps the numerical rank (singular values above σ₁·max(out, in)·ε_float32), which is exact but
can be as large as min(out, in): hundreds of MB for a small model. Where PEFT differs: its
ties/dare_*/magnitude_prune act on A and B separately (ours: on the deltas, like its *_svd variants); it elects the
sign from unweighted deltas
(ours: from wᵢ·Δᵢ, so a negative weight votes with its sign); its DARE masks are unseeded.
modules_to_save: carried over when every input has identical tensors for them; anything else is refused.
"""


@dataclass(frozen=True)
class MixResult:
    """The mixed adapter (``config``, PEFT-keyed ``tensors``), the rank of each module, and — for methods
    that truncate an SVD — the share of each module's ‖Δ‖² kept (``energy``) and of all modules together."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    energy: dict[str, float]
    energy_total: float | None


# --- the methods, one module at a time (float64 math) -------------------------------------------------------


def _cat(parts):
    A = torch.cat([f.A.double() for _, f in parts], dim=0)
    B = torch.cat([w * f.scaling * f.B.double() for w, f in parts], dim=1)
    return A, B


def _linear(parts, path):
    ranks = {f.rank for _, f in parts}
    if len(ranks) > 1:
        raise ConfigError(
            f"method linear needs equal ranks, but {path} has ranks {sorted(ranks)}; use cat (exact) or svd"
        )
    A = B = 0
    for w, f in parts:
        c = w * f.scaling
        sign = 1.0 if c >= 0 else -1.0
        A = A + sign * math.sqrt(abs(c)) * f.A.double()
        B = B + math.sqrt(abs(c)) * f.B.double()
    return A, B


def trim(task: torch.Tensor, density: float) -> torch.Tensor:
    """``task`` with all but its ⌊density·n⌋ largest-magnitude entries set to zero."""
    if density >= 1:
        return task
    k = int(density * task.numel())
    mask = torch.zeros(task.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(task.abs().flatten(), k).indices] = True
    return task * mask.view(task.shape)


def dare_keep_mask(shape: tuple[int, ...], density: float, seed: int, module: str, index: int) -> torch.Tensor:
    """DARE's random mask for input ``index`` in ``module``: each entry kept with probability ``density``.
    Depends only on (seed, module, index), so the same inputs give the same masks whatever else is mixed."""
    digest = hashlib.sha256(f"{seed}/{module}/{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(shape, generator=generator, dtype=torch.float64) < density


def dare(task: torch.Tensor, density: float, seed: int, module: str, index: int) -> torch.Tensor:
    """DARE: drop entries with probability 1 − density, rescale the kept ones by 1/density."""
    if density >= 1:
        return task
    return task * dare_keep_mask(task.shape, density, seed, module, index) / density


def disjoint_mean(tasks: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES sign election and disjoint mean over ``tasks`` (stacked on dim 0)."""
    votes = tasks.sum(0) if majority_sign == "total" else tasks.sign().sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = tasks.sign() == elected
    return (tasks * agree).sum(0) / agree.sum(0).clamp(min=1)


def _dense(method, parts, path, density, seed, majority_sign):
    tasks = [(i, w * f.scaling * (f.B.double() @ f.A.double())) for i, w, f in parts]  # out × in each
    if method == "magnitude_prune":
        return sum(trim(t, density) for _, t in tasks)
    if method == "dare_linear":
        return sum(dare(t, density, seed, path, i) for i, t in tasks)
    if method == "ties":
        return disjoint_mean(torch.stack([trim(t, density) for _, t in tasks]), majority_sign)
    return disjoint_mean(torch.stack([dare(t, density, seed, path, i) for i, t in tasks]), majority_sign)


# --- checks -------------------------------------------------------------------------------------------------


def check_options(
    method: str, n_adapters: int, rank: int | str | None, density: float | None, majority_sign: str
) -> None:
    """Raise ``ConfigError`` (one line, saying what to do) for an unknown method or options it cannot use."""
    if method not in METHODS:
        hint = closest(method, METHODS)
        suggestion = f"did you mean '{hint}'? " if hint else ""
        raise ConfigError(f"unknown mix method {method!r}; {suggestion}methods: {', '.join(METHODS)}")
    if n_adapters < 1:
        raise ConfigError("mix needs at least one adapter (one adapter with a weight rescales it)")
    if rank is not None and method not in RANK_METHODS:
        raise ConfigError(f"--rank applies to {', '.join(RANK_METHODS)}; {method} fixes the rank itself")
    if rank == FULL_RANK and method not in DENSITY_METHODS:
        raise ConfigError(f"rank {FULL_RANK!r} applies to {', '.join(DENSITY_METHODS)}; give svd a number")
    if rank is not None and rank != FULL_RANK and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer or {FULL_RANK!r}, got {rank!r}")
    if method in DENSITY_METHODS:
        if density is None:
            raise ConfigError(f"method {method} needs a density: the fraction of entries kept, in (0, 1]")
        if not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    elif density is not None:
        raise ConfigError(f"density applies to {', '.join(DENSITY_METHODS)}, not to {method}")
    if majority_sign not in SIGN_METHODS:
        raise ConfigError(f"majority_sign must be one of {', '.join(SIGN_METHODS)}, got {majority_sign!r}")


def _check_same_base(configs: Sequence[LoraConfig], names: Sequence[str]) -> None:
    bases = {c.base_model_name_or_path: n for c, n in zip(configs, names) if c.base_model_name_or_path}
    if len(bases) > 1:
        listed = ", ".join(f"{b!r} ({n})" for b, n in bases.items())
        raise ConfigError(f"the adapters were trained on different base models: {listed}; mix adapters of one base")


def _check_shapes(factor_sets: Sequence[dict[str, Factors]], names: Sequence[str]) -> None:
    seen: dict[str, tuple] = {}
    for factors, name in zip(factor_sets, names):
        for path, f in factors.items():
            shape = (f.embedding, f.B.shape[0], f.A.shape[1], f.kernel)
            first = seen.setdefault(path, (shape, name))
            if first[0] != shape:
                raise ConfigError(
                    f"{path} is {shape[1]} × {shape[2]} in {name} but {first[0][1]} × {first[0][2]} in {first[1]} "
                    "(or a different layer type): the adapters are for different base models"
                )


def _common_others(other_sets: Sequence[dict], configs: Sequence[LoraConfig], names: Sequence[str]) -> dict:
    """The tensors besides the factors: modules_to_save copies, which every input must have identical (else
    ``ConfigError``), and base-weight copies, kept from whichever input has them (identical where shared)."""
    base_copies: dict[str, tuple[torch.Tensor, str]] = {}
    trained = []
    for others, name in zip(other_sets, names):
        for key, tensor in others.items():
            if is_base_copy_key(key):  # PEFT saves adapted embeddings' base weights (resized vocabularies)
                first = base_copies.setdefault(key, (tensor, name))
                if not torch.equal(first[0], tensor):
                    raise ConfigError(f"{first[1]} and {name} carry different base weights {key}: different bases")
        trained.append({k: t for k, t in others.items() if not is_base_copy_key(k)})
    first, first_config = trained[0], configs[0]
    for others, config, name in zip(trained[1:], configs[1:], names[1:]):
        same_modules = sorted(config.modules_to_save or []) == sorted(first_config.modules_to_save or [])
        differing = sorted(others.keys() ^ first.keys()) or [k for k in first if not torch.equal(first[k], others[k])]
        if differing or not same_modules:
            what = differing[0] if differing else "modules_to_save"
            raise ConfigError(
                f"{names[0]} and {name} differ in {what}: mix cannot combine fully trained modules "
                "(modules_to_save); mix adapters whose modules_to_save tensors are identical, or none"
            )
    return {**first, **{key: tensor for key, (tensor, _) in base_copies.items()}}


# --- the mixed config ---------------------------------------------------------------------------------------


_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _targeting(configs: Sequence[LoraConfig], paths: list[str]) -> dict:
    """Targeting fields that select exactly ``paths``: the inputs' own when they agree, the union of plain
    name lists, else the full module paths."""
    first = {field: getattr(configs[0], field) for field in _TARGETING}
    if all({field: getattr(c, field) for field in _TARGETING} == first for c in configs):
        return first
    plain = all(
        isinstance(c.target_modules, list) and c.exclude_modules is None and c.layers_to_transform is None
        for c in configs
    )
    names = sorted({name for c in configs for name in c.target_modules}) if plain else sorted(paths)
    return {"target_modules": names, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}


def _mixed_config(configs: Sequence[LoraConfig], ranks: dict[str, int], stacks: set[str]) -> LoraConfig:
    """The mixed adapter's config: ranks with unit scaling, targeting that selects its modules (expert ``stacks``
    stay selected by ``target_parameters``: every input's)."""
    modules = sorted(path for path in ranks if path not in stacks)
    parameters = sorted({name for c in configs for name in c.target_parameters or ()}) or None
    update = {**unit_scaling_fields(ranks), **_targeting(configs, modules), "target_parameters": parameters}
    return configs[0].model_copy(update=update)


# --- public API ---------------------------------------------------------------------------------------------


def mix_adapters(
    adapters: Sequence[tuple[LoraConfig, dict[str, torch.Tensor]]],
    weights: Sequence[float],
    method: str = "cat",
    *,
    rank: int | str | None = None,
    density: float | None = None,
    seed: int = 0,
    majority_sign: str = "total",
    names: Sequence[str] | None = None,
) -> MixResult:
    """Combine ``adapters`` (``(config, PEFT-keyed tensors)`` pairs of one base model) with ``weights``.

    Returns a ``MixResult`` whose config and tensors form an ordinary PEFT LoRA adapter (scaling 1 in every
    module) that reproduces the combined delta. ``names`` label the inputs in error messages. Factors come
    back in the inputs' common dtype (float32 when they differ); the math runs in float64. ``rank``: see the
    definitions below (``"full"``: exact, for the density methods). Warns when the result is more than
    ``LARGE_RESULT_FACTOR`` times the size of its inputs.
    Raises ``ConfigError`` for an unknown method, options it cannot use, adapters of different bases or
    shapes, unequal ranks with ``linear``, and modules_to_save tensors that differ between inputs.
    """
    check_options(method, len(adapters), rank, density, majority_sign)
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    configs = [config for config, _ in adapters]
    for config, name in zip(configs, names):
        if config.use_dora:
            raise ConfigError(
                f"{name} is a DoRA adapter: its change to a weight depends on the base weight and its magnitudes, "
                "so no mix method combines it from the factors; load the adapters together with strengths instead"
            )
    _check_same_base(configs, names)
    split = [adapter_factors(config, tensors, name) for (config, tensors), name in zip(adapters, names)]
    factor_sets = [per_expert(factors) for factors, _ in split]  # an expert stack mixes expert by expert
    _check_shapes(factor_sets, names)
    others = _common_others([o for _, o in split], configs, names)
    dtypes = {f.A.dtype for factors in factor_sets for f in factors.values()} | {
        f.B.dtype for factors in factor_sets for f in factors.values()
    }
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    default_rank = max(f.rank for factors in factor_sets for f in factors.values())

    tensors, ranks, energy, experts = {}, {}, {}, {}
    kept = total = 0.0
    paths = sorted({path for factors in factor_sets for path in factors})
    for path in paths:
        parts = [(i, w, factors[path]) for i, (w, factors) in enumerate(zip(weights, factor_sets)) if path in factors]
        weighted = [(w, f) for _, w, f in parts]
        if method == "cat":
            A, B = _cat(weighted)
        elif method == "linear":
            A, B = _linear(weighted, path)
        else:
            if method == "svd":
                U, S, Vh = low_rank_svd(*reversed(_cat(weighted)))
                k = rank or default_rank
            else:
                delta = _dense(method, parts, path, density, seed, majority_sign)
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                if rank == FULL_RANK:
                    k = numerical_rank(S, tuple(delta.shape))
                else:
                    k = rank or sum(f.rank for _, f in weighted)
            A, B, energy[path] = balanced_factors(U, S, Vh, k)
            squares = float((S**2).sum())
            kept, total = kept + energy[path] * squares, total + squares
        if is_expert_key(path):
            experts[path] = (A, B)
        else:
            tensors.update(parts[0][2].tensors(path, A, B, dtype))
            ranks[path] = A.shape[0]
    stacks, stack_ranks = restack(experts, dtype)
    tensors.update(stacks)
    ranks.update(stack_ranks)
    _check_stack_ranks(stack_ranks, ranks)
    _warn_if_much_larger(tensors, factor_sets)
    tensors.update(others)
    energy_total = (kept / total if total > 0 else 1.0) if energy else None
    return MixResult(_mixed_config(configs, ranks, set(stack_ranks)), tensors, ranks, energy, energy_total)


def _check_stack_ranks(stack_ranks: dict[str, int], ranks: dict[str, int]) -> None:
    """``ConfigError`` unless every mixed expert stack has the mixed adapter's common rank: another rank would go in
    ``rank_pattern`` under the parameter's name, which an adapter's factors do not carry."""
    common = unit_scaling_fields(ranks)["r"] if ranks else None
    odd = sorted({k for k in stack_ranks.values() if k != common})
    if odd:
        raise ConfigError(
            f"the mixed expert stacks came out with rank {odd[0]}, the other modules with {common}; "
            "give a rank (--rank) so that every module gets the same"
        )


LARGE_RESULT_FACTOR = 4  # a result this many times its inputs' size gets a warning


def _warn_if_much_larger(tensors: dict[str, torch.Tensor], factor_sets: Sequence[dict[str, Factors]]) -> None:
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    inputs = sum(t.numel() * t.element_size() for fs in factor_sets for f in fs.values() for t in (f.A, f.B))
    if inputs and size > LARGE_RESULT_FACTOR * inputs:
        warnings.warn(
            f"the mixed adapter's factors take {size / 1e6:.1f} MB, {size / inputs:.0f}× its inputs' "
            f"{inputs / 1e6:.1f} MB; give a rank (--rank R) for a smaller approximation (the energy kept is "
            "reported)",
            stacklevel=3,
        )


mix_adapters.__doc__ += "\n" + METHOD_DEFINITIONS  # the exact definitions, kept in one place


def mix_adapter_dirs(
    inputs: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    method: str = "cat",
    *,
    rank: int | str | None = None,
    density: float | None = None,
    seed: int = 0,
    majority_sign: str = "total",
    compress: str | None = None,
    overwrite: bool = False,
    format: str | None = None,
) -> MixResult:
    """Read the adapters of ``inputs`` (``(path, weight)`` pairs: PEFT directories or kohya ``.safetensors``
    files), mix them with ``mix_adapters`` and write the result at ``out`` in ``format`` (``"peft"``: a new
    adapter directory, int8-compressed with ``compress="int8"``; ``"kohya"``: a ``.safetensors`` file keeping
    the first input's metadata; default: the inputs' format). An earlier output is replaced only with
    ``overwrite`` (see ``write_adapter_dir``).

    Returns the ``MixResult``. Raises ``ConfigError`` / ``AdapterLoadError`` for bad options, inputs or
    output path; nothing is written then.
    """
    check_options(method, len(inputs), rank, density, majority_sign)
    refuse_aliasing(out, [("the adapter", path) for path, _ in inputs], "the output")
    adapters = [read_any(path) for path, _ in inputs]
    fmt = output_format(adapters, format, out)
    with guard_output(
        out, kind="file" if fmt == "kohya" else "directory", overwrite=overwrite, record_kind="kohya-lora"
    ):
        result = mix_adapters(
            [(a.config, a.tensors) for a in adapters],
            [w for _, w in inputs],
            method,
            rank=rank,
            density=density,
            seed=seed,
            majority_sign=majority_sign,
            names=[str(path) for path, _ in inputs],
        )
        write_any(
            out,
            result.config,
            result.tensors,
            fmt,
            metadata=adapters[0].metadata,
            overwrite=overwrite,
            compress=compress,
        )
    return result


__all__ = [
    "METHODS",
    "METHOD_DEFINITIONS",
    "MixResult",
    "dare_keep_mask",
    "mix_adapter_dirs",
    "mix_adapters",
]
