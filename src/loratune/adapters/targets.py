"""Which modules of a model a ``LoraConfig`` adapts — the one place where module names are matched.

Semantics are PEFT's: list entries match a module path exactly or as a dotted suffix; a string is a regex
that must match the whole path; ``"all-linear"`` is every Linear/Conv1D except the output head; pattern keys
(``rank_pattern``, ``alpha_pattern``) match the end of a path at a dot boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from loratune.adapters.config import ALL_LINEAR, LoraConfig
from loratune.adapters.modules_to_save import ModulesToSaveWrapper
from loratune.adapters.registry import walk_modules
from loratune.errors import ConfigError
from loratune.layers import LoraLayer, is_linear, lora_class_for

_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Module paths LoRA could target: all but the insides of LoRA layers and of modules_to_save wrappers."""
    return walk_modules(model, (LoraLayer, ModulesToSaveWrapper))


def module_name_matches(names: str | list[str], path: str) -> bool:
    """Whether ``path`` is selected by ``names``: a list entry equal to it or a dotted suffix of it, or a
    regex (a string) matching all of it — how ``target_modules`` names modules."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return path in names or any(path.endswith("." + name) for name in names)


def is_module_to_save(path: str, modules_to_save: list[str] | None) -> bool:
    """Whether ``path`` is one of ``modules_to_save``. PEFT matches a plain string suffix, so ``"norm"``
    also selects ``input_layernorm``; we match the same way so that adapters load in both directions."""
    return bool(modules_to_save) and any(path.endswith(name) for name in modules_to_save)


def _inside_module_to_save(path: str, modules_to_save: list[str] | None) -> bool:
    # PEFT never puts LoRA on (or inside) a modules_to_save module; it checks with this pattern.
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def _layer_index(path: str, layers_pattern) -> int | None:
    if not layers_pattern:
        match = _DEFAULT_LAYER_INDEX.match(path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match:
                break
    return int(match.group("idx")) if match else None


def output_head_path(model: nn.Module) -> str | None:
    """Path of the model's output projection (``get_output_embeddings()``), when the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for path, module in model.named_modules():
        if module is head or (isinstance(module, LoraLayer) and module.base_layer is head):
            return path
    return None


def _is_linear(module: nn.Module) -> bool:
    return is_linear(module.base_layer if isinstance(module, LoraLayer) else module)


def is_target(config: LoraConfig, path: str, module: nn.Module, head: str | None) -> bool:
    """Whether ``config`` adapts the module at ``path`` (``head``: the output head's path, for all-linear)."""
    if config.exclude_modules and module_name_matches(config.exclude_modules, path):
        return False
    if _inside_module_to_save(path, config.modules_to_save):
        return False
    if config.target_modules == ALL_LINEAR:
        found = _is_linear(module) and path != head
    else:
        found = module_name_matches(config.target_modules, path)
    if found and config.layers_to_transform is not None:
        index = _layer_index(path, config.layers_pattern)
        wanted = config.layers_to_transform
        found = index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)
    return found


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs ``config`` adapts, in model order.

    Raises ``ConfigError`` when nothing matches (listing some module names) or when a matched module's type
    has no LoRA layer.
    """
    head = output_head_path(model)
    targets = []
    for path, module in candidate_modules(model):
        if not is_target(config, path, module, head):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if lora_class_for(base) is None:
            if config.target_modules == ALL_LINEAR:
                continue
            raise ConfigError(
                f"target module {path!r} is a {type(base).__name__}; LoRA supports Linear, Conv1D, Embedding and "
                "Conv1d/2d/3d (groups = 1) layers — narrow target_modules"
            )
        targets.append((path, module))
    if not targets:
        names = [p for p, m in candidate_modules(model) if lora_class_for(m) is not None][:8]
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches no module of this model; "
            f"some adaptable modules: {', '.join(names) or '(none)'}"
        )
    return targets


def pattern_value(patterns: dict[str, float], path: str, default):
    """The value of the first key in ``patterns`` that matches the end of ``path``; ``default`` if none."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def rank_and_alpha(config: LoraConfig, path: str) -> tuple[int, float]:
    """(r, lora_alpha) for the module at ``path`` after ``rank_pattern`` / ``alpha_pattern``."""
    return (
        int(pattern_value(config.rank_pattern, path, config.r)),
        float(pattern_value(config.alpha_pattern, path, config.lora_alpha)),
    )


def portable_target_modules(model: nn.Module, config: LoraConfig, adapted: list[str]) -> str | list[str]:
    """``target_modules`` to write in ``adapter_config.json``: reproduces exactly the ``adapted`` paths.

    ``"all-linear"`` is expanded to leaf names (as PEFT saves it) when those select the same modules, else to
    the full paths; other forms are kept as the user wrote them.
    """
    if config.target_modules != ALL_LINEAR:
        return config.target_modules
    leaves = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    as_leaves = config.model_copy(update={"target_modules": leaves})
    head = output_head_path(model)
    reproduced = [p for p, m in candidate_modules(model) if is_target(as_leaves, p, m, head)]
    return leaves if sorted(reproduced) == sorted(adapted) else sorted(adapted)
