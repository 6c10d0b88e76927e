"""Adapters in either file format — a PEFT directory or a kohya ``.safetensors`` file — for the verbs that
work on files alone (inspect, mix, rank, resize), and the lossless conversion between the two.

A file-only verb reads an adapter as ``(LoraConfig, PEFT-keyed tensors)`` (a kohya file with its kohya names
as module paths) and writes its result in the format it read unless told otherwise. Converting a PEFT adapter
to kohya names each module ``lora_unet_<path with "_">`` (a text encoder's: ``lora_te…``); converting a kohya
file to PEFT needs the model's module names (``models.diffusers_names``).

A pipeline's adapter in the PEFT format is a directory per component: the UNet's adapter at the root and the
text encoders' in ``text_encoder/`` and ``text_encoder_2/`` below it (each a PEFT adapter of its own).
diffusers' own single-file layout (``pytorch_lora_weights.safetensors`` from ``save_lora_weights``: PEFT's keys
under ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``, each component's LoraConfig in the header's
``lora_adapter_metadata``) is read wherever a kohya file is, and written by ``convert --to diffusers``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loratune.adapters.config import LoraConfig
from loratune.adapters.kohya import (
    COMPONENTS,
    WRITER_KEY,
    KohyaAdapter,
    config_for,
    from_module_paths,
    is_kohya_path,
    module_ranks_and_alphas,
    read_kohya,
    to_module_paths,
    write_kohya,
)
from loratune.adapters.peft_format import CONFIG_NAME, read_adapter, write_adapter, write_adapter_dir
from loratune.adapters.peft_keys import PREFIX, module_path, parse_factor_key
from loratune.errors import AdapterLoadError, ConfigError
from loratune.files import reading
from loratune.outputs import guard_output, write_atomic, write_output_dir
from loratune.version import __version__

FORMATS = ("peft", "kohya")
CONVERT_FORMATS = (*FORMATS, "diffusers")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the packed LoraConfigs
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
PIPELINE_COMPONENTS = ("unet", *TEXT_ENCODERS)


@dataclass
class AdapterFile:
    """An adapter as read from disk: ``config`` and PEFT-keyed ``tensors``, its ``format``, and (kohya) the
    header ``metadata`` to keep when writing a result."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)


def read_any(path: str | os.PathLike) -> AdapterFile:
    """The adapter at ``path``: a kohya ``.safetensors`` file or a PEFT adapter directory (a diffusers
    single-file LoRA reads as the kohya file it converts to, losslessly)."""
    if is_kohya_path(path):
        adapter = from_module_paths(read_diffusers_file(path)) if is_diffusers_file(path) else read_kohya(path)
        return AdapterFile(adapter.config, adapter.tensors, "kohya", adapter.metadata)
    config, tensors = read_adapter(path)
    return AdapterFile(config, tensors, "peft")


def output_format(inputs: Iterable[AdapterFile], requested: str | None, out: str | os.PathLike) -> str:
    """The format to write: ``requested``, else the inputs' (kohya only when every input is kohya). Raises
    ``ConfigError`` when ``out`` does not fit it (kohya: a ``.safetensors`` file; PEFT: a directory)."""
    if requested is not None and requested not in FORMATS:
        raise ConfigError(f"--format {requested!r} is not one of {', '.join(FORMATS)}")
    chosen = requested or ("kohya" if all(a.format == "kohya" for a in inputs) else "peft")
    if chosen == "kohya" and Path(out).suffix != ".safetensors":
        raise ConfigError(f"kohya output is a single .safetensors file; give --out ending in .safetensors, not {out}")
    if chosen == "peft" and Path(out).suffix == ".safetensors":
        raise ConfigError(f"PEFT output is a directory; give --out without .safetensors (or --format kohya), not {out}")
    return chosen


def write_any(
    out: str | os.PathLike,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    fmt: str,
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    copy_from: str | os.PathLike | None = None,
    compress: str | None = None,
) -> Path:
    """Write a verb's result in format ``fmt``: a PEFT directory (see ``write_adapter_dir``) or a kohya file.
    A result keyed by module paths becomes kohya names as the UNet's (``lora_unet_…``); one keyed by kohya
    names becomes a PEFT adapter keyed by them (load it on a model with ``convert`` first)."""
    if fmt == "kohya":
        if compress is not None:
            raise ConfigError("--int8 compression is a PEFT-directory format; leave it out for kohya output")
        if not _kohya_named(config):
            adapter = from_module_paths({"unet": (config, tensors)})
            config, tensors = adapter.config, adapter.tensors
            metadata = {**adapter.metadata, **(metadata or {})}
        return write_kohya(out, config, tensors, metadata=metadata, overwrite=overwrite)
    copy = copy_from if copy_from is not None and not is_kohya_path(copy_from) else None
    return write_adapter_dir(out, config, tensors, compress=compress, overwrite=overwrite, copy_from=copy)


