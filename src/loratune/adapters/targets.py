"""Which modules of a model a ``LoraConfig`` adapts — the one place where module names are matched.

Semantics are PEFT's: list entries match a module path exactly or as a dotted suffix; a string is a regex
that must match the whole path; ``"all-linear"`` is every Linear/Conv1D except the output head (and, on a
mixture-of-experts model, its routers); pattern keys (``rank_pattern``, ``alpha_pattern``) match the end of a
path at a dot boundary. ``target_parameters`` entries match a parameter's full name (``<module path>.<name>``)
exactly or as a dotted suffix; with ``target_parameters`` unset, ``"all-linear"`` also adapts the expert stacks
of fused mixture-of-experts blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from loratune.adapters.config import ALL_LINEAR, LoraConfig
from loratune.adapters.fused_experts_peft import misread_by_peft
from loratune.adapters.modules_to_save import ModulesToSaveWrapper
from loratune.adapters.registry import walk_modules
from loratune.errors import ConfigError
from loratune.layers import AdaptedModule, LoraLayer, LoraParameter, is_linear, lora_class_for
from loratune.layers.experts import expert_weight_names, is_fused_experts

_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Module paths LoRA could target: all but the insides of LoRA layers, of modules that carry adapted
    parameters, and of modules_to_save wrappers."""
    return walk_modules(model, (LoraLayer, ModulesToSaveWrapper, AdaptedModule))


def parameter_owners(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module whose own parameters ``target_parameters`` could name, as PEFT sees
    them: a LoRA layer's or an adapted module's original under the wrapper's path."""
    for path, module in candidate_modules(model):
        if isinstance(module, AdaptedModule) or (
            isinstance(module, LoraLayer) and not isinstance(module, LoraParameter)
        ):
            yield path, module.base_layer
        elif not isinstance(module, ModulesToSaveWrapper):
            yield path, module


def expert_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the fused experts modules of a mixture-of-experts model (empty for a dense model)."""
    return [(path, owner) for path, owner in parameter_owners(model) if is_fused_experts(owner)]


def _routers(model: nn.Module) -> set[str]:
    # a Linear with one output per expert inside an MoE block (the experts' parent) is that block's router
    found = set()
    blocks = [(path.rpartition(".")[0], owner.num_experts) for path, owner in expert_blocks(model)]
    if not blocks:
        return found
    for path, module in candidate_modules(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if is_linear(base) and any(
            path.startswith(parent + ".") and getattr(base, "out_features", None) == n for parent, n in blocks
        ):
            found.add(path)
    return found


def module_name_matches(names: str | list[str], path: str) -> bool:
    """Whether ``path`` is selected by ``names``: a list entry equal to it or a dotted suffix of it, or a
    regex (a string) matching all of it — how ``target_modules`` names modules."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return path in names or any(path.endswith("." + name) for name in names)


def is_module_to_save(path: str, modules_to_save: list[str] | None, plain_suffix: bool = False) -> bool:
    """Whether ``path`` is one of ``modules_to_save``: a module of that name (the whole path or its dotted
    suffix), as PEFT matches since 0.22. ``plain_suffix``: a plain string suffix, as PEFT matched before (so
    ``"norm"`` also selected ``input_layernorm``), for adapters those versions wrote."""
    if not modules_to_save:
        return False
    if plain_suffix:
        return any(path.endswith(name) for name in modules_to_save)
    return module_name_matches(list(modules_to_save), path)


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


def is_target(config: LoraConfig, path: str, module: nn.Module, head: str | None, routers=frozenset()) -> bool:
    """Whether ``config`` adapts the module at ``path`` (``head``: the output head's path, ``routers``: the
    MoE routers' paths, both left out of all-linear)."""
    if config.exclude_modules and module_name_matches(config.exclude_modules, path):
        return False
    if _inside_module_to_save(path, config.modules_to_save):
        return False
    if config.target_modules == ALL_LINEAR:
        found = _is_linear(module) and path != head and path not in routers
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
    if not config.target_modules:  # PEFT's target_modules: null, parameters only
        return []
    head, routers = output_head_path(model), _routers(model)
    targets = []
    for path, module in candidate_modules(model):
        if not is_target(config, path, module, head, routers):
            continue
        base = module.base_layer if isinstance(module, (LoraLayer, AdaptedModule)) else module
        if lora_class_for(base) is None:
            if config.target_modules == ALL_LINEAR:
                continue
            if is_fused_experts(base):
                raise ConfigError(
                    f"target module {path!r} holds expert weights ({', '.join(expert_weight_names(base))}), not a "
                    f"Linear; adapt them with lora.target_parameters: {_suffixes(path, expert_weight_names(base))}"
                )
            raise ConfigError(
                f"target module {path!r} is a {type(base).__name__}; LoRA supports Linear, Conv1D, Embedding and "
                "Conv1d/2d/3d (groups = 1) layers — narrow target_modules"
            )
        targets.append((path, module))
    if not targets and find_parameter_targets(model, config):
        return []
    if not targets:
        names = [p for p, m in candidate_modules(model) if lora_class_for(m) is not None][:8]
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches no module of this model; "
            f"some adaptable modules: {', '.join(names) or '(none)'}"
        )
    return targets


