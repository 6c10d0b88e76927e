"""How an adapter's factors start: the one place that knows the initialisations.

``True`` (LoRA's): A Kaiming-uniform (a = √5), B zero, so the adapted model starts as the base model;
``"gaussian"``: A ~ N(0, 1/r²), B zero; ``False``: both random (a non-zero start, for tests);
``"pissa"``: A and B from the top-r singular triplets of W0, which keeps the residual (see ``pissa_start``);
``"pissa_niter_N"``: the same from a randomized SVD with N subspace iterations (fast on large weights);
``"olora"``: A and B from the first r rows of R and columns of Q in W0 = Q·R (OLoRA). These three *residual
starts* move ``s·B0·A0`` out of W0, so the model starts where the base is. Embeddings follow loralib/PEFT:
A (a lookup table) zero and B normal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from loratune.errors import ConfigError

INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_N", "olora")
UNINITIALISED = "uninitialised"  # for loading: factors left empty, the caller fills every one of them
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def is_valid_init(init) -> bool:
    """Whether ``init`` is one of ``INIT_CHOICES`` ("pissa_niter_N" with N a positive integer)."""
    if isinstance(init, str) and _PISSA_NITER.fullmatch(init):
        return True
    return init in INIT_CHOICES and init != "pissa_niter_N"


def is_residual_start(init) -> bool:
    """Whether ``init`` takes its factors out of W0 (PiSSA, its randomized variant, OLoRA)."""
    return init in ("pissa", "olora") or (isinstance(init, str) and _PISSA_NITER.fullmatch(init) is not None)


def check_init(init) -> None:
    """Raise ``ConfigError`` unless ``init`` is one of ``INIT_CHOICES`` (or ``UNINITIALISED``)."""
    if not is_valid_init(init) and init != UNINITIALISED:
        raise ConfigError(f"init_lora_weights={init!r} is not one of {INIT_CHOICES} (N: a positive integer)")


def init_factors(A: torch.Tensor, B: torch.Tensor, init, *, embedding: bool = False, rank: int | None = None) -> None:
    """Fill ``A`` (r × in) and ``B`` (out × r) in place as ``init`` says (not ``"pissa"``, see ``pissa_start``).
    ``rank``: r when A stacks several adapters' rows (experts: E·r × in); default A's row count."""
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
            nn.init.normal_(A, std=1 / (rank or A.shape[0]))
            nn.init.zeros_(B)
        elif init is False:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            check_init(init)
            raise ConfigError(f"init_lora_weights={init!r} needs the base weight; it is not a random start")


@dataclass(frozen=True)
class PissaStart:
    """The factors a residual start (PiSSA, its randomized variant, OLoRA) began from; the base weight holds
    ``W0 − scaling·B0·A0``."""

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
    return _split_singular(U[:, :r], S[:r], Vh[:r], scaling)


def _split_singular(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> PissaStart:
    root = torch.sqrt(S / scaling)
    return PissaStart(root[:, None] * Vh, U * root[None, :], scaling)


def residual_start(init: str, weight: torch.Tensor, r: int, scaling: float) -> PissaStart:
    """The start factors of residual start ``init`` for a weight (out × in), as PEFT defines them:

    ``"pissa"``: exact SVD (``pissa_start``); ``"pissa_niter_N"``: ``torch.svd_lowrank`` with q = r and N
    subspace iterations (random: depends on torch's generator), split the same way; ``"olora"``: W0 = Q·R
    (reduced QR), B0 = Q[:, :r], A0 = R[:r] — not divided by the scaling, as in PEFT."""
    weight = weight.detach().float()
    if init == "pissa":
        return pissa_start(weight, r, scaling)
    if init == "olora":
        Q, R = torch.linalg.qr(weight)
        return PissaStart(R[:r].contiguous(), Q[:, :r].contiguous(), scaling)
    niter = int(_PISSA_NITER.fullmatch(init).group(1))
    U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
    return _split_singular(U, S, V.T, scaling)
