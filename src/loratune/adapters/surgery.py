"""Adapter surgery on any ``nn.Module``: inject, activate, disable, merge, unmerge, delete, unload.

LoRA layers replace the targeted modules in place (the original becomes ``<path>.base_layer``); a module with
adapted parameters (``target_parameters``: expert stacks) is replaced by an ``AdaptedModule`` holding the original
and a ``LoraParameter`` per parameter. What
adapters exist, which are active, their strengths and what is merged live in the layers themselves (see
``registry``); the functions here change them on every layer at once, through the layers' own methods.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from loratune.adapters.config import LoraConfig
from loratune.adapters.mixed_batch import disable_adapter_names_argument, enable_adapter_names_argument
from loratune.adapters.modules_to_save import ModulesToSaveWrapper
from loratune.adapters.registry import (
    AdapterEntry,
    active_adapters,
    adapters_of,
    get_entry,
    lora_layers,
    merged_adapters,
    saved_modules,
)
from loratune.adapters.targets import (
    candidate_modules,
    find_parameter_targets,
    find_targets,
    is_module_to_save,
    rank_and_alpha,
)
from loratune.errors import ConfigError
from loratune.layers import BASE_ADAPTER, AdaptedModule, LoraLayer, LoraParameter, is_residual_start, lora_class_for

_creation = itertools.count()  # orders adapters by creation, across models


def _shared_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    counts = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
    return {pid for pid, n in counts.items() if n > 1}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        raise ConfigError(f"adapter name {name!r} is invalid: use a non-empty name without dots, not {BASE_ADAPTER!r}")


def _require_unmerged(model: nn.Module, action: str) -> None:
    merged = merged_adapters(model)
    if merged:
        raise ConfigError(f"cannot {action} while adapters {merged} are merged; call unmerge(model) first")


def inject_adapter(
    model: nn.Module, config: LoraConfig, name: str, *, dtype: torch.dtype = torch.float32, init=None
) -> AdapterEntry:
    """Create adapter ``name`` on the modules ``config`` targets, without activating it or touching grads.

    ``init`` overrides ``config.init_lora_weights`` (loading uses a cheap start it then overwrites).
    Raises ``ConfigError`` for a duplicate name or a config that matches nothing.
    """
    _check_name(name)
    entries = adapters_of(model)
    if name in entries:
        raise ConfigError(f"an adapter named {name!r} already exists; pick another name or delete_adapter() it")
    targets = find_targets(model, config)
    init = config.init_lora_weights if init is None else init
    parameters = _parameter_layers(model, config, init, [path for path, _ in targets])
    shared = _shared_weight_ids(model)
    order = next(_creation)
    lora_paths = []
    for path, module in targets:
        if isinstance(module, LoraLayer):
            layer = module
        else:
            layer = lora_class_for(module)(module)
            model.set_submodule(path, layer)
        lora_paths.append(path)
    for path, layer in [*zip(lora_paths, (model.get_submodule(p) for p in lora_paths)), *parameters]:
        r, alpha = rank_and_alpha(config, path)
        layer.add_adapter(
            name,
            r,
            alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init=init,
            dtype=dtype,
            weight_is_shared=id(layer.base_weight) in shared,
            config=config,
            order=order,
            use_dora=config.use_dora,
        )
    saved_paths = []
    for path, module in list(candidate_modules(model)) if config.modules_to_save else []:
        if is_module_to_save(path, config.modules_to_save, config.modules_to_save_plain_suffix):
            wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
            if wrapper is not module:
                model.set_submodule(path, wrapper)
            wrapper.add(name)
            saved_paths.append(path)
    if config.modules_to_save and not saved_paths:
        delete_adapter_layers(model, name)
        raise ConfigError(f"modules_to_save={config.modules_to_save} matches no module of this model")
    enable_adapter_names_argument(model)
    return AdapterEntry(config, lora_paths, saved_paths, [path for path, _ in parameters])


def _parameter_layers(model: nn.Module, config: LoraConfig, init, module_paths: list[str]):
    """(parameter key, ``LoraParameter``) for the parameters ``config`` adapts directly, their owners wrapped
    in ``AdaptedModule``s; every refusal comes before the model changes."""
    found = find_parameter_targets(model, config)
    if not found:
        return []
    keys = [f"{owner}.{name}" for owner, name in found]
    clash = sorted({owner for owner, _ in found} & set(module_paths))
    if clash:
        raise ConfigError(
            f"{clash[0]!r} is adapted as a module (target_modules) and through its parameters (target_parameters); "
            "name it in one of them"
        )
    if config.lora_dropout:
        raise ConfigError(
            f"lora_dropout={config.lora_dropout} cannot apply to parameter updates such as {keys[0]!r} (PEFT "
            "refuses them too); set lora.lora_dropout: 0, or leave the experts out with lora.target_parameters: []"
        )
    if config.use_dora:
        raise ConfigError(
            f"DoRA is not supported on parameters such as {keys[0]!r} (PEFT has none there either); set "
            "use_dora: false, or leave the experts out with lora.target_parameters: []"
        )
    if is_residual_start(init):
        raise ConfigError(
            f"init_lora_weights={init!r} is not supported on parameters such as {keys[0]!r}; use the default init"
        )
    for owner_path, _ in found:
        owner = model.get_submodule(owner_path)
        owner = owner.base_layer if isinstance(owner, AdaptedModule) else owner
        if any(True for child in owner.children() for _ in child.parameters()):
            raise ConfigError(
                f"target_parameters names parameters of {owner_path!r}, which holds other modules with weights; "
                "name parameters of modules without submodules (such as mlp.experts)"
            )
    layers = []
    for owner_path, name in found:
        owner = model.get_submodule(owner_path)
        if not isinstance(owner, AdaptedModule):
            owner = AdaptedModule(owner)
            model.set_submodule(owner_path, owner)
        layers.append((f"{owner_path}.{name}", owner.layer_for(name)))
    return layers


def _unwrap(model: nn.Module, path: str, layer: LoraLayer) -> None:
    """Put back what ``layer`` (now without adapters) replaced: its module, or for a ``LoraParameter`` drop it
    from its ``AdaptedModule`` and that module once it holds no other."""
    if not isinstance(layer, LoraParameter):
        model.set_submodule(path, layer.base_layer)
        return
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    owner.remove_layer(name)
    if not owner.parameter_layers():
        model.set_submodule(owner_path, owner.base_layer)


def adapter_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """The parameters adapter ``name`` trains: its A and B factors (and DoRA magnitudes), expert factors
    included, and its modules_to_save copies."""
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            yield layer.lora_A[name]
            yield layer.lora_B[name]
            if layer.is_dora(name):
                yield layer.lora_magnitude_vector[name]
    for _, wrapper in saved_modules(model):
        if name in wrapper.copies:
            yield from wrapper.copies[name].parameters()


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> None:
    """Freeze every parameter of ``model`` except those of the adapters ``names``."""
    names = [names] if isinstance(names, str) else list(names)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        get_entry(model, name)
        for param in adapter_parameters(model, name):
            param.requires_grad_(True)


def add_adapter(
    model: nn.Module, config: LoraConfig, name: str = "default", *, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Inject a new trainable adapter, freeze everything else and make it the only active adapter.

    Adapter parameters are created in ``dtype`` (float32 by default, whatever the base dtype).
    Returns ``model`` (changed in place). Raises ``ConfigError`` for an invalid name, a duplicate, a config
    that matches no module, or when adapters are merged.
    """
    _require_unmerged(model, "add an adapter")
    inject_adapter(model, config, name, dtype=dtype)
    set_trainable(model, name)
    set_active(model, name)
    return model