def _suffixes(path: str, names: list[str]) -> list[str]:
    owner = path.rpartition(".")[2]
    return [f"{owner}.{name}" for name in names]


def _key_matches(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith("." + name) for name in names)


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(owner module path, parameter name) for each parameter ``config`` adapts directly, in model order.

    ``target_parameters`` as PEFT matches it; unset, with ``target_modules: all-linear``, the expert stacks of
    every fused experts module (those ``exclude_modules`` and ``layers_to_transform`` keep). Raises
    ``ConfigError`` when a given list matches nothing (naming the model's expert parameters).
    """
    names = config.target_parameters
    if names is None:
        if config.target_modules != ALL_LINEAR:
            return []
        found = []
        for path, owner in expert_blocks(model):
            keys = [f"{path}.{name}" for name in expert_weight_names(owner)]
            if config.exclude_modules and (
                module_name_matches(config.exclude_modules, path)
                or any(module_name_matches(config.exclude_modules, key) for key in keys)
            ):
                continue
            if _inside_module_to_save(path, config.modules_to_save):
                continue
            if config.layers_to_transform is not None:
                index, wanted = _layer_index(path + ".", config.layers_pattern), config.layers_to_transform
                if index is None or index not in ([wanted] if isinstance(wanted, int) else wanted):
                    continue
            found += [(path, name) for name in expert_weight_names(owner)]
        return found
    found = [
        (path, name)
        for path, owner in parameter_owners(model)
        for name, _ in owner.named_parameters(recurse=False)
        if _key_matches(names, f"{path}.{name}")
    ]
    if names and not found:
        experts = [f"{p}.{n}" for p, owner in expert_blocks(model)[:1] for n in expert_weight_names(owner)]
        hint = (
            f"expert parameters here look like {', '.join(experts)}" if experts else "this model has no fused experts"
        )
        raise ConfigError(f"target_parameters={names!r} matches no parameter of this model; {hint}")
    return found


def portable_target_parameters(model: nn.Module, config: LoraConfig, adapted: list[str]) -> list[str] | None:
    """``target_parameters`` to write in ``adapter_config.json`` for the ``adapted`` parameter keys: as given,
    or (all-linear's experts) the shortest suffixes — ``"experts.gate_up_proj"`` — that select exactly them
    under PEFT's matching, else the full keys. None when nothing is adapted that way."""
    if config.target_parameters is not None:
        return list(config.target_parameters) or None
    if not adapted:
        return None
    every = [
        f"{path}.{name}" for path, owner in parameter_owners(model) for name, _ in owner.named_parameters(recurse=False)
    ]
    for depth in (2, 3):
        suffixes = sorted({".".join(key.split(".")[-depth:]) for key in adapted})
        if sorted(key for key in every if _key_matches(suffixes, key)) == sorted(adapted):
            return suffixes
    return sorted(adapted)


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
    the full paths; other forms are kept as the user wrote them. Modules PEFT would take for fused expert
    projections by their leaf name (``fused_experts_peft``) are written as full paths, which a PEFT with
    huggingface/peft#3711 fixed keeps as modules.
    """
    if config.target_modules != ALL_LINEAR:
        return config.target_modules
    misread = set(misread_by_peft(model, adapted))
    leaves = sorted({path.rsplit(".", 1)[-1] for path in adapted if path not in misread} | misread)
    as_leaves = config.model_copy(update={"target_modules": leaves})
    head = output_head_path(model)
    reproduced = [p for p, m in candidate_modules(model) if is_target(as_leaves, p, m, head)]
    return leaves if sorted(reproduced) == sorted(adapted) else sorted(adapted)
