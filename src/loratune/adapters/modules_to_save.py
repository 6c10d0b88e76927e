"""``modules_to_save``: modules trained in full alongside an adapter (e.g. a classification head).

Each adapter gets a private trainable copy; the original stays frozen and is what the base model runs.
"""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Holds the original module and one trainable copy per adapter; runs the copy of the active adapter."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None  # None runs the original

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
        module = self.copies[self.active] if self.active is not None else self.original_module
        return module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"copies={list(self.copies)}, active={self.active}"
