"""Mixed-adapter batches: each row of a batch runs with its own adapter (or the bare base, ``"__base__"``).

Every LoRA layer gets the batch's ``Routing`` in its state; its execution backend then runs the base once on
the whole batch and the batch's adapters as one stacked low-rank product with a per-row mask (with dropout
in training, each adapter on its own rows). Two ways in:

    model(input_ids, ..., adapter_names=["a", "__base__", "b", ...])   # one name per row
    with mixed_batch(model, adapter_names): ...                       # anything that calls the model
                                                                       # (e.g. transformers' generate)
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Sequence

from torch import nn

from loratune.adapters.registry import lora_layers, saved_modules
from loratune.errors import ConfigError
from loratune.layers import BASE_ADAPTER, LoraLayer, Routing
from loratune.validation import closest

ADAPTER_NAMES_KWARG = "adapter_names"
_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its two hook handles


@functools.lru_cache(maxsize=64)
def routing_for(adapter_names: tuple[str, ...]) -> Routing:
    """The ``Routing`` of these names, the same object for the same names: layers keep their prepared factors
    for it, so repeated batches with one routing (a server, the steps of a generation) prepare them once."""
    return Routing(adapter_names)


def _check_names(routing: Routing, known: list[str], layers: list[tuple[str, nn.Module]]) -> None:
    for name, _ in routing.groups:
        if name != BASE_ADAPTER and name not in known:
            choices = [*known, BASE_ADAPTER]
            hint = closest(str(name), choices)
            suggestion = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(
                f"{ADAPTER_NAMES_KWARG} names {name!r}, which is not an adapter of this model "
                f"(adapters: {', '.join(map(repr, choices))}){suggestion}"
            )
    merged = sorted({name for _, layer in layers for name in layer.state.merged_names})
    if merged:
        raise ConfigError(
            f"mixed-adapter batches need unmerged adapters, but {merged} are merged; unmerge(model) first"
        )
    for path, layer in layers:
        if layer.pissa:
            raise ConfigError(
                f"{path!r} holds an adapter from a PiSSA or OLoRA start, whose base weight is rewritten, so its rows "
                "cannot share a base "
                "pass with others; save it (as plain LoRA) and load it back to use it in mixed batches"
            )


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Inside the ``with`` block, row ``i`` of every batch given to ``model`` runs with adapter
    ``adapter_names[i]`` (at its current strength) or with none for ``"__base__"``; every layer is back in
    the state it had afterwards. An entry may also be a mix, a tuple of ``(name, weight)`` pairs: that row runs
    each adapter at its strength times the weight (see ``layers.Routing``).

    Raises ``ConfigError`` for an unknown name (suggesting the closest), merged adapters or a PiSSA adapter.
    A batch whose size differs from ``len(adapter_names)`` raises ``ConfigError`` when it reaches a layer.
    """
    layers = list(lora_layers(model))  # one walk of the model per batch: this runs on every forward
    wrappers = [wrapper for _, wrapper in saved_modules(model)]
    known = [*dict.fromkeys([n for _, layer in layers for n in layer.specs] + [n for w in wrappers for n in w.copies])]
    if isinstance(adapter_names, str) or not len(adapter_names):
        raise ConfigError(f"{ADAPTER_NAMES_KWARG} must be a list with one adapter name per row, got {adapter_names!r}")
    routing = routing_for(tuple(adapter_names))
    _check_names(routing, known, layers)
    before = [
        (module, module.state.routing if isinstance(module, LoraLayer) else module.routing)
        for module in (*(layer for _, layer in layers), *wrappers)
    ]
    for module, _ in before:
        _route(module, routing)
    try:
        yield model
    finally:
        for module, previous in before:
            _route(module, previous)


def _route(module: nn.Module, routing: Routing | None) -> None:
    if isinstance(module, LoraLayer):
        module.set_routing(routing)
    else:
        module.routing = routing


def enable_adapter_names_argument(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` run a mixed-adapter batch (idempotent).

    A forward pre-hook on the root module takes the argument out of the call and enters ``mixed_batch``; a
    forward hook leaves it, also when the forward raises.
    """
    if model in _hooks:
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

    _hooks[model] = (
        model.register_forward_pre_hook(enter, with_kwargs=True),
        model.register_forward_hook(leave, with_kwargs=True, always_call=True),
    )


def adapter_names_hooks(model: nn.Module) -> set[int]:
    """The ids (keys of the module's hook dictionaries) of the hooks ``enable_adapter_names_argument`` installed."""
    return {handle.id for handle in _hooks.get(model, ())}


def disable_adapter_names_argument(model: nn.Module) -> None:
    """Remove what ``enable_adapter_names_argument`` installed (nothing when it was not)."""
    for handle in _hooks.pop(model, ()):
        handle.remove()
