"""How big an adapter is: trainable parameters, their share of the model, and bytes on disk; which experts of a
mixture-of-experts model it adapts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from loratune.adapters.peft_format import adapter_slots
from loratune.adapters.registry import active_adapters, adapters_of
from loratune.adapters.targets import expert_blocks
from loratune.layers.experts import expert_weight_names, stack_shape
from loratune.quant import Linear4bit
from loratune.quant.experts4bit import is_experts_4bit


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
    ) + sum(math.prod(p.expert_shape) - p.numel() for p in params if is_experts_4bit(p))
    names = [name] if name is not None else active_adapters(model)
    owned = {id(t): t for n in names for _, t in adapter_slots(model, n)}
    return ParameterReport(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params) + packed,
        adapter_params=sum(t.numel() for t in owned.values()),
        adapter_bytes=sum(t.numel() * t.element_size() for t in owned.values()),
    )


def expert_report(model: nn.Module, name: str | None = None) -> str | None:
    """One line on the experts of a mixture-of-experts ``model``: which of their weight stacks adapter ``name``
    (default: every adapter) adapts, or that it leaves them frozen and how to change that. None for a dense
    model."""
    blocks = expert_blocks(model)
    if not blocks:
        return None
    entries = adapters_of(model)
    keys = {k for n, e in entries.items() if name in (None, n) for k in e.parameter_paths}
    stacks = {key.rpartition(".")[2] for key in keys}
    experts = blocks[0][1].num_experts
    weights = sum(math.prod(stack_shape(getattr(owner, n))) for _, owner in blocks for n in expert_weight_names(owner))
    share = 100.0 * weights / parameter_report(model).total
    stored = {
        getattr(o, n).spec.quant_type
        for _, o in blocks
        for n in expert_weight_names(o)
        if is_experts_4bit(getattr(o, n))
    }
    storage = f", stored in 4 bits ({', '.join(sorted(stored))})" if stored else ""
    if not keys:
        return (
            f"experts: NOT adapted — {len(blocks)} MoE blocks of {experts} experts hold {share:.0f}% of the weights"
            f"{storage} and stay frozen; adapt them with lora.target_modules: all-linear or lora.target_parameters"
        )
    adapted_blocks = len({key.rpartition(".")[0] for key in keys})
    return (
        f"experts: LoRA on {', '.join(sorted(stacks))} of {adapted_blocks} of {len(blocks)} MoE blocks "
        f"({experts} experts each, {share:.0f}% of the weights{storage})"
    )
