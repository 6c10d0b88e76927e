"""Learning-rate schedule: linear warmup, then cosine, linear or constant. A pure function of the step,
so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def learning_rate(step: int, *, total_steps: int, base_lr: float, warmup_steps: int, kind: str) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup rises linearly from ``base_lr/warmup_steps`` to ``base_lr``; then ``cosine`` and ``linear`` decay
    to 0 at ``total_steps``, ``constant`` stays at ``base_lr``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown scheduler {kind!r}")
