"""A LoRA adapter from a full fine-tune: per changed weight matrix, the truncated SVD of W_tuned − W_base;
changed tensors that are not matrices (norms, biases) go whole into ``modules_to_save``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.factors import unit_scaling_fields
from loratune.adapters.peft_keys import factor_keys, module_key
from loratune.analysis.resize import check_rank_or_energy
from loratune.analysis.similarity import TRANSPOSED_KINDS
from loratune.analysis.spectrum import (
    DEFAULT_MAX_RANK,
    changed_others,
    delta_reader,
    delta_svd,
    energy_curve,
    matrix_changed,
    module_of,
    rank_for_energy,
    weight_layout,
)
from loratune.analysis.weights import WeightReader
from loratune.errors import ConfigError

LORA_KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class ExtractResult:
    """The extracted adapter (``config``, PEFT-keyed ``tensors``); per LoRA module ``name``, ``shape``, ``k``,
    ``energy`` (E(k)) and ``method`` (exact or randomized SVD); ``modules_to_save`` (saved whole) and
    ``unchanged`` (how many weight matrices LoRA could take did not change)."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    modules: list[dict]
    modules_to_save: list[str]
    unchanged: int


def _named(path: str, names: Sequence[str]) -> bool:
    return any(path == name or path.endswith("." + name) for name in names)


def _module_tensors(reader: WeightReader, path: str) -> list[str]:
    """The keys of the module at ``path``'s own tensors (``path.weight``, ``path.bias``; not its children's)."""
    return [key for key in reader.keys() if key.startswith(path + ".") and "." not in key[len(path) + 1 :]]


def extract_adapter(
    base: WeightReader,
    tuned: WeightReader,
    kinds: dict[str, str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    save_modules: Sequence[str] = (),
    tied: tuple[str, str] | None = None,
    base_model_name: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    progress: Callable[[str], None] | None = None,
) -> ExtractResult:
    """The adapter whose updates are the truncated SVDs of each changed weight matrix (rank k = min(``rank``,
    out, in), or the smallest k ≤ ``max_rank`` with E(k) ≥ ``energy``), scaling 1 in every module.

    ``kinds``: {module path: "linear" | "conv1d" | "embedding"} for the modules LoRA can adapt (from the
    model's structure); a changed matrix of any other module, every module named in ``save_modules`` (exact
    path or dotted suffix) and every module with a changed tensor that is not a matrix go to
    ``modules_to_save`` with all their tensors. ``tied`` = (input embedding path, output head path) when the
    two share one weight: its change is decomposed once and written for both. Reads one block of rows at a
    time, so memory stays near one weight matrix and the sketches.

    Raises ``ConfigError`` for a bad rank/energy, checkpoints of different architectures, or no change."""
    check_rank_or_energy(rank, energy)
    if max_rank < 1:
        raise ConfigError(f"--max-rank must be at least 1, not {max_rank}")
    layout = weight_layout(base, tuned)
    matrices = [key for key, shape in layout.items() if len(shape) == 2]
    # the module that owns a changed norm weight or bias; changed matrices LoRA does not take (or named)
    saved = {key.rsplit(".", 1)[0] for key in changed_others(base, tuned, layout)}
    saved |= {
        module_of(key)
        for key in matrices
        if (_named(module_of(key), save_modules) or kinds.get(module_of(key)) not in LORA_KINDS)
        and matrix_changed(base, tuned, key, layout[key])
    }
    if tied is not None and tied[0] in saved:
        saved.add(tied[1])  # the head shares the embedding's weight: a saved copy must carry both
    lora = [key for key in matrices if module_of(key) not in saved]

    tensors: dict[str, torch.Tensor] = {}
    modules, ranks, unchanged = [], {}, 0
    for index, key in enumerate(lora, start=1):
        path, shape = module_of(key), layout[key]
        if progress is not None:
            progress(f"[{index}/{len(lora)}] {path} {list(shape)}")
        want = min(rank, *shape) if rank is not None else min(max_rank, *shape)
        svd = delta_svd(delta_reader(base, tuned, key), shape, want, vectors=True)
        if svd.total == 0:
            unchanged += 1
            continue
        k = want
        if energy is not None:
            k = rank_for_energy(energy_curve(svd.S, svd.total), energy) or want
        root = svd.S[:k].sqrt()
        left, right = svd.U[:, :k] * root, root[:, None] * svd.Vh[:k]  # stored weight ≈ left·right
        targets = [(path, kinds[path])]
        if tied is not None and path == tied[0]:
            targets.append((tied[1], "linear"))
        for target, kind in targets:
            # s·B·A is [out, in]; Conv1D and embedding weights store its transpose
            B, A = (right.T, left.T) if kind in TRANSPOSED_KINDS else (left, right)
            a_key, b_key = factor_keys(target, kind == "embedding")
            tensors[a_key], tensors[b_key] = A.float().contiguous(), B.float().contiguous()
            ranks[target] = k
        kept = energy_curve(svd.S[:k], svd.total)[-1]
        modules.append({"name": path, "shape": list(shape), "k": k, "energy": kept, "method": svd.method})
    for path in sorted(saved):
        for key in _module_tensors(tuned, path):
            tensors[module_key(path, key[len(path) + 1 :])] = tuned.get(key)
    if not ranks and not saved:
        raise ConfigError("the tuned model equals the base; there is nothing to extract")
    if not ranks:
        raise ConfigError(
            f"no changed weight matrix is left for LoRA (changed and saved whole: "
            f"{', '.join(sorted(saved)[:5])}); merge-style copies need no adapter"
        )
    config = LoraConfig(
        **unit_scaling_fields(ranks),
        target_modules=sorted(ranks),
        modules_to_save=sorted(saved) or None,
        task_type=task_type,
        base_model_name_or_path=base_model_name,
    )
    return ExtractResult(config, tensors, modules, sorted(saved), unchanged)
