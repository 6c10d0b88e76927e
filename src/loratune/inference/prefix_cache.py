"""The keys and values of recent prompts, kept so that a prompt starting the same way reads only the rest.

Chat requests mostly begin alike: the template's system prompt and role markers are the same tokens every time,
and a conversation resends all of its earlier turns. A prompt's keys and values at a position depend only on the
tokens up to it (and on the weights and adapters it was read with), so the cache of an earlier prompt, cut to
the tokens both share, is the start of the new prompt's cache: the engine reads only the tokens after it.

``PromptPrefixes`` keeps the cache of the last prompts read alone (a prefill of one row), per routing key (the
adapters and strengths a sequence runs with), least recently used first out, within a byte budget (a prompt
larger than the budget keeps the first tokens that fit). It knows
nothing of weights: whoever changes them (loading or freeing an adapter, a training step between rollouts) calls
``clear``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers.cache_utils import DynamicCache

# the fewest shared tokens worth reusing (below that, reading them is as cheap as copying their cache)
MIN_SHARED = 4


class PromptPrefixes:
    """Prompts' caches (per layer: keys and values, 1 × heads × tokens × head size) by (routing key, prompt)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._bytes = 0
        self.reused_tokens = 0  # prompt tokens taken from here instead of read, since the engine started

    def clear(self) -> None:
        """Forget every prompt (the weights or adapters they were read with may have changed)."""
        self._entries.clear()
        self._bytes = 0

    def keep(self, routing_key: tuple, prompt: list[int], cache) -> None:
        """Keep a copy of ``cache`` (one row, exactly ``prompt``'s columns) for prompts starting like ``prompt``:
        the whole prompt, or as many of its first tokens as the budget holds (a long conversation's start is
        still worth reading from here)."""
        if self.budget_bytes <= 0 or not prompt:
            return
        per_token = _bytes_of([(layer.keys, layer.values) for layer in cache.layers]) // len(prompt)
        tokens = min(len(prompt), self.budget_bytes // max(per_token, 1))
        if tokens < MIN_SHARED:
            return
        layers = [(layer.keys[:, :, :tokens].clone(), layer.values[:, :, :tokens].clone()) for layer in cache.layers]
        size = _bytes_of(layers)
        key = (routing_key, tuple(prompt[:tokens]))
        if key in self._entries:
            self._bytes -= _bytes_of(self._entries.pop(key))
        while self._entries and self._bytes + size > self.budget_bytes:
            self._bytes -= _bytes_of(self._entries.popitem(last=False)[1])
        self._entries[key] = layers
        self._bytes += size

    def start_of(self, routing_key: tuple, prompt: list[int], config) -> tuple[int, DynamicCache] | None:
        """(shared tokens, a new cache holding their keys and values) from the kept prompt that shares the most
        leading tokens with ``prompt`` under the same routing, leaving at least the last token of ``prompt`` to
        read (its output is the first token's logits); None when none shares ``MIN_SHARED`` tokens."""
        best, found = 0, None
        for key, kept in self._entries:
            if key != routing_key:
                continue
            shared = _shared_length(kept, prompt)
            if shared > best:
                best, found = shared, (key, kept)
        best = min(best, len(prompt) - 1)
        if found is None or best < MIN_SHARED:
            return None
        self._entries.move_to_end(found)
        cache = DynamicCache(config=config)
        for index, (keys, values) in enumerate(self._entries[found]):
            cache.update(keys[:, :, :best].clone(), values[:, :, :best].clone(), index)
        self.reused_tokens += best
        return best, cache


def _shared_length(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _bytes_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
