"""``modules_to_save``: modules trained in full alongside an adapter (e.g. a classification head).

Each adapter gets a private trainable copy; the original stays frozen and is what the base model runs.
"""

from __future__ import annotations

import copy

from torch import nn

from loratune.errors import ConfigError
from loratune.layers import Routing
from loratune.layers.state import row_tensors


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and one trainable copy per adapter; runs the copy of the active adapter (or,
    in a mixed-adapter batch, each row's adapter's copy)."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None  # None runs the original
        self.routing: Routing | None = None  # set by adapters.mixed_batch(): one adapter per row

    def add(self, name: str) -> None:
        """Give adapter ``name`` its own trainable copy of the original module."""
        duplicate = copy.deepcopy(self.original_module)
        for param in duplicate.parameters():
            param.requires_grad_(True)
        self.copies[name] = duplicate

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def forward(self, *args, **kwargs):
        if self.routing is not None:
            return self._forward_routed(*args, **kwargs)
        module = self.copies[self.active] if self.active is not None else self.original_module
        return module(*args, **kwargs)

    def _forward_routed(self, x, *args, **kwargs):
        """Each group of rows (dim 0 of ``x``) through its adapter's copy, or the original for the others."""
        self.routing.check_rows(x.shape[0])
        rows_of = row_tensors(self.routing, x.device)
        groups = [(self.copies[name], rows) for name, (rows, _) in rows_of.items() if name in self.copies]
        if len(groups) > 1:
            taken = [set(indices) for name, indices in self.routing.groups if name in self.copies]
            if len(set().union(*taken)) < sum(map(len, taken)):
                raise ConfigError(
                    "a row mixes two adapters that each replace this whole module (modules_to_save); "
                    "such adapters cannot be mixed on one row"
                )
        if len(groups) == 1 and groups[0][1] is None:
            return groups[0][0](x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        for module, rows in groups:
            result = result.index_copy(0, rows, module(x.index_select(0, rows), *args, **kwargs))
        return result

    def extra_repr(self) -> str:
        return f"copies={list(self.copies)}, active={self.active}"