def set_active(
    model: nn.Module, names: str | Sequence[str], scales: float | Sequence[float] | dict[str, float] | None = None
) -> None:
    """Make exactly ``names`` act (their outputs add up), each with a strength (default: keep the current one).

    ``scales`` is one number per name (a list, a dict, or a float for a single name); strength multiplies the
    trained effect ``s·B·A`` (0 = base, 1 = as trained). ``[]`` leaves the base model.
    Raises ``ConfigError`` for an unknown name, mismatched scales, adapters merged, or two active adapters
    that both carry a copy of the same modules_to_save module.
    """
    names = [names] if isinstance(names, str) else list(names)
    entries = adapters_of(model)
    for name in names:
        if name not in entries:
            get_entry(model, name)  # raises, naming the adapters there are
    if isinstance(scales, (int, float)):
        if len(names) != 1:
            raise ConfigError(f"one scale given for {len(names)} adapters; give one per adapter")
        scales = [scales]
    if scales is not None and not isinstance(scales, dict):
        if len(scales) != len(names):
            raise ConfigError(f"{len(scales)} scales given for {len(names)} adapters; give one per adapter")
        scales = dict(zip(names, scales))
    unknown = set(scales or {}) - set(names)
    if unknown:
        raise ConfigError(f"scales given for adapters that are not being activated: {sorted(unknown)}")
    _require_unmerged(model, "change the active adapters")
    owners_of = {}
    for path, wrapper in saved_modules(model):
        owners = [n for n in names if n in wrapper.copies]
        if len(owners) > 1:
            raise ConfigError(f"adapters {owners} each train their own copy of {path!r}; activate only one of them")
        owners_of[wrapper] = owners[0] if owners else None
    for _, layer in lora_layers(model):
        layer.set_active(tuple(names))
        for n, value in (scales or {}).items():
            if n in layer.specs:
                layer.set_strength(n, float(value))
    for wrapper, owner in owners_of.items():
        wrapper.active = owner


