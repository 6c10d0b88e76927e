"""What a LoRA layer does at a given moment, as an immutable value, and the terms that makes act.

``LayerState`` says which adapters act and how strongly, which are merged into the base weight, whether the
bare base runs, and, for a mixed-adapter batch, which adapter each row uses (``Routing``). A layer replaces
its state through explicit methods and never mutates it, so "has anything changed?" is "is it still the same
state (or an equal one)?": execution backends key their caches on it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from loratune.errors import ConfigError

BASE_ADAPTER = "__base__"  # PEFT's word for "no adapter" in mixed batches


@dataclass(frozen=True)
class Routing:
    """Which adapters act on each row (dim 0) of a batch. Each entry of ``names`` is one row: an adapter name
    (a name a layer lacks, e.g. ``"__base__"``, means no adapter on that row there), or a mix, a tuple of
    ``(name, weight)`` pairs: that row runs ``Σ weight·scale·B·A`` over them (an empty mix is the bare base).
    A plain value: equal routings (same entries in the same order) are interchangeable, and what backends derive
    from one lives outside it (``row_tensors``, ``layers.execution``)."""

    names: tuple
    groups: tuple[tuple[str, tuple[int, ...]], ...] = field(init=False, repr=False, compare=False)
    weights: tuple[tuple[str, tuple[float, ...]], ...] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        rows: dict[str, list[int]] = {}
        weights: dict[str, list[float]] = {}
        for index, entry in enumerate(self.names):
            for name, weight in ((entry, 1.0),) if isinstance(entry, str) else entry:
                rows.setdefault(name, []).append(index)
                weights.setdefault(name, []).append(float(weight))
        # by name, so that routings of the same adapters list them (and layers stack them) in one order
        object.__setattr__(self, "groups", tuple((name, tuple(rows[name])) for name in sorted(rows)))
        object.__setattr__(
            self,
            "weights",
            tuple((name, tuple(w)) for name, w in sorted(weights.items()) if any(x != 1.0 for x in w)),
        )
        object.__setattr__(self, "_hash", hash(self.names))  # looked up once per layer per step: hash it once

    def __hash__(self) -> int:
        return self._hash

    @property
    def n_rows(self) -> int:
        return len(self.names)

    @property
    def weighted(self) -> bool:
        """Whether some row runs an adapter at a weight other than 1."""
        return bool(self.weights)

    def check_rows(self, rows: int) -> None:
        """Raise ``ConfigError`` unless a batch of ``rows`` rows fits this routing."""
        if rows != self.n_rows:
            raise ConfigError(
                f"adapter_names has {self.n_rows} names but the batch has {rows} rows; give exactly one name per row"
            )


_row_tensors: weakref.WeakKeyDictionary[Routing, dict] = weakref.WeakKeyDictionary()


def row_tensors(routing: Routing, device: torch.device) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(row indices, weight of each of those rows) of each adapter ``routing`` names, on ``device``: indices None
    for a name that has every row at weight 1, weights None when they are all 1. Made once per routing and device
    (every layer of a batch asks)."""
    per_device = _row_tensors.setdefault(routing, {})
    found = per_device.get(device)
    if found is None:
        weights_of = dict(routing.weights)
        found = {}
        for name, indices in routing.groups:
            weights = weights_of.get(name)
            everywhere = len(indices) == routing.n_rows and weights is None
            found[name] = (
                None if everywhere else torch.tensor(indices, dtype=torch.long, device=device),
                None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device),
            )
        per_device[device] = found
    return found


@dataclass(frozen=True)
class LayerState:
    """What a LoRA layer does now.

    ``active``: the adapters that act, in activation order (names a layer lacks are ignored there);
    ``strengths``: (name, strength) for adapters whose strength is not 1.0; ``merged``: (name, scale) for
    adapters whose ``scale·B·A`` was added into the base weight; ``base_only``: run the original base (a
    PiSSA layer adds back what it took out); ``routing``: a mixed-adapter batch, one adapter per row.
    """

    active: tuple[str, ...] = ()
    strengths: tuple[tuple[str, float], ...] = ()
    merged: tuple[tuple[str, float], ...] = ()
    base_only: bool = False
    routing: Routing | None = None

    def strength(self, name: str) -> float:
        """The strength of adapter ``name`` (1.0 unless set)."""
        for key, value in self.strengths:
            if key == name:
                return value
        return 1.0

    def merged_scale(self, name: str) -> float | None:
        """The scale adapter ``name`` was merged with, or None when it is not merged."""
        for key, value in self.merged:
            if key == name:
                return value
        return None

    @property
    def merged_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.merged)

    def with_strength(self, name: str, value: float) -> LayerState:
        kept = tuple((k, v) for k, v in self.strengths if k != name)
        return replace(self, strengths=kept if value == 1.0 else (*kept, (name, float(value))))

    def with_merged(self, name: str, scale: float | None) -> LayerState:
        """This state with ``name`` merged at ``scale`` (or unmerged, for None)."""
        kept = tuple((k, v) for k, v in self.merged if k != name)
        return replace(self, merged=kept if scale is None else (*kept, (name, scale)))

    def without(self, name: str) -> LayerState:
        """This state with every mention of adapter ``name`` gone (it was deleted)."""
        return replace(
            self.with_strength(name, 1.0).with_merged(name, None), active=tuple(n for n in self.active if n != name)
        )


@dataclass(frozen=True)
class Term:
    """One summand of a layer's output: ``scale·B(A(dropout(x)))`` on ``rows`` of the batch (None: all rows),
    times ``row_weights`` per row when given.

    A DoRA term (``magnitude`` set) adds ``t·((g − 1) ⊙ W0·x + g ⊙ s·B·A·x)`` instead, with ``g`` the magnitude
    over the row norms of ``W0 + s·B·A`` (see ``layers.dora``); ``scale`` is still ``s·t``."""

    A: torch.Tensor  # r × in (an embedding's: r × num_embeddings)
    B: torch.Tensor  # out × r
    scale: float
    dropout: nn.Module
    rows: torch.Tensor | None = None
    row_weights: torch.Tensor | None = None  # float32, one per entry of rows: a mixed batch's per-row weights
    magnitude: torch.Tensor | None = None  # DoRA: m, one entry per output row
    scaling: float = 0.0  # DoRA: s alone, which the row norms use

    @property
    def strength(self) -> float:
        """A DoRA term's strength ``t``."""
        return self.scale / self.scaling