def _kohya_named(config: LoraConfig) -> bool:
    targets = config.target_modules if isinstance(config.target_modules, list) else []
    return bool(targets) and all("." not in t and t.startswith(tuple(p + "_" for p in COMPONENTS)) for t in targets)


# --- conversion ----------------------------------------------------------------------------------------------


def read_pipeline_adapter(path: str | os.PathLike) -> dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]]:
    """``{component: (config, tensors)}`` of a PEFT pipeline adapter directory: the UNet's at the root (when
    it has an adapter config), the text encoders' in their subdirectories."""
    root = Path(path)
    parts = {}
    if (root / CONFIG_NAME).is_file() or not any((root / c / CONFIG_NAME).is_file() for c in TEXT_ENCODERS):
        parts["unet"] = read_adapter(root)
    for component in TEXT_ENCODERS:
        if (root / component / CONFIG_NAME).is_file():
            parts[component] = read_adapter(root / component)
    return parts


def is_diffusers_file(path: str | os.PathLike) -> bool:
    """Whether the ``.safetensors`` file at ``path`` is in diffusers' LoRA layout (``unet.….lora_A.weight``)."""
    with reading(path, "LoRA file", AdapterLoadError), safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    return (
        bool(keys)
        and all(k.split(".", 1)[0] in PIPELINE_COMPONENTS for k in keys)
        and any(".lora_A." in k or k.endswith(".lora_A.weight") for k in keys)
    )


