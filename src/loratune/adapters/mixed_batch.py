"""Mixed-adapter batches: each row of a batch runs with its own adapter (or the bare base, ``"__base__"``).

Rows are grouped by adapter once per call. Every LoRA layer then runs its base once on the whole batch, and
the batch's adapters as one stacked low-rank product with a per-row mask (see ``LoraLayer._add_row_groups``):
N rows over K adapters cost one base pass plus two small products, with no per-row loop. (With dropout in
training, each adapter runs once on its own rows instead.) Two ways in:

    model(input_ids, ..., adapter_names=["a", "__base__", "b", ...])   # one name per row
    with mixed_batch(model, adapter_names): ...                       # anything that calls the model
                                                                       # (e.g. transformers' generate)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from loratune.adapters.surgery import (
    ADAPTERS_ATTR,
    BASE_ADAPTER,
    adapters_of,
    lora_layers,
    saved_modules,
)
from loratune.errors import ConfigError
from loratune.layers import RowGroups
from loratune.validation import closest

_HOOKS_ATTR = ADAPTERS_ATTR + "_mixed_batch_hooks"
_LAST_GROUPS_ATTR = ADAPTERS_ATTR + "_last_row_groups"
ADAPTER_NAMES_KWARG = "adapter_names"


def row_groups(adapter_names: Sequence[str], device: torch.device) -> RowGroups:
    """The rows of each name, in first-appearance order (indices ``None`` when one name has every row)."""
    rows: dict[str, list[int]] = {}
    for index, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(index)
    names = tuple(rows)
    row_group = torch.tensor([names.index(name) for name in adapter_names], dtype=torch.long, device=device)
    if len(rows) == 1:
        return RowGroups(len(adapter_names), names, row_group, ((names[0], None),))
    groups = tuple((name, torch.tensor(indices, dtype=torch.long, device=device)) for name, indices in rows.items())
    return RowGroups(len(adapter_names), names, row_group, groups)


def _check_names(model: nn.Module, adapter_names: Sequence[str], layers: list[tuple[str, nn.Module]]) -> None:
    if isinstance(adapter_names, str) or not len(adapter_names):
        raise ConfigError(f"{ADAPTER_NAMES_KWARG} must be a list with one adapter name per row, got {adapter_names!r}")
    known = adapters_of(model)
    for name in dict.fromkeys(adapter_names):
        if name != BASE_ADAPTER and name not in known:
            choices = [*known, BASE_ADAPTER]
            hint = closest(str(name), choices)
            suggestion = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(
                f"{ADAPTER_NAMES_KWARG} names {name!r}, which is not an adapter of this model "
                f"(adapters: {', '.join(map(repr, choices))}){suggestion}"
            )
    merged = sorted({name for _, layer in layers for name in layer.merged})
    if merged:
        raise ConfigError(f"mixed-adapter batches need unmerged adapters, but {merged} are merged; unmerge(model) first")
    for path, layer in layers:
        if layer.pissa:
            raise ConfigError(
                f"{path!r} holds a PiSSA adapter, whose base weight is rewritten, so its rows cannot share a base "
                "pass with others; save it (as plain LoRA) and load it back to use it in mixed batches"
            )


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Inside the ``with`` block, row ``i`` of every batch given to ``model`` runs with adapter
    ``adapter_names[i]`` (at its current strength) or with none for ``"__base__"``; the active adapters and
    their settings are back as they were afterwards.

    Raises ``ConfigError`` for an unknown name (suggesting the closest), merged adapters or a PiSSA adapter.
    A batch whose size differs from ``len(adapter_names)`` raises ``ConfigError`` when it reaches a layer.
    """
    named_layers = list(lora_layers(model))  # one walk of the model per batch: this runs on every forward
    _check_names(model, adapter_names, named_layers)
    layers = [layer for _, layer in named_layers]
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    groups = _reused_row_groups(model, list(adapter_names))
    for module in (*layers, *wrappers):
        module.row_groups = groups
    try:
        yield model
    finally:
        for module in (*layers, *wrappers):
            module.row_groups = None


def _reused_row_groups(model: nn.Module, adapter_names: list[str]) -> RowGroups:
    """``row_groups`` for this batch, the same object as last time when the names are the same: the layers
    key their prepared factors on it, so repeated batches with one routing (a server, a benchmark, the
    steps of a generation) skip preparing them again."""
    device = _device_of(model)
    last = getattr(model, _LAST_GROUPS_ATTR, None)
    if last is not None and last[0] == adapter_names and last[1] == device:
        return last[2]
    groups = row_groups(adapter_names, device)
    setattr(model, _LAST_GROUPS_ATTR, (adapter_names, device, groups))
    return groups


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def enable_adapter_names_argument(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` run a mixed-adapter batch (idempotent).

    A forward pre-hook on the root module takes the argument out of the call and enters ``mixed_batch``; a
    forward hook leaves it, also when the forward raises.
    """
    if getattr(model, _HOOKS_ATTR, None) is not None:
        return
    exits: list[contextlib.ExitStack] = []

    def enter(module, args, kwargs):
        stack = contextlib.ExitStack()  # one per call, even an empty one, so that calls and leaves pair up
        exits.append(stack)
        names = kwargs.pop(ADAPTER_NAMES_KWARG, None)
        if names is not None:
            stack.enter_context(mixed_batch(module, names))
        return args, kwargs

    def leave(module, args, kwargs, output):
        if exits:
            exits.pop().close()
        return None

    handles = (
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True, always_call=True),
    )
    setattr(model, _HOOKS_ATTR, handles)


def disable_adapter_names_argument(model: nn.Module) -> None:
    """Remove what ``enable_adapter_names_argument`` installed (nothing when it was not)."""
    for handle in getattr(model, _HOOKS_ATTR, None) or ():
        handle.remove()
    for attr in (_HOOKS_ATTR, _LAST_GROUPS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
