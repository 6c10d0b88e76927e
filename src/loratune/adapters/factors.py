"""An adapter as per-module factors, and the SVD of a low-rank product without forming it.

Adapter modules change their weight by Δ = s·B·A (A: r × in, B: out × r; s = alpha/r or alpha/√r with
rsLoRA, after rank_pattern and alpha_pattern). A convolution's factors (A: r × in × k…, B: out × r × 1…) are
held flattened to those matrices, Δ being the change of the flattened kernel, and reshaped when written. An
adapter on a mixture-of-experts block's expert stack (``target_parameters``) holds E experts' factors in PEFT's
layout (A: (E·r) × in, B: out × (E·r), expert e's B columns interleaved); ``per_expert`` splits it into one
``Factors`` per expert (``path[e]``) so every verb handles an expert as it handles a module, and
``stacked_tensors`` writes them back. ``mix`` combines these; ``loratune.analysis`` measures and truncates them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.peft_keys import factor_keys, parse_factor_key
from loratune.adapters.targets import rank_and_alpha
from loratune.errors import ConfigError
from loratune.layers import is_residual_start, lora_scaling


@dataclass(frozen=True)
class Factors:
    """One module of one adapter: Δ = scaling·B·A with A: r × in, B: out × r (``embedding``: an embedding's;
    ``kernel``: a convolution's kernel size, A then flattened from r × in × kernel)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool
    kernel: tuple[int, ...] = ()
    experts: int = 0  # an expert stack's E (A, B in PEFT's stacked layout); 0: a module's

    @property
    def rank(self) -> int:
        return self.A.shape[0] // max(1, self.experts)

    def tensors(self, path: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
        """PEFT-keyed tensors of new factors ``A`` (k × in), ``B`` (out × k) for this module, shaped like these
        (a convolution's kernel restored), in ``dtype`` (default: these factors')."""
        a_key, b_key = factor_keys(path, self.embedding)
        A = A.reshape(A.shape[0], -1, *self.kernel) if self.kernel else A
        B = B.reshape(*B.shape, *(1,) * len(self.kernel))
        return {a_key: A.to(dtype or self.A.dtype).contiguous(), b_key: B.to(dtype or self.B.dtype).contiguous()}


def adapter_factors(
    config: LoraConfig, tensors: dict[str, torch.Tensor], source: str = "adapter"
) -> tuple[dict[str, Factors], dict[str, torch.Tensor]]:
    """Split PEFT-keyed ``tensors`` into ``{module path: Factors}`` (scaling from ``config``) and the other
    tensors (modules_to_save copies). Raises ``ConfigError`` naming ``source`` for an A without its B, a rank
    that disagrees with the config, or an adapter whose delta is not s·B·A (an unconverted PiSSA or OLoRA adapter)."""
    if is_residual_start(config.init_lora_weights):
        raise ConfigError(
            f"{source} is an unconverted adapter from init_lora_weights={config.init_lora_weights!r} (its delta is "
            "not s·B·A); load it with loratune and save it again, which converts it to plain LoRA, and use that"
        )
    factors, used = {}, set()
    owners = {name.rpartition(".")[0] for name in config.target_parameters or ()}
    for key in tensors:
        parsed = parse_factor_key(key)
        if parsed is None or parsed.factor != "A":
            continue
        module = parsed.path.removesuffix(".base_layer")
        while module.endswith(".base_layer"):
            module = module.removesuffix(".base_layer")
        stacked = any(module == owner or module.endswith("." + owner) for owner in owners)
        b_key = parsed.partner()
        A, B = tensors[key], tensors.get(b_key)
        kernel = tuple(A.shape[2:])
        if B is None or A.ndim < 2 or B.shape[1:] != (A.shape[0], *(1,) * len(kernel)):
            raise ConfigError(f"{source}: {key} has no matching {b_key} of shape (out, {A.shape[0]})")
        r, alpha = rank_and_alpha(config, parsed.path)
        # a stack of E experts holds E·r rows (a 2-D parameter's adapter is a Linear's: r rows)
        experts = A.shape[0] // r if stacked and A.shape[0] % r == 0 and A.shape[0] > r else 0
        if (r != A.shape[0] and not experts) or (experts and config.rank_pattern):
            raise ConfigError(
                f"{source}: {parsed.path} has rank {A.shape[0]} in the file but r={r} in its config"
                if not stacked
                else f"{source}: expert stacks with rank_pattern / alpha_pattern are not handled by this command yet"
            )
        scaling = lora_scaling(r, alpha, config.use_rslora)
        factors[parsed.path] = Factors(A.flatten(1), B.flatten(1), scaling, parsed.embedding, kernel, experts)
        used.update((key, b_key))
    others = {key: t for key, t in tensors.items() if key not in used}
    return factors, others


def expert_key(path: str, e: int) -> str:
    """The name of expert ``e`` of the stack adapted at ``path`` (as reports list it)."""
    return f"{path}[{e}]"


def per_expert(factors: dict[str, Factors]) -> dict[str, Factors]:
    """``factors`` with every expert stack split into one ``Factors`` per expert (``expert_key``); modules stay."""
    split = {}
    for path, f in factors.items():
        if not f.experts:
            split[path] = f
            continue
        E, r = f.experts, f.rank
        A_e = f.A.view(E, r, -1)
        B_e = f.B.view(f.B.shape[0], r, E)
        for e in range(E):
            split[expert_key(path, e)] = Factors(A_e[e], B_e[:, :, e], f.scaling, False)
    return split


def stacked_tensors(path: str, experts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> dict:
    """PEFT-keyed tensors of the stack at ``path`` from each expert's new factors (A_e: k_e × in, B_e: out × k_e),
    zero-padded to the largest k (a zero rank-1 term changes nothing)."""
    k = max(A.shape[0] for A, _ in experts)
    E, inp, out = len(experts), experts[0][0].shape[1], experts[0][1].shape[0]
    A = torch.zeros(E, k, inp, dtype=dtype)
    B = torch.zeros(out, k, E, dtype=dtype)
    for e, (A_e, B_e) in enumerate(experts):
        A[e, : A_e.shape[0]] = A_e.to(dtype)
        B[:, : B_e.shape[1], e] = B_e.to(dtype)
    a_key, b_key = factor_keys(path)
    return {a_key: A.reshape(E * k, inp).contiguous(), b_key: B.reshape(out, k * E).contiguous()}


def restack(
    tensors_by_key: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(PEFT-keyed tensors, {path: rank}) of every stack whose experts' new factors (A_e, B_e) ``tensors_by_key``
    holds under ``expert_key`` names."""
    stacks: dict[str, dict[int, tuple]] = {}
    for key, pair in tensors_by_key.items():
        path, _, index = key[:-1].rpartition("[")
        stacks.setdefault(path, {})[int(index)] = pair
    out, ranks = {}, {}
    for path, experts in stacks.items():
        out.update(stacked_tensors(path, [experts[e] for e in range(len(experts))], dtype))
        ranks[path] = max(A.shape[0] for A, _ in experts.values())
    return out, ranks


def is_expert_key(key: str) -> bool:
    """Whether ``key`` names one expert of a stack (``expert_key``)."""
    return key.endswith("]") and "[" in key


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of B·A (B: out × R, A: R × in) from QR factors: B·A = Qb·(Rb·Raᵀ)·Qaᵀ, SVD of the small core."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def balanced_factors(U, S, Vh, k: int):
    """(A: k × in, B: out × k, energy kept) with B·A the rank-k truncation of U·diag(S)·Vh, √σ on each side
    (balanced magnitudes); energy = Σ_{i≤k} σᵢ² / Σ σᵢ² (1 for a zero matrix)."""
    k = max(1, min(k, S.numel()))
    root = S[:k].sqrt()
    total = float((S**2).sum())
    energy = float((S[:k] ** 2).sum()) / total if total > 0 else 1.0
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :], energy


def numerical_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values ``S`` (descending) exceed σ₁·max(shape)·ε_float32: the rank that keeps the
    matrix exact in float32."""
    if S.numel() == 0 or S[0] == 0:
        return 0
    return int((S[0] * max(shape) * torch.finfo(torch.float32).eps < S).sum())


def unit_scaling_fields(ranks: dict[str, int]) -> dict:
    """``LoraConfig`` fields that give each module path in ``ranks`` its rank and scaling s = 1: the most common
    rank as ``r``, the rest in ``rank_pattern`` (full paths), ``lora_alpha`` = r per module, no rsLoRA. For
    adapters written as plain products B·A (mixed, resized, extracted)."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))
    rank_pattern = {path: k for path, k in sorted(ranks.items()) if k != r}
    return {
        "r": r,
        "lora_alpha": float(r),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {path: float(k) for path, k in rank_pattern.items()},
        "use_rslora": False,
        "init_lora_weights": True,
    }
