"""The compiled CPU kernel for an unmerged LoRA layer's update on a few rows: ``out += (x·Aᵀ)·(s·Bᵀ)``.

Decoding runs every LoRA layer once per token on one row (or one row per prompt). In PyTorch operations the
update is four calls (cast x to float32, two rank-r products, the add), each of which costs microseconds of
dispatch and cold caches right after the base layer's product: more than the arithmetic. The kernel
(``csrc/lowrank_body.h``, built by ``pip install``) does it in one call, in float32, and writes the rounded sum
into the base output. When it was not built (no C compiler), or the kernels are off (``LORATUNE_NO_KERNEL=1``,
``LORATUNE_KERNEL_ISA=none``; see ``loader``), loratune runs the same arithmetic through PyTorch operations.
"""

from __future__ import annotations

import torch

from loratune.kernels.loader import compiled as _cpu
from loratune.kernels.loader import isa, kernel_available

MAX_RANK = _cpu.MAX_RANK if _cpu is not None else 0
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}


def kernel_isa() -> str | None:
    """The variant the kernel runs with (``baseline``, ``avx2``, ``avx512``, ``avx512bf16`` or ``amx``; the last
    two run its AVX-512 code); None when the kernels are off or not built."""
    current = isa()
    return None if current == "none" else current


def raw_kernel():
    """``add_low_rank(out, x, A, sBt, rows, in, rank, out_features, is_bf16, blocks, rows_per_block[, threads])``
    taking addresses, unchecked: for callers that checked the tensors once with ``kernel_fits`` and keep them
    alive. With ``threads`` a prompt's many rows spread over that many threads (the same bits). None when
    unavailable."""
    return _cpu.add_low_rank if kernel_available() else None


def kernel_fits(x_dtype: torch.dtype, A: torch.Tensor, sBt: torch.Tensor) -> bool:
    """Whether the kernel can take a layer's factors for activations of ``x_dtype``: float32 factors (rank × in
    and rank × out), contiguous, on the CPU, rank at most ``MAX_RANK``, bf16 or float32 activations."""
    return (
        kernel_available()
        and x_dtype in _DTYPES
        and A.dtype == torch.float32
        and sBt.dtype == torch.float32
        and A.device.type == "cpu"
        and sBt.device.type == "cpu"
        and A.is_contiguous()
        and sBt.is_contiguous()
        and A.dim() == 2
        and sBt.dim() == 2
        and A.shape[0] == sBt.shape[0]
        and 1 <= A.shape[0] <= MAX_RANK
    )


def row_blocks(mask: torch.Tensor) -> torch.Tensor | None:
    """The kernel's ``blocks`` for a 0/1 row mask (rows × rank): int64 (rows × 2) of (offset, length) pairs,
    length 0 for a row of zeros; None when some row's ones are not one contiguous run (the kernel cannot)."""
    lengths = mask.sum(dim=1).long()
    offsets = torch.where(lengths > 0, mask.argmax(dim=1), 0)
    columns = torch.arange(mask.shape[1], device=mask.device)
    runs = (columns >= offsets[:, None]) & (columns < (offsets + lengths)[:, None])
    if not torch.equal(runs, mask != 0):
        return None
    return torch.stack([offsets, lengths], dim=1).contiguous()


def add_low_rank_(
    out: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    sBt: torch.Tensor,
    blocks: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """``out += (x·Aᵀ)·sBt`` in place, in float32, rounded once into ``out``'s dtype; returns ``out``.

    ``x`` (rows × in) and ``out`` (rows × out_features): contiguous CPU tensors of one dtype, bf16 or float32;
    ``A`` (rank × in) and ``sBt`` (rank × out_features) as ``kernel_fits`` requires. ``blocks`` (int64,
    groups × 2, see ``row_blocks``) gives each of ``groups`` equal runs of rows its own rows of A and sBt, as a
    mixed-adapter batch does. ``threads`` (default ``torch.get_num_threads()``): a prompt's many rows spread over
    that many (the same bits whatever the number). Raises ValueError for anything else (the kernel reads raw
    memory, so nothing unchecked reaches it) and RuntimeError when the kernel is not available. Layers check
    once per plan and call ``raw_kernel()`` directly.
    """
    if not kernel_available():
        raise RuntimeError("the compiled low-rank kernel is not available (reinstall loratune with a C compiler)")
    if not kernel_fits(x.dtype, A, sBt):
        raise ValueError(
            f"A and sBt must be contiguous float32 CPU matrices of one rank ≤ {MAX_RANK}, x bf16 or float32"
        )
    if (
        x.dim() != 2
        or out.dim() != 2
        or out.dtype != x.dtype
        or out.device.type != "cpu"
        or x.device.type != "cpu"
        or not (x.is_contiguous() and out.is_contiguous())
        or out.shape[0] != x.shape[0]
        or A.shape[1] != x.shape[1]
        or sBt.shape[1] != out.shape[1]
    ):
        raise ValueError(
            f"shapes or layout do not fit: x {tuple(x.shape)} {x.dtype}, out {tuple(out.shape)} {out.dtype}, "
            f"A {tuple(A.shape)}, sBt {tuple(sBt.shape)}"
        )
    rows_per_block = 1
    if blocks is not None:
        if (
            blocks.dtype != torch.int64
            or blocks.device.type != "cpu"
            or not blocks.is_contiguous()
            or blocks.dim() != 2
            or blocks.shape[1] != 2
            or blocks.shape[0] == 0
            or x.shape[0] % blocks.shape[0]
        ):
            raise ValueError(f"blocks must be contiguous int64 (groups × 2) dividing the {x.shape[0]} rows")
        rows_per_block = max(x.shape[0] // blocks.shape[0], 1)
    _cpu.add_low_rank(
        out.data_ptr(),
        x.data_ptr(),
        A.data_ptr(),
        sBt.data_ptr(),
        x.shape[0],
        x.shape[1],
        A.shape[0],
        out.shape[1],
        _DTYPES[x.dtype],
        0 if blocks is None else blocks.data_ptr(),
        rows_per_block,
        torch.get_num_threads() if threads is None else threads,
    )
    return out
