"""Save and load adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are produced by one walk over the adapter's modules (``adapter_slots``), used by both save and
load, so the two are symmetric by construction: ``base_model.model.<module path>.lora_A.weight`` (r × in),
``.lora_B.weight`` (out × r), ``.lora_embedding_A`` / ``.lora_embedding_B`` for embeddings, and
modules_to_save parameters under the module's own key. The adapter's name never appears in the keys.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.adapters.config import LoraConfig
from loratune.adapters.fused_experts_peft import misread_by_peft, misread_warning
from loratune.adapters.int8 import INT8_WEIGHTS_NAME, compress_tensors, read_int8_weights
from loratune.adapters.kohya import component_part, components_in, is_kohya_path, read_kohya, to_module_paths
from loratune.adapters.peft_keys import factor_keys, magnitude_key, module_key, parameter_module_path
from loratune.adapters.registry import active_adapters, adapters_of, get_entry, lora_layers, saved_modules
from loratune.adapters.surgery import delete_adapter, inject_adapter, set_active, set_strength
from loratune.adapters.targets import find_targets, portable_target_modules, portable_target_parameters
from loratune.errors import AdapterLoadError, ConfigError
from loratune.files import (
    describe_read_error,
    give_default_modes,
    is_temp_name,
    read_safetensors,
    temp_dir_beside,
    writing,
)
from loratune.layers import UNINITIALISED, LoraLayer, LoraParameter
from loratune.outputs import MANIFEST_NAME, guard_output, record_published, record_removed, write_output_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_slots(model: nn.Module, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT key, tensor) for every tensor adapter ``name`` owns, found by walking its modules."""
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.lora_A]
    siblings: dict[str, list[str]] = {}  # owner path -> its parameters adapter ``name`` adapts, in order
    for path, layer in layers:
        if isinstance(layer, LoraParameter):
            siblings.setdefault(path.rpartition(".")[0], []).append(path)
    for path, layer in layers:
        key_path = path
        if isinstance(layer, LoraParameter):
            owner = path.rpartition(".")[0]
            key_path = parameter_module_path(owner, siblings[owner].index(path), len(siblings[owner]))
        a_key, b_key = factor_keys(key_path, layer.embedding)
        yield a_key, layer.lora_A[name]
        yield b_key, layer.lora_B[name]
        if layer.is_dora(name):
            yield magnitude_key(path), layer.lora_magnitude_vector[name]
    for path, wrapper in saved_modules(model):
        if name in wrapper.copies:
            for key, tensor in wrapper.copies[name].state_dict(keep_vars=True).items():
                yield module_key(path, key), tensor