def set_strength(model: nn.Module, name: str, scale: float) -> None:
    """Change the strength of adapter ``name`` (active or not) without reloading it."""
    get_entry(model, name)
    _require_unmerged(model, "change an adapter's strength")
    for _, layer in lora_layers(model):
        if name in layer.specs:
            layer.set_strength(name, float(scale))


def adapter_strength(model: nn.Module, name: str) -> float:
    """The current strength of adapter ``name`` (1.0 = as trained)."""
    get_entry(model, name)
    for _, layer in lora_layers(model):
        if name in layer.specs:
            return layer.state.strength(name)
    return 1.0


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """Run the bare base model inside the ``with`` block (adapters and modules_to_save copies off).

    Raises ``ConfigError`` when adapters are merged (the base weights then include them).
    """
    _require_unmerged(model, "run the base model")
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [(w, w.active) for _, w in saved_modules(model)]
    for layer in layers:
        layer.set_base_only(True)
    for wrapper, _ in wrappers:
        wrapper.active = None
    try:
        yield model
    finally:
        for layer in layers:
            layer.set_base_only(False)
        for wrapper, active in wrappers:
            wrapper.active = active


def merge_adapters(
    model: nn.Module, names: Sequence[str] | None = None, *, safe: bool = False, on_tied: str = "untie"
) -> None:
    """Write ``s·strength·B·A`` of ``names`` (default: the active adapters) into the base weights.

    Math in float32, cast back to the base dtype. An adapter already merged is skipped with a warning.
    DoRA adapters merge first (their change is defined on the original weight); one per layer.
    ``safe``: refuse (and change nothing) if any merged weight would be non-finite.
    ``on_tied``: a weight shared with another module (tied embeddings) is given a private copy (``"untie"``)
    so the other module keeps its behaviour, or the merge is refused (``"error"``).
    Raises ``ConfigError`` for an unknown adapter, a 4-bit base (merge with ``loratune merge`` instead) or a
    tied weight with ``on_tied="error"``; nothing is written then.
    """
    if on_tied not in ("untie", "error"):
        raise ConfigError(f"on_tied={on_tied!r} must be 'untie' or 'error'")
    names = active_adapters(model) if names is None else list(names)
    for name in names:
        get_entry(model, name)
    names.sort(key=lambda name: not _is_dora(model, name))
    already = set(merged_adapters(model))
    for name in already.intersection(names):
        warnings.warn(f"adapter {name!r} is already merged; merging it again does nothing", stacklevel=2)
    shared = _shared_weight_ids(model)
    work = []  # (layer, name, tied): every check passes before any weight is written
    merging = set()  # ids of layers some pending merge writes to
    for name in (n for n in names if n not in already):
        for path, layer in lora_layers(model):
            if name not in layer.specs:
                continue
            tied = id(layer.base_weight) in shared
            if tied and on_tied == "error":
                raise ConfigError(
                    f"{path!r} shares its weight with another module (tied weights); merging would change "
                    "both — use on_tied='untie' to give it a private copy"
                )
            try:
                layer.check_merge(name, safe=safe)
                if layer.is_dora(name) and id(layer) in merging:
                    raise ConfigError(
                        f"DoRA adapter {name!r} merges into the original weight, which another "
                        "adapter in this merge changes; merge one DoRA adapter per layer"
                    )
            except (ConfigError, ValueError) as error:
                raise type(error)(f"{path}: {error}") from None
            merging.add(id(layer))
            work.append((layer, name, tied))
    for layer, name, tied in work:
        layer.merge(name, untie=tied)


