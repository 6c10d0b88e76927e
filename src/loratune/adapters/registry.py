"""What adapters a model holds, read from the modules that hold them.

Nothing is stored on the user's model itself: each LoRA layer records the config its adapters were created
from (``AdapterSpec.config``) and what it does now (``LayerState``); modules_to_save wrappers hold their
copies. So the functions here work from any module that contains the adapted model, and they are the one
way the rest of loratune asks "which adapters, which active, which merged".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from loratune.adapters.config import LoraConfig
from loratune.adapters.modules_to_save import ModulesToSaveWrapper
from loratune.errors import ConfigError
from loratune.layers import AdaptedModule, LoraLayer, LoraParameter


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter of a model: its config and the module paths it touches."""

    config: LoraConfig
    lora_paths: list[str]  # LoRA on modules (Linear, Embedding, ...)
    saved_paths: list[str] = field(default_factory=list)  # modules_to_save copies
    parameter_paths: list[str] = field(default_factory=list)  # LoRA on parameters (expert stacks): their keys


def walk_modules(model: nn.Module, skip_inside: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for the submodules of ``model`` in ``named_modules`` order (each module once), without
    walking the insides of modules of the ``skip_inside`` types: a model can hold hundreds of LoRA layers."""
    seen = {id(model)}

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module._modules.items():  # named_children() costs several times more
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            yield prefix + name, child
            if not isinstance(child, skip_inside):
                yield from walk(child, prefix + name + ".")

    return walk(model, "")


_WRAPPERS = (LoraLayer, ModulesToSaveWrapper, AdaptedModule)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(path, layer) for every LoRA layer in ``model``; a ``LoraParameter``'s path is its parameter's full name."""
    for path, module in walk_modules(model, _WRAPPERS):
        if isinstance(module, LoraLayer):
            yield path, module
        elif isinstance(module, AdaptedModule):
            for name, layer in module.parameter_layers():
                yield f"{path}.{name}", layer


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """(path, wrapper) for every modules_to_save wrapper in ``model``."""
    for path, module in walk_modules(model, _WRAPPERS):
        if isinstance(module, ModulesToSaveWrapper):
            yield path, module


def adapters_of(model: nn.Module) -> dict[str, AdapterEntry]:
    """The adapters on ``model`` by name, in creation order (empty when there are none)."""
    found: dict[str, tuple[int, LoraConfig, list[str], list[str]]] = {}
    for path, layer in lora_layers(model):
        for name, spec in layer.specs.items():
            paths = found.setdefault(name, (spec.order, spec.config, [], []))
            paths[3 if isinstance(layer, LoraParameter) else 2].append(path)
    saved: dict[str, list[str]] = {}
    for path, wrapper in saved_modules(model):
        for name in wrapper.copies:
            saved.setdefault(name, []).append(path)
    ordered = sorted(found.items(), key=lambda item: item[1][0])
    return {
        name: AdapterEntry(config, paths, saved.get(name, []), parameters)
        for name, (_, config, paths, parameters) in ordered
    }


def get_entry(model: nn.Module, name: str) -> AdapterEntry:
    """The entry of adapter ``name``; ``ConfigError`` naming the existing adapters when there is none."""
    entries = adapters_of(model)
    if name not in entries:
        have = ", ".join(repr(n) for n in entries) or "none"
        raise ConfigError(f"no adapter named {name!r} on this model (adapters: {have})")
    return entries[name]


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters that currently act, in activation order."""
    names: dict[str, None] = {}
    known: set[str] = set()
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.state.active))  # every layer holds the whole active list
        known.update(layer.specs)
    return [name for name in names if name in known]


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters merged into the base weights."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.state.merged_names))
    return list(names)
