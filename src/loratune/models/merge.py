"""Merging adapters into their base and writing the result as a plain Hugging Face model directory.

The base is loaded at its stored precision (or at the output's, when that is wider), never rounded through a
compute dtype: ``W0 + Σ strength·s·B·A`` is added in float32 and written in the stored dtype unless another is
asked for. A 4-bit base is dequantized to float32 for the merge and written in bf16 (or re-quantized, with the
error that adds reported), see ``merge_4bit``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.adapters import load_adapter, read_adapter_config, unload
from loratune.errors import ConfigError, LoratuneError
from loratune.models.devices import DTYPE_NAMES, resolve_dtype
from loratune.models.export import save_hf_model
from loratune.models.loader import load_classifier, load_model, model_sources, resolve_model_dir
from loratune.models.merge_4bit import (
    dequantize_model,
    merged_delta_norms,
    requantize_model,
    save_quantized_model,
)
from loratune.models.quantized import stored_in_4bit
from loratune.outputs import check_free_space, guard_output


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_to_directory`` wrote: the directory, the weights' dtype, the 4-bit format when it re-quantized
    (else None) and then the error re-quantizing added (``merge_4bit.requantize_model``'s report)."""

    path: Path
    dtype: torch.dtype
    quantize: str | None = None
    requantize_report: dict | None = None


def stored_dtype(model_dir: str | os.PathLike) -> torch.dtype:
    """The dtype a Hugging Face model directory's weights are stored in (its config.json; float32 if unsaid)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPE_NAMES.get(str(name).removeprefix("torch."), torch.float32)


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype that holds every value of both (bf16 and fp16 only meet in float32)."""
    return a if a == b else torch.float32


def merge_to_directory(
    model: str | os.PathLike,
    adapters: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    *,
    out_dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    requantize: bool = False,
    device: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    labels=None,
    extras: dict[str, str] | None = None,
) -> MergeResult:
    """Merge ``adapters`` (``(path, strength)`` pairs) into the base ``model`` and write it to ``out``.

    ``labels``: the adapters are classifiers with this label space (``load_classifier``), written with
    ``extras`` (text files by name, e.g. ``labels.json``) beside the model.
    ``out_dtype``: the written weights' dtype (default: the base's stored dtype; bf16 over a 4-bit base).
    ``quantize``: the base's 4-bit format, as a QLoRA run loaded it (found automatically for a model stored in
    4 bits); ``requantize`` then writes a 4-bit model instead. Raises ``ConfigError`` for an ``out`` that cannot
    be written (checked before anything loads) or options that do not fit, ``AdapterLoadError`` for an adapter
    that does not fit the base, ``ModelNotFoundError`` for a base that cannot be found.
    """
    if not adapters:
        raise ConfigError("merging needs at least one adapter")
    inputs = [*(("the adapter", path) for path, _ in adapters), *(("the base model", p) for p in model_sources(model))]
    with guard_output(out, overwrite=overwrite, inputs=inputs):
        for path, _ in adapters:
            read_adapter_config(path)  # a wrong path fails now, not after loading the model
        model_dir = resolve_model_dir(model)
        quantize = quantize or stored_in_4bit(model_dir)
        if requantize and not quantize:
            raise ConfigError(
                "requantize re-quantizes a 4-bit base; load the base in 4 bits as training did "
                "(--quantize nf4, or quantize='nf4'; fp4 likewise)"
            )
        written = None if out_dtype is None else resolve_dtype(out_dtype)
        if quantize and labels is not None:
            raise ConfigError("classifiers train over an unquantized base; merge without --quantize")
        stored = stored_dtype(model_dir)
        check_free_space(
            out,
            merged_size(model_dir, None if requantize else written or (torch.bfloat16 if quantize else stored)),
            "merged model",
        )
        if quantize:
            return _merge_over_4bit(
                model, adapters, Path(out), quantize, requantize, written, device, trust_remote_code, overwrite
            )
        written = written or stored
        if labels is not None:
            base, tokenizer = load_classifier(model, labels, _wider(stored, written), device, trust_remote_code)
        else:
            base, tokenizer = load_model(
                model, dtype=_wider(stored, written), device=device, trust_remote_code=trust_remote_code
            )
        for path, scale in adapters:
            load_adapter(base, path, scale=scale)
        plain = unload(base, merge=True, safe=True)
        return MergeResult(
            save_hf_model(plain, tokenizer, out, dtype=written, overwrite=overwrite, extras=extras), written
        )


def merged_size(model_dir: Path, dtype: torch.dtype | None) -> int | None:
    """About how many bytes a merged copy of the model in ``model_dir`` takes with its weights in ``dtype`` (None:
    re-quantized to 4 bits), from its safetensors headers; None when they cannot be read."""
    from loratune.quant.safetensors_stream import checkpoint_files, read_header

    try:
        elements = sum(
            math.prod(entry["shape"]) for file in checkpoint_files(model_dir) for entry in read_header(file)[1].values()
        )
    except (OSError, ValueError, KeyError, LoratuneError):
        return None
    return int(elements * (0.55 if dtype is None else dtype.itemsize))


def _merge_over_4bit(
    model,
    adapters,
    out: Path,
    quantize: str,
    requantize: bool,
    written,
    device,
    trust_remote_code: bool,
    overwrite: bool,
) -> MergeResult:
    """Dequantize the 4-bit base to float32, merge there, write bf16/fp16/fp32 (or re-quantize, reporting the
    error)."""
    base, tokenizer = load_model(
        model, quantize=quantize, dtype="fp32", device=device, trust_remote_code=trust_remote_code
    )
    specs = dequantize_model(base, torch.float32)
    for path, scale in adapters:
        load_adapter(base, path, scale=scale)
    deltas = merged_delta_norms(base) if requantize else None
    plain = unload(base, merge=True, safe=True)
    if not requantize:
        written = written or torch.bfloat16
        return MergeResult(save_hf_model(plain, tokenizer, out, dtype=written, overwrite=overwrite), written)
    report = requantize_model(plain, specs, deltas)
    path = save_quantized_model(plain, tokenizer, out, overwrite=overwrite)
    return MergeResult(path, next(iter(specs.values())).compute_dtype, quantize, report)