def unmerge_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Subtract merged adapters (default: all) from the base weights, restoring them up to float rounding."""
    names = merged_adapters(model) if names is None else list(names)
    names.sort(key=lambda name: _is_dora(model, name))  # DoRA last: it was merged into the original weight
    for name in names:
        get_entry(model, name)
        for _, layer in lora_layers(model):
            if layer.state.merged_scale(name) is not None:
                layer.unmerge(name)


def _is_dora(model: nn.Module, name: str) -> bool:
    return any(layer.is_dora(name) for _, layer in lora_layers(model))


def delete_adapter_layers(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer and wrapper; emptied wrappers give their module back."""
    for path, layer in list(lora_layers(model)):
        if name in layer.specs:
            layer.remove_adapter(name)
            if not layer.adapter_names:
                _unwrap(model, path, layer)
    for path, wrapper in list(saved_modules(model)):
        if name in wrapper.copies:
            wrapper.remove(name)
            if not wrapper.copies:
                model.set_submodule(path, wrapper.original_module)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; other adapters and the base weights stay as they were.

    Raises ``ConfigError`` for an unknown or merged adapter.
    """
    get_entry(model, name)
    if name in merged_adapters(model):
        raise ConfigError(f"adapter {name!r} is merged; unmerge(model) before deleting it")
    remaining = [n for n in active_adapters(model) if n != name]
    delete_adapter_layers(model, name)
    if adapters_of(model):
        set_active(model, remaining)
    else:
        disable_adapter_names_argument(model)


def unload(model: nn.Module, merge: bool = False, *, safe: bool = False) -> nn.Module:
    """Remove all LoRA layers and give back a plain model.

    With ``merge`` the active adapters are merged first (``safe``: refuse non-finite weights, see
    ``merge_adapters``) and active modules_to_save copies kept; otherwise the base model comes back as it was
    before any adapter (PiSSA residuals restored).
    """
    if merge:
        merge_adapters(model, safe=safe)
    else:
        unmerge_adapters(model)
    for path, layer in list(lora_layers(model)):
        merged = set(layer.state.merged_names)
        for name in layer.adapter_names:
            if name not in merged:
                layer.remove_adapter(name)  # gives a PiSSA adapter's principal part back to W0
        _unwrap(model, path, layer)
    for path, wrapper in list(saved_modules(model)):
        keep = wrapper.copies[wrapper.active] if merge and wrapper.active else wrapper.original_module
        model.set_submodule(path, keep)
    disable_adapter_names_argument(model)
    return model