def read_diffusers_file(path: str | os.PathLike) -> dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]]:
    """``{component: (config, PEFT-keyed tensors)}`` of a diffusers single-file LoRA. Each component's config
    is the one in the header; without one, each module's rank comes from its factors and alpha = r (what
    diffusers assumes then)."""
    with reading(path, "LoRA file", AdapterLoadError), safe_open(str(path), framework="pt") as handle:
        packed = json.loads((handle.metadata() or {}).get(DIFFUSERS_METADATA_KEY) or "{}")
        raw = {key: handle.get_tensor(key) for key in handle.keys()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        component, rest = key.split(".", 1)
        parts.setdefault(component, {})[rest if rest.startswith(PREFIX) else PREFIX + rest] = tensor  # (a PeftModel's)
    out = {}
    for component, tensors in parts.items():
        fields = {k[len(component) + 1 :]: v for k, v in packed.items() if k.startswith(component + ".")}
        if fields:
            config = LoraConfig.from_peft_dict({"peft_type": "LORA", **fields}, source=f"{path} ({component})")
        else:
            ranks = {
                parse_factor_key(k).path: t.shape[0]
                for k, t in tensors.items()
                if parse_factor_key(k) is not None and parse_factor_key(k).factor == "A"
            }
            config = config_for(ranks, {p: float(r) for p, r in ranks.items()})
        out[component] = (config, tensors)
    return out


def write_diffusers_file(
    out: str | os.PathLike,
    parts: Mapping[str, tuple[LoraConfig, Mapping[str, torch.Tensor]]],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``{component: (config, PEFT-keyed tensors)}`` as a diffusers single-file LoRA at ``out``: PEFT's
    keys without ``base_model.model.`` under the component's name, the configs packed in the header."""
    target = Path(out)
    if target.suffix != ".safetensors":
        raise ConfigError(
            f"a diffusers LoRA file is a .safetensors file; give --out ending in .safetensors, not {target}"
        )
    with guard_output(
        target, kind="file", overwrite=overwrite, what="diffusers LoRA file", record_kind="diffusers-lora"
    ):
        tensors, packed = {}, {}
        for component, (config, part) in parts.items():
            tensors.update({f"{component}.{module_path(key)}": t.contiguous() for key, t in part.items()})
            packed.update({f"{component}.{k}": v for k, v in config.to_peft_dict().items()})
        header = {
            "format": "pt",
            DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
            WRITER_KEY: __version__,
        }
        return write_atomic(target, lambda temp: save_file(tensors, temp, metadata=header))


def source_format(path: str | os.PathLike) -> str:
    """The format of the LoRA at ``path``: ``"peft"`` (a directory with an adapter config, at its root or for a
    text encoder), ``"diffusers"`` or ``"kohya"`` (a ``.safetensors`` file). Raises ``ConfigError`` saying what
    ``path`` is instead: missing, a file of another kind, a directory without an adapter."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(
            f"{source}: no such file or directory; give a kohya or diffusers .safetensors file or a "
            "PEFT adapter directory"
        )
    if source.is_dir():
        if (source / CONFIG_NAME).is_file() or any((source / c / CONFIG_NAME).is_file() for c in TEXT_ENCODERS):
            return "peft"
        raise ConfigError(
            f"{source} is a directory without {CONFIG_NAME}, so not a PEFT adapter; give an adapter "
            "directory or a .safetensors LoRA file"
        )
    if source.suffix != ".safetensors":
        raise ConfigError(
            f"{source} is not a LoRA file (convert reads a kohya or diffusers .safetensors file, or a "
            "PEFT adapter directory)"
        )
    return "diffusers" if is_diffusers_file(source) else "kohya"


def pipeline_parts(
    source: str | os.PathLike, module_paths: Mapping[str, Iterable[str]] | None = None
) -> dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]]:
    """``{component: (config, tensors)}`` of any pipeline LoRA: a PEFT pipeline directory, a diffusers
    single file, or a kohya file (whose names need ``module_paths``, ``{component: paths}``)."""
    if not is_kohya_path(source):
        return read_pipeline_adapter(source)
    if is_diffusers_file(source):
        return read_diffusers_file(source)
    if module_paths is None:
        raise ConfigError(
            "converting a kohya file needs --model DIFFUSERS_DIR (a pipeline or UNet directory): kohya "
            "names replace '.' by '_', so only the model's module names tell them apart"
        )
    return to_module_paths(read_kohya(source), module_paths, str(source))


def kohya_to_peft(
    source: str | os.PathLike,
    out: str | os.PathLike,
    module_paths: Mapping[str, Iterable[str]] | None,
    *,
    base_model: str | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Convert the kohya (or diffusers single-file) LoRA ``source`` to a PEFT pipeline adapter directory at
    ``out`` (the UNet's adapter at the root, text encoders' in subdirectories), kohya names resolved with
    ``module_paths`` (``{component: paths}``). Tensors are copied bit for bit. Returns the number of modules
    per component."""
    with guard_output(out, overwrite=overwrite, inputs=[("the LoRA file", source)]):
        parts = pipeline_parts(source, module_paths)
        if base_model:
            parts = {
                c: (config.model_copy(update={"base_model_name_or_path": base_model}), tensors)
                for c, (config, tensors) in parts.items()
            }

        def fill(staging: Path) -> None:
            for component, (config, tensors) in parts.items():
                write_adapter(staging if component == "unet" else staging / component, config, tensors)

        write_output_dir(out, "adapter", fill, overwrite=overwrite)
    return {component: len(config.target_modules) for component, (config, _) in parts.items()}


def peft_to_kohya(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> dict[str, int]:
    """Convert a PEFT pipeline adapter directory (or a single UNet adapter), or a diffusers single-file LoRA,
    to a kohya file at ``out``; tensors are copied bit for bit, each module's scaling kept in its ``alpha``.
    Returns the modules per component."""
    parts = pipeline_parts(source)
    adapter: KohyaAdapter = from_module_paths(parts)
    write_kohya(out, adapter.config, adapter.tensors, metadata=adapter.metadata, overwrite=overwrite)
    return {
        component: len(module_ranks_and_alphas(config, tensors)[0]) for component, (config, tensors) in parts.items()
    }


def to_diffusers_file(
    source: str | os.PathLike,
    out: str | os.PathLike,
    module_paths: Mapping[str, Iterable[str]] | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, int]:
    """Convert any pipeline LoRA (see ``pipeline_parts``) to a diffusers single file at ``out``; tensors are
    copied bit for bit. Returns the modules per component."""
    parts = pipeline_parts(source, module_paths)
    write_diffusers_file(out, parts, overwrite=overwrite)
    return {
        component: len(module_ranks_and_alphas(config, tensors)[0]) for component, (config, tensors) in parts.items()
    }


__all__ = [
    "CONVERT_FORMATS",
    "FORMATS",
    "AdapterFile",
    "kohya_to_peft",
    "output_format",
    "peft_to_kohya",
    "read_any",
    "read_diffusers_file",
    "read_pipeline_adapter",
    "source_format",
    "to_diffusers_file",
    "write_any",
]