def model_name_of(model: nn.Module) -> str | None:
    """The name the base model was loaded under (Hugging Face ``name_or_path``), if it has one."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _is_causal_lm(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return hasattr(model, "generate") and callable(get) and get() is not None


def adapter_tensors(model: nn.Module, name: str, *, convert_pissa: bool = True) -> tuple[dict, LoraConfig]:
    """The tensors and config ``save_adapter`` writes for adapter ``name`` (float tensors on the CPU).

    A PiSSA-initialised adapter is converted (by default) into an ordinary LoRA relative to the original
    base: ``ΔW = s·B·A − s·B0·A0`` = ``[B, −B0]·[A; A0]``, rank 2r with alpha scaled to keep ``s``.
    """
    entry = get_entry(model, name)
    config = entry.config
    tensors = adapter_state(model, name)
    pissa_layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.pissa]
    if pissa_layers:
        if not convert_pissa:
            raise ConfigError("a PiSSA adapter is only saved converted to plain LoRA (convert_pissa=True)")
        for path, layer in pissa_layers:
            start = layer.pissa[name]
            a_key, b_key = factor_keys(path, layer.embedding)
            tensors[a_key] = torch.cat([tensors[a_key], start.A0.to(tensors[a_key].dtype).cpu()], dim=0)
            tensors[b_key] = torch.cat([tensors[b_key], -start.B0.to(tensors[b_key].dtype).cpu()], dim=1)
        alpha_factor = math.sqrt(2) if config.use_rslora else 2.0  # keeps s = alpha/r (or alpha/√r) unchanged
        config = config.model_copy(
            update={
                "r": 2 * config.r,
                "lora_alpha": alpha_factor * config.lora_alpha,
                "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
                "alpha_pattern": {k: alpha_factor * v for k, v in config.alpha_pattern.items()},
                "init_lora_weights": True,
            }
        )
    misread = misread_by_peft(model, entry.lora_paths)
    if misread:
        warnings.warn(misread_warning(model, misread), stacklevel=3)
    portable = {
        "target_modules": portable_target_modules(model, config, entry.lora_paths) if entry.lora_paths else [],
        "target_parameters": portable_target_parameters(model, config, entry.parameter_paths),
    }
    return tensors, config.model_copy(update=portable)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
    convert_pissa: bool = True,
    compress: str | None = None,
) -> Path:
    """Write adapter ``name`` as a PEFT adapter directory at ``path`` and return the path.

    Files are written under temporary names and renamed into place, so an interrupted save never leaves a
    half-written adapter. Other files already in ``path`` (tokenizer files, say) are kept. ``compress="int8"``
    writes ``adapter_model.int8.safetensors`` instead (see ``loratune.adapters.int8``), which loratune loads
    and PEFT refuses. Raises ``ConfigError`` for an unknown ``compress``.
    """
    tensors, config = adapter_tensors(model, name, convert_pissa=convert_pissa)
    base_name = base_model_name_or_path or config.base_model_name_or_path or model_name_of(model)
    task_type = config.task_type or ("CAUSAL_LM" if _is_causal_lm(model) else None)
    config = config.model_copy(update={"base_model_name_or_path": base_name, "task_type": task_type})
    return write_adapter(path, config, tensors, compress=compress)


COMPRESSIONS = (None, "int8")


def write_adapter(
    path: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor], *, compress: str | None = None
) -> Path:
    """Write ``config`` and PEFT-keyed ``tensors`` as an adapter directory at ``path`` (atomically); return it.

    ``compress=None`` writes ``adapter_model.safetensors``; ``"int8"`` writes ``adapter_model.int8.safetensors``.
    Either way the other weights file is removed, so a directory never holds both.
    Raises ``ConfigError`` for an unknown ``compress``.
    """
    if compress not in COMPRESSIONS:
        raise ConfigError(f"compress={compress!r} is not supported; use None or 'int8'")
    if compress == "int8":
        stored, metadata = compress_tensors(tensors)
        weights_name, stale = INT8_WEIGHTS_NAME, WEIGHTS_NAME
    else:
        stored, metadata = tensors, {"format": "pt"}
        weights_name, stale = WEIGHTS_NAME, INT8_WEIGHTS_NAME
    target = Path(path)
    with writing(target, "adapter"):
        staging = temp_dir_beside(target)
        try:
            save_file(stored, staging / weights_name, metadata=metadata)
            (staging / CONFIG_NAME).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
            give_default_modes(staging)
            if not target.exists():
                record_published(target, staging)
                staging.rename(target)
            else:
                for file in (weights_name, CONFIG_NAME):
                    record_published(target / file, staging / file)
                    os.replace(staging / file, target / file)
                (target / stale).unlink(missing_ok=True)
                record_removed(target / stale)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and PEFT-keyed tensors of the adapter directory at ``path``, without a model
    (an int8-compressed adapter comes back dequantized): the first half of ``load_adapter``, which
    ``attach_adapter`` completes. Raises ``AdapterLoadError`` for an unreadable one."""
    return read_adapter_config(path), _read_weights(Path(path))


def write_adapter_dir(
    path: str | os.PathLike,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    *,
    compress: str | None = None,
    overwrite: bool = False,
    copy_from: str | os.PathLike | None = None,
) -> Path:
    """Write a new adapter directory at ``path`` holding only ``config`` and ``tensors`` (and, with
    ``copy_from``, that directory's other files: tokenizer, chat template), built beside ``path`` and
    swapped in.

    Raises ``ConfigError`` when ``path`` exists and is not empty without ``overwrite``, or cannot be
    replaced (see ``loratune.outputs.check_output_dir``); nothing is written then.
    """
    extras = []
    if copy_from is not None:
        skip = {CONFIG_NAME, WEIGHTS_NAME, INT8_WEIGHTS_NAME, MANIFEST_NAME}
        extras = [
            p for p in Path(copy_from).iterdir() if p.is_file() and p.name not in skip and not is_temp_name(p.name)
        ]

    def fill(staging: Path) -> None:
        for extra in extras:
            shutil.copyfile(extra, staging / extra.name)
        write_adapter(staging, config, tensors, compress=compress)

    return write_output_dir(path, "adapter", fill, overwrite=overwrite)


