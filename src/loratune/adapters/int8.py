"""Compressed adapters: A and B stored as int8 with one float32 scale per row (symmetric absmax).

For a factor ``X`` (A: r × in, B: out × r) and each row ``i``::

    scale_i = max_j |X_ij| / 127        q_ij = round(X_ij / scale_i) ∈ [−127, 127]        X̂_ij = q_ij · scale_i

so every element comes back within ``scale_i / 2`` of the original. The tensors live in their own file,
``adapter_model.int8.safetensors`` (never next to an ``adapter_model.safetensors``), so PEFT finds no weights
and fails instead of misreading int8 codes as LoRA factors. Each factor ``KEY`` is stored as ``KEY`` (int8)
and ``KEY.row_scale`` (float32, one per row); other tensors (modules_to_save copies) are stored unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from loratune.adapters.peft_keys import is_factor_key
from loratune.errors import AdapterLoadError
from loratune.files import reading

INT8_WEIGHTS_NAME = "adapter_model.int8.safetensors"
SCALE_SUFFIX = ".row_scale"
FORMAT_KEY = "loratune_compression"
FORMAT = "int8-rowwise-absmax"
DTYPE_KEY = "loratune_factor_dtype"  # the factors' dtype before compression; loading returns it
_QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 codes shaped like ``x`` (2-D) and one float32 scale per row (0 for a zero row)."""
    x = x.detach().float()
    scale = x.abs().amax(dim=1) / _QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row stays zero
    q = torch.round(x / safe[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` per row, in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def compress_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of the int8 file for PEFT-keyed adapter ``tensors``.

    Raises ``ValueError`` when the factors do not share one floating dtype (nothing to restore to).
    """
    factor_dtypes = {t.dtype for k, t in tensors.items() if is_factor_key(k)}
    if len(factor_dtypes) != 1 or not next(iter(factor_dtypes)).is_floating_point:
        raise ValueError(f"int8 compression needs float factors of one dtype, found {sorted(map(str, factor_dtypes))}")
    stored = {}
    for key, tensor in tensors.items():
        if is_factor_key(key):
            stored[key], stored[key + SCALE_SUFFIX] = quantize_rows(tensor)
        else:
            stored[key] = tensor.contiguous()
    dtype = str(next(iter(factor_dtypes))).removeprefix("torch.")
    return stored, {"format": "pt", FORMAT_KEY: FORMAT, DTYPE_KEY: dtype}


def read_int8_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of the int8 file at ``path``, dequantized to the dtype they were saved from.

    Raises ``AdapterLoadError`` when the file is not a loratune int8 adapter file or a scale is missing.
    """
    with reading(path, "adapter weights", AdapterLoadError), safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get(FORMAT_KEY) != FORMAT:
            raise AdapterLoadError(f"{path} is not a loratune int8 adapter file ({FORMAT_KEY}={FORMAT!r} missing)")
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    dtype = getattr(torch, metadata.get(DTYPE_KEY, "float32"))
    tensors = {}
    for key, tensor in stored.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if is_factor_key(key):
            scale = stored.get(key + SCALE_SUFFIX)
            if scale is None or tensor.dtype != torch.int8:
                raise AdapterLoadError(f"{path}: factor {key} is not int8 with a {SCALE_SUFFIX} tensor")
            tensors[key] = dequantize_rows(tensor, scale, dtype)
        else:
            tensors[key] = tensor
    return tensors
