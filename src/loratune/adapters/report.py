"""How big an adapter is: trainable parameters, their share of the model, and bytes on disk."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loratune.adapters.peft_format import adapter_slots
from loratune.adapters.registry import active_adapters
from loratune.quant import Linear4bit


@dataclass(frozen=True)
class ParameterReport:
    """Trainable and total parameter counts and the adapter's size in bytes (as saved)."""

    trainable: int
    total: int
    adapter_params: int
    adapter_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        counts = f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        if not self.adapter_params:
            return counts
        return f"{counts} || adapter: {self.adapter_params:,} params, {self.adapter_bytes / 2**20:.2f} MiB"


def parameter_report(model: nn.Module, name: str | None = None) -> ParameterReport:
    """Counts for ``model``: trainable and total parameters (tied weights counted once; a 4-bit weight counts
    its out × in parameters, not its packed bytes), and the parameters and bytes of adapter ``name`` (default:
    the active adapters together)."""
    params = list(model.parameters())  # deduplicates tied weights
    # Packed 4-bit data holds two parameters per byte: count what it stands for.
    packed = sum(
        m.in_features * m.out_features - m.weight.numel() for m in model.modules() if isinstance(m, Linear4bit)
    )
    names = [name] if name is not None else active_adapters(model)
    owned = {id(t): t for n in names for _, t in adapter_slots(model, n)}
    return ParameterReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params) + packed,
        adapter_params=sum(t.numel() for t in owned.values()),
        adapter_bytes=sum(t.numel() * t.element_size() for t in owned.values()),
    )
