"""Row surgery on a batch's KV cache, for continuous batching.

The running batch is left-padded: every row's cache ends at the same column, so one decoding step appends one
column for all rows. A group of requests joins by padding the shorter side on the left and stacking rows;
finished rows leave by selecting the others, and columns that became padding for every row are dropped.
Only the plain growing cache (transformers' ``DynamicLayer``) can be cut this way; ``check_cache`` says so
once, before anything runs.

A decoding step (``inference.block_step``) keeps a layer's keys and values as views into buffers with room to
grow, registered here (``hold``); every cut forgets them first, so a layer's old buffers are freed as soon as its
new keys and values replace them — one layer's worth at a time, never a second copy of the whole cache.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from loratune.errors import ConfigError


def check_cache(cache) -> None:
    """Raise ``ConfigError`` unless every layer of ``cache`` is a plain growing KV cache."""
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [None])}
    if kinds != {DynamicLayer.__name__}:
        raise ConfigError(
            f"serve batches requests over a plain KV cache, but this model's cache has {sorted(kinds)} "
            "layers (sliding-window or hybrid attention); such models cannot be served yet"
        )


_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache layer -> (keys, values) buffers


def held(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (keys, values) buffers ``layer``'s keys and values were last made views of (see ``hold``), if any."""
    return _buffers.get(layer)


def hold(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Record that ``layer``'s keys and values are views into the buffers ``keys`` and ``values``."""
    _buffers[layer] = (keys, values)


def _replace(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    _buffers.pop(layer, None)
    layer.keys, layer.values = keys, values


def pad_left(cache, columns: int) -> None:
    """Add ``columns`` empty (zero, to be masked) positions before every row's cached tokens."""
    if columns <= 0:
        return
    for layer in cache.layers:
        _replace(layer, F.pad(layer.keys, (0, 0, columns, 0)), F.pad(layer.values, (0, 0, columns, 0)))


def drop_left(cache, columns: int) -> None:
    """Remove the first ``columns`` positions of every row (they must be padding for every row)."""
    if columns <= 0:
        return
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, columns:, :]  # (views of the same buffers: they stay held)
        layer.values = layer.values[:, :, columns:, :]


def stack_rows(cache, other) -> None:
    """Append ``other``'s rows to ``cache``'s (same number of columns)."""
    for layer, extra in zip(cache.layers, other.layers):
        _replace(layer, torch.cat([layer.keys, extra.keys]), torch.cat([layer.values, extra.values]))


def keep_rows(cache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (indices, in that order) of every layer."""
    for layer in cache.layers:
        _replace(layer, layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
