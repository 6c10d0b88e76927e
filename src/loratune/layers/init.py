"""How an adapter's factors start: the one place that knows the initialisations.

``True`` (LoRA's): A Kaiming-uniform (a = √5), B zero, so the adapted model starts as the base model;
``"gaussian"``: A ~ N(0, 1/r²), B zero; ``False``: both random (a non-zero start, for tests);
``"pissa"``: A and B from the top-r singular triplets of W0, which keeps the residual (see ``pissa_start``).
Embeddings follow loralib/PEFT: A (a lookup table) zero and B normal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loratune.errors import ConfigError

INIT_CHOICES = (True, False, "gaussian", "pissa")
UNINITIALISED = "uninitialised"  # for loading: factors left empty, the caller fills every one of them


def check_init(init) -> None:
    """Raise ``ConfigError`` unless ``init`` is one of ``INIT_CHOICES`` (or ``UNINITIALISED``)."""
    if init not in INIT_CHOICES and init != UNINITIALISED:
        raise ConfigError(f"init_lora_weights={init!r} is not one of {INIT_CHOICES}")


def init_factors(A: torch.Tensor, B: torch.Tensor, init, *, embedding: bool = False) -> None:
    """Fill ``A`` (r × in) and ``B`` (out × r) in place as ``init`` says (not ``"pissa"``, see ``pissa_start``)."""
    with torch.no_grad():
        if embedding:
            if init not in (True, False, "gaussian"):
                raise ConfigError(f"init_lora_weights={init!r} is not supported for embeddings; use True or 'gaussian'")
            (nn.init.normal_ if init is False else nn.init.zeros_)(A)
            nn.init.normal_(B)
        elif init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # bound = 1/√in
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])
            nn.init.zeros_(B)
        elif init is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            check_init(init)
            raise ConfigError(f"init_lora_weights={init!r} needs the base weight; it is not a random start")


@dataclass(frozen=True)
class PissaStart:
    """The factors a PiSSA adapter started from; the base weight holds ``W0 − scaling·B0·A0``."""

    A0: torch.Tensor  # r × in, float32
    B0: torch.Tensor  # out × r, float32
    scaling: float

    def delta(self) -> torch.Tensor:
        """``scaling·B0·A0`` (out × in, float32): what the start took out of W0."""
        return self.scaling * (self.B0 @ self.A0)


def pissa_start(weight: torch.Tensor, r: int, scaling: float) -> PissaStart:
    """PiSSA's start for a weight (out × in): the top-r singular triplets split as √S on each side, divided by
    the scaling so that ``scaling·B0·A0`` is W0's best rank-r part."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    return PissaStart(root[:, None] * Vh[:r], U[:, :r] * root[None, :], scaling)
