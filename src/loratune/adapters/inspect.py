"""What an adapter directory holds, read from its config and tensor headers (no weights loaded)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from safetensors import safe_open

from loratune.adapters.int8 import DTYPE_KEY, INT8_WEIGHTS_NAME, SCALE_SUFFIX
from loratune.adapters.peft_format import WEIGHTS_NAME, read_adapter_config
from loratune.adapters.peft_keys import parse_factor_key
from loratune.errors import AdapterLoadError
from loratune.files import reading

def describe_adapter(path: str | os.PathLike) -> dict:
    """A summary of the PEFT adapter at ``path``: ``base_model``, ``r``, ``lora_alpha``, ``target_modules``,
    ``trainable_params``, ``size_bytes`` and more (modules, ranks found in the tensors, dtype, and
    ``compression``: ``"int8"`` for an int8-compressed adapter, else None).

    Raises ``AdapterLoadError`` when ``path`` is not a readable adapter directory.
    """
    directory = Path(path)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    compression = None
    if not weights.is_file() and (directory / INT8_WEIGHTS_NAME).is_file():
        weights, compression = directory / INT8_WEIGHTS_NAME, "int8"
    params, dtypes, modules, ranks = 0, set(), set(), set()
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
                modules.add(parsed.path)
                ranks.add(shape[0])
    return {
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
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "task_type": config.task_type,
        "n_modules": len(modules),
        "ranks": sorted(ranks),
        "trainable_params": params,
        "dtype": ", ".join(sorted(dtypes)) + (f" (loads as {restored_dtype})" if compression else ""),
        "compression": compression,
        "size_bytes": weights.stat().st_size,
    }
