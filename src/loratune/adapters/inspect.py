"""What an adapter holds: a PEFT directory read from its config and tensor headers (no weights loaded), or a
kohya file (image-model LoRA) read whole — such files are a few to a few hundred MB."""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

from loratune.adapters.convert import is_diffusers_file, read_any
from loratune.adapters.int8 import DTYPE_KEY, INT8_WEIGHTS_NAME, SCALE_SUFFIX
from loratune.adapters.kohya import COMPONENTS, is_kohya_path, module_ranks_and_alphas, split_name
from loratune.adapters.peft_format import WEIGHTS_NAME, read_adapter_config
from loratune.adapters.peft_keys import parse_factor_key
from loratune.errors import AdapterLoadError
from loratune.files import reading

PEFT_FIELDS = (
    "base_model",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "lora_dropout",
    "init_lora_weights",
    "target_modules",
    "modules_to_save",
    "target_parameters",
    "n_modules",
    "ranks",
    "experts",
    "trainable_params",
    "dtype",
    "compression",
    "size_bytes",
)
KOHYA_FIELDS = (
    "base_model",
    "base_model_version",
    "network_module",
    "components",
    "n_modules",
    "conv_modules",
    "r",
    "lora_alpha",
    "ranks",
    "alphas",
    "trainable_params",
    "dtype",
    "size_bytes",
    "output_name",
    "training_comment",
)


def describe_adapter(path: str | os.PathLike) -> dict:
    """A summary of the adapter at ``path`` (a PEFT directory or a kohya ``.safetensors`` file): ``format``,
    ``base_model``, ``r``, ``lora_alpha``, ``target_modules``, ``trainable_params``, ``size_bytes`` and more
    (PEFT: modules, ranks found in the tensors, dtype, ``compression``: ``"int8"`` for an int8-compressed
    adapter, else None; kohya: see ``describe_kohya``).

    Raises ``AdapterLoadError`` when ``path`` is not a readable adapter.
    """
    if is_kohya_path(path):
        return describe_kohya(path)
    directory = Path(path)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    compression = None
    if not weights.is_file() and (directory / INT8_WEIGHTS_NAME).is_file():
        weights, compression = directory / INT8_WEIGHTS_NAME, "int8"
    params, dtypes, ranks = 0, set(), {}  # ranks: module path -> rows of its A
    if not weights.is_file():
        raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME}")
    with reading(weights, "adapter weights", AdapterLoadError), safe_open(str(weights), framework="pt") as handle:
        restored_dtype = (handle.metadata() or {}).get(DTYPE_KEY)
        for key in handle.keys():
            if compression and key.endswith(SCALE_SUFFIX):
                continue  # per-row scales: storage, not parameters
            tensor = handle.get_slice(key)
            shape = tensor.get_shape()
            params += math.prod(shape)
            dtypes.add(str(tensor.get_dtype()))
            parsed = parse_factor_key(key)
            if parsed is not None and parsed.factor == "A":
                ranks[parsed.path] = shape[0]
    experts = expert_summary(config, directory) if config.target_parameters else None
    stacks = experts["stacks"] if experts else {}
    module_ranks = {r for path, r in ranks.items() if path not in stacks}  # a stack's A holds E·r rows, not r
    return {
        "format": "peft",
        "path": str(directory),
        "base_model": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "lora_dropout": config.lora_dropout,
        "init_lora_weights": config.init_lora_weights,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "target_parameters": config.target_parameters,
        "experts": experts and experts["text"],
        "expert_stacks": experts and experts["stacks"],
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "task_type": config.task_type,
        "n_modules": len(ranks),
        "ranks": sorted(module_ranks | {v["r"] for v in stacks.values()}),
        "trainable_params": params,
        "dtype": ", ".join(sorted(dtypes)) + (f" (loads as {restored_dtype})" if compression else ""),
        "compression": compression,
        "size_bytes": weights.stat().st_size,
    }


def expert_summary(config, directory: Path) -> dict | None:
    """The expert stacks of a ``target_parameters`` adapter: per stack its experts' ranks and ‖ΔW_e‖_F (the size
    of each expert's update; 0 for an expert training never routed a token to), and one line saying it. None
    without stacks."""
    from loratune.adapters.factors import adapter_factors
    from loratune.adapters.peft_format import read_adapter

    _, tensors = read_adapter(directory)
    stacks = {path: f for path, f in adapter_factors(config, tensors, str(directory))[0].items() if f.experts}
    if not stacks:
        return None
    report, norms = {}, []
    for path, f in sorted(stacks.items()):
        E, r = f.experts, f.rank
        A_e = f.A.double().view(E, r, -1)
        B_e = f.B.double().view(f.B.shape[0], r, E).permute(2, 0, 1)
        # ‖B_e A_e‖_F² = trace((B_eᵀB_e)(A_e A_eᵀ)): r × r products, never out × in
        squares = torch.einsum("eij,eji->e", B_e.transpose(1, 2) @ B_e, A_e @ A_e.transpose(1, 2)).clamp_min(0)
        stack_norms = (f.scaling * squares.sqrt()).tolist()
        norms += stack_norms
        report[path] = {"experts": E, "r": r, "norms": stack_norms}
    untrained = sum(1 for n in norms if n == 0)
    text = (
        f"{len(stacks)} stacks of {', '.join(sorted({str(v['experts']) for v in report.values()}))} experts; "
        f"‖ΔW_e‖ min {min(norms):.3g}, median {statistics.median(norms):.3g}, max {max(norms):.3g}"
        + (f"; {untrained} experts unchanged (never routed to in training?)" if untrained else "")
    )
    return {"stacks": report, "text": text}


def describe_kohya(path: str | os.PathLike) -> dict:
    """A summary of the kohya file (or diffusers single-file LoRA, described by the kohya file it converts
    to) at ``path``: the PEFT summary's keys where they apply (``r`` and
    ``lora_alpha`` the most common; ``target_modules`` the kohya names), the ``components`` adapted with their
    module counts, ``conv_modules`` (LoCon), every distinct rank and alpha, and the ``ss_*`` training settings
    (``metadata``)."""
    adapter = read_any(path)
    ranks, alphas = module_ranks_and_alphas(adapter.config, adapter.tensors, str(path))
    components = Counter(COMPONENTS[split_name(name)[0]] for name in ranks)
    metadata = adapter.metadata
    conv = sum(1 for key, t in adapter.tensors.items() if t.ndim > 2 and key.endswith("lora_A.weight"))
    return {
        "format": "diffusers" if is_diffusers_file(path) else "kohya",
        "path": str(path),
        "base_model": metadata.get("ss_sd_model_name"),
        "base_model_version": metadata.get("ss_base_model_version"),
        "network_module": metadata.get("ss_network_module"),
        "components": dict(sorted(components.items())),
        "r": adapter.config.r,
        "lora_alpha": adapter.config.lora_alpha,
        "target_modules": sorted(ranks),
        "n_modules": len(ranks),
        "conv_modules": conv,
        "ranks": sorted(set(ranks.values())),
        "alphas": sorted(set(alphas.values())),
        "trainable_params": sum(t.numel() for t in adapter.tensors.values()),
        "dtype": ", ".join(sorted({str(t.dtype) for t in adapter.tensors.values()})),
        "size_bytes": Path(path).stat().st_size,
        "output_name": metadata.get("ss_output_name"),
        "training_comment": metadata.get("ss_training_comment"),
        "metadata": {k: v for k, v in sorted(metadata.items()) if k.startswith("ss_")},
    }