def compress_adapter(path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write an int8-compressed copy of the adapter directory ``path`` (with its other files, such as the
    tokenizer) to ``out`` and return ``out``.

    Raises ``AdapterLoadError`` when ``path`` is not a readable adapter directory, ``ConfigError`` when
    ``out`` cannot be written (see ``write_adapter_dir``), among others when it is, contains or lies inside ``path``.
    """
    with guard_output(out, overwrite=overwrite, inputs=[("the adapter", path)]):
        config, tensors = read_adapter(path)
        return write_adapter_dir(out, config, tensors, compress="int8", overwrite=overwrite, copy_from=path)


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The ``LoraConfig`` of the adapter directory at ``path`` (unknown PEFT keys ignored).

    Raises ``AdapterLoadError`` when ``path`` is not an adapter directory or its config is not LoRA.
    """
    directory = Path(path)
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        if not directory.exists():
            what = "does not exist"
        elif not directory.is_dir():
            what = "is a file, not an adapter directory"
        else:
            what = f"has no {CONFIG_NAME}"
        raise AdapterLoadError(
            f"{directory} {what}; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} (or {INT8_WEIGHTS_NAME})"
        )
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{config_file} cannot be read: {describe_read_error(exc)}") from None
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{config_file}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{config_file}: expected a JSON object with the adapter's settings")
    return LoraConfig.from_peft_dict(data, source=str(config_file))


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors as they are in the model (PEFT keys, CPU copies, no PiSSA conversion):
    what a training checkpoint stores; ``load_adapter_state`` puts them back."""
    return {key: t.detach().to("cpu", copy=True).contiguous() for key, t in adapter_slots(model, name)}


def load_adapter_state(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (from ``adapter_state``) into the existing adapter ``name``; strict on keys and shapes.

    Raises ``AdapterLoadError`` naming ``source`` and the offending keys.
    """
    _copy_into_slots(model, name, tensors, Path(source))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file() and (directory / INT8_WEIGHTS_NAME).is_file():
        return read_int8_weights(directory / INT8_WEIGHTS_NAME)
    if not weights.is_file():
        if (directory / "adapter_model.bin").exists():
            raise AdapterLoadError(
                f"{directory} has only adapter_model.bin (pickle), which loratune does not load for safety; "
                "convert it to safetensors with PEFT first"
            )
        raise AdapterLoadError(f"{directory} has no {WEIGHTS_NAME}")
    return read_safetensors(weights, what="adapter weights", error=AdapterLoadError)


def _listed(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    scale: float = 1.0,
    *,
    trainable: bool = False,
    dtype: torch.dtype = torch.float32,
    component: str | None = None,
    as_plain: bool = False,
) -> str:
    """Load the adapter at ``path`` into ``model`` as ``name`` and add it to the active adapters: a PEFT
    adapter directory, or a kohya ``.safetensors`` file (image-model LoRA; see ``adapters.kohya``).

    ``scale`` is its strength (1.0 = as trained). The adapter is frozen unless ``trainable``. Returns the
    name used (by default ``"default"`` when free, else the directory's name, numbered when taken). For a
    kohya file adapting several components, ``component`` (``"unet"``, ``"text_encoder"``,
    ``"text_encoder_2"``) says which one ``model`` is; by default the one whose module names ``model`` has.
    Raises ``AdapterLoadError`` when a tensor finds no module, a module gets no tensor, or a shape differs
    (the model is left as it was). Warns when the adapter was trained on a differently named base model.
    ``as_plain``: an adapter saved from a PiSSA or OLoRA start with its residual (PEFT's default) is loaded as
    the ordinary LoRA it amounts to on the unmodified base (rank 2r), so the base weights stay shared (mixed
    batches, a server).

    The same as ``read_adapter`` (the files, no model) followed by ``attach_adapter`` (the model, no files),
    which a caller can run on different threads (a server reads on one and changes the model on another).
    """
    source = Path(path)
    if is_kohya_path(source):
        config, tensors = _kohya_for(model, source, component)
    else:
        config, tensors = read_adapter(source)
    return _attach(model, config, tensors, source, name, scale, trainable, dtype, as_plain)


def attach_adapter(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    source: str | os.PathLike,
    name: str | None = None,
    scale: float = 1.0,
    *,
    trainable: bool = False,
    dtype: torch.dtype = torch.float32,
    as_plain: bool = False,
    activate: bool = True,
) -> str:
    """Put an adapter already read from disk (``config`` and PEFT-keyed ``tensors``, as ``read_adapter``
    gives them) into ``model`` as ``name`` and add it to the active adapters; the second half of
    ``load_adapter``, which documents ``name``, ``scale``, ``trainable``, ``dtype`` and ``as_plain``.
    ``activate=False`` leaves it inactive (for callers that route each row themselves, ``mixed_batch``).

    It reads no file: ``source`` (where the tensors came from) only names the adapter in errors, the warning
    and the default name. ``tensors`` are copied, not kept. Raises ``AdapterLoadError`` as ``load_adapter``
    does (the model is left as it was).
    """
    return _attach(model, config, tensors, Path(source), name, scale, trainable, dtype, as_plain, activate)


def _attach(model, config, tensors, source: Path, name, scale, trainable, dtype, as_plain, activate=True) -> str:
    # called by load_adapter and attach_adapter only: the warning's stacklevel 3 points at their caller
    if name is None:
        name = _free_name(model, source)
    # The file fills every factor (checked strictly), except that a PiSSA adapter must rebuild its residual base.
    init = config.init_lora_weights if config.init_lora_weights in ("pissa", "olora") else UNINITIALISED
    plain = as_plain and init is not UNINITIALISED
    # the start rewrites the targets' weights; converting gives them back only up to rounding, so keep them
    originals = (
        {path: _base_weight(module).detach().clone() for path, module in find_targets(model, config)} if plain else {}
    )
    try:
        inject_adapter(model, config, name, dtype=dtype, init=init)
    except ConfigError as exc:
        raise AdapterLoadError(f"adapter {source} does not fit this model: {exc}") from None
    try:
        slots = _copy_into_slots(model, name, tensors, source)
    except AdapterLoadError:
        delete_adapter(model, name)
        raise
    if plain:
        tensors, config = adapter_tensors(model, name)
        delete_adapter(model, name)
        with torch.no_grad():
            for path, weight in originals.items():
                _base_weight(model.get_submodule(path)).copy_(weight)
        inject_adapter(model, config, name, dtype=dtype, init=UNINITIALISED)
        slots = _copy_into_slots(model, name, tensors, source)
    # each of these walks every layer, and a server attaches between two decoding steps: only the needed ones
    for param in slots:
        param.requires_grad_(trainable)
    if scale != 1.0:  # a new adapter's strength is 1
        set_strength(model, name, scale)
    if activate:
        set_active(model, [*active_adapters(model), name])
    ours, theirs = model_name_of(model), config.base_model_name_or_path
    if ours and theirs and ours != theirs and not is_kohya_path(source):
        warnings.warn(f"adapter {source} was trained on {theirs!r}, this model is {ours!r}", stacklevel=3)
    return name


def _base_weight(module: nn.Module) -> torch.Tensor:
    return module.base_weight if isinstance(module, LoraLayer) else module.weight


def _kohya_for(model: nn.Module, path: Path, component: str | None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The part of the kohya file at ``path`` that adapts ``model``, keyed by ``model``'s module paths."""
    adapter = read_kohya(path)
    paths = [p for p, _ in model.named_modules()]
    choices = components_in(adapter) if component is None else [component]
    fitting = {}
    for choice in choices:
        try:
            fitting[choice] = to_module_paths(component_part(adapter, choice), {choice: paths}, str(path))[choice]
        except ConfigError as exc:
            if component is not None or len(choices) == 1:
                raise AdapterLoadError(f"adapter {path} does not fit this model: {exc}") from None
    if len(fitting) != 1:
        found = ", ".join(components_in(adapter))
        raise AdapterLoadError(
            f"{path} adapts {found}, and {'several' if fitting else 'none'} of them fit this "
            "model; say which one it is with component="
        )
    return next(iter(fitting.values()))


def _free_name(model: nn.Module, directory: Path) -> str:
    taken = adapters_of(model)
    if "default" not in taken:
        return "default"
    stem = directory.resolve().stem if is_kohya_path(directory) else directory.resolve().name
    base = stem.replace(".", "_") or "adapter"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


def _drop_base_weight_copies(model: nn.Module, name: str, tensors: dict, directory: Path) -> dict:
    """PEFT saves the full base weight of adapted embedding layers (``<path>.base_layer.weight``) by default.
    A copy equal to this model's weight carries no information: drop it. A different one means the adapter
    expects another base (PEFT would overwrite ours): refuse rather than change the base behind the user's back.
    """
    kept = dict(tensors)
    for path, layer in lora_layers(model):
        key = module_key(path, "base_layer.weight")
        if name not in layer.lora_A or key not in kept:
            continue
        copy, ours = kept.pop(key), layer.base_weight.detach()
        if copy.shape != ours.shape or not torch.allclose(copy.float(), ours.float().cpu(), rtol=1e-2, atol=1e-3):
            raise AdapterLoadError(
                f"adapter {directory} carries its own base weight {key}, which differs from this model's — "
                "it was trained on another base (or with a resized vocabulary)"
            )
    return kept


def _copy_into_slots(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory: Path
) -> list[torch.Tensor]:
    """Copy ``tensors`` into adapter ``name``'s slots (strict on keys and shapes); return the slots."""
    slots = dict(adapter_slots(model, name))
    tensors = _drop_base_weight_copies(model, name, tensors, directory)
    missing, unexpected = slots.keys() - tensors.keys(), tensors.keys() - slots.keys()
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} tensors match no adapted module: {_listed(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} adapted module tensors are missing from the file: {_listed(missing)}")
        raise AdapterLoadError(f"adapter {directory} does not fit this model — " + "; ".join(parts))
    for key, slot in slots.items():
        if tuple(tensors[key].shape) != tuple(slot.shape):
            raise AdapterLoadError(
                f"adapter {directory}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                f"{tuple(slot.shape)} — was it trained on another base model?"
            )
    with torch.no_grad():
        for key, slot in slots.items():
            slot.copy_(tensors[key])
    return list(slots.values())
