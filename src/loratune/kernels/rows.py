"""The compiled CPU kernel for a linear layer's product on the few rows of a decoding step: ``x·Wᵀ + b``.

Generating a token multiplies one row per sequence by every weight of the model. For a few rows that product is
bound by reading the weights from memory, and BLAS's matrix-vector path reads them at about half the rate the
memory delivers on the CPUs measured (``docs/benchmarks.md``); the kernel (``csrc/linear_rows_body.h``) reads
each weight once, four rows of W against two rows of x at a time, float32 sums, split over
``torch.get_num_threads()`` threads. ``product`` returns None where it does not apply (outside ``decoding()``;
not built or switched off, see ``loader``; other dtypes, devices, layouts; more rows than ``row_range`` gives, where
BLAS's products win), and the caller runs ``F.linear``.

The kernel sums in another order than BLAS, so its products differ from ``F.linear``'s in the last bits. It runs
only inside ``decoding()`` (``inference.decode.inference`` enters it, in the thread that generates): there every
product of a few rows takes it, so a model with a fresh adapter still computes exactly what its base computes,
as it does everywhere else with BLAS. A prompt's many rows it takes in spans of the most it takes (``row_range``)
in float32 where that is faster than BLAS (AVX-512 CPUs), and in any dtype inside ``batch_invariant()``: each
row's sum is then the same bits whatever else the batch holds, where BLAS rounds a row by how many rows come with
it (in bf16 enough to change a greedy answer with the batch), at the cost of BLAS's speed on a prompt's many bf16
rows (``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F

from loratune.kernels.loader import compiled as _cpu
from loratune.kernels.loader import isa, kernel_available, runnable_isas

# The rows the kernel takes per dtype in one call (fewest, most). Float32: up to 64 rows it beats BLAS on the CPUs
# measured (docs/benchmarks.md); beyond that, in spans of 64 on AVX-512 CPUs (_SPANS_FP32), BLAS elsewhere. bf16:
# up to 64 where the kernel multiplies bf16 pairs itself (its AVX512-BF16 copy), as fast as PyTorch's bf16
# products at 64 rows; else up to 16 where PyTorch widens bf16 to float32 for its products, and up to
# WIDENED_BF16_MOST on CPUs whose PyTorch has bf16 products of its own (there they win from 16 rows on over the
# kernel widening bf16).
ROWS = {torch.float32: (1, 64), torch.bfloat16: (1, 16)}
PAIR_PRODUCT_BF16_MOST = 64
WIDENED_BF16_MOST = 8
_PAIR_PRODUCTS = ("avx512bf16", "amx")  # the kernel variants with bf16 pair products
# the variants that take float32 rows of any number, in spans of 64 (a prompt's): with AVX-512 they run
# 1.75-2.2x the speed of PyTorch's float32 products at 64-512 rows on the CPU measured (docs/benchmarks.md)
_SPANS_FP32 = ("avx512", "avx512bf16", "amx")
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_here = threading.local()  # .decoding, .invariant: inside decoding(), batch_invariant() in this thread


@contextmanager
def _flag(name: str, value: bool) -> Iterator[None]:
    """This thread's flag ``name`` set to ``value`` inside the block, as it was after it."""
    before = getattr(_here, name, False)
    setattr(_here, name, value)
    try:
        yield
    finally:
        setattr(_here, name, before)


def decoding() -> AbstractContextManager[None]:
    """Products of a few rows take the kernel inside the block, in this thread (see the module docstring)."""
    return _flag("decoding", True)


def active() -> bool:
    """Whether this thread is inside ``decoding()``."""
    return getattr(_here, "decoding", False)


def batch_invariant(on: bool = True) -> AbstractContextManager[None]:
    """Inside the block, in this thread, decoding computes each row alone (``on``): the kernel takes products of
    any number of rows, and (``layers.execution``, ``inference.lean``) low-rank updates and a prompt's attention
    take their kernels, so that no row's result depends on the other rows, the padding or the chunking of a batch.
    A server's answers then do not change with who else is served, at a cost to long prompts."""
    return _flag("invariant", on)


def invariant() -> bool:
    """Whether this thread decodes inside ``batch_invariant()`` (and ``decoding()``)."""
    return getattr(_here, "invariant", False) and active()


def row_range(dtype: torch.dtype) -> tuple[int, int]:
    """(fewest, most) rows of ``dtype`` the kernel multiplies on this CPU (see ``ROWS``); (1, 0) for none."""
    fewest, most = ROWS.get(dtype, (1, 0))
    if dtype == torch.bfloat16 and isa() in _PAIR_PRODUCTS:
        most = PAIR_PRODUCT_BF16_MOST
    elif dtype == torch.bfloat16 and _native_bf16():
        most = WIDENED_BF16_MOST
    return fewest, most


@functools.cache
def _native_bf16() -> bool:
    return "avx512bf16" in runnable_isas()


def takes(rows: int, dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies ``rows`` rows of ``dtype`` in one call (see ``row_range``)."""
    fewest, most = row_range(dtype)
    return fewest <= rows <= most


def takes_in_spans(rows: int, dtype: torch.dtype) -> bool:
    """Whether ``product`` takes ``rows`` rows of ``dtype``, more than ``takes`` does, in spans of the most it
    takes: inside ``batch_invariant()``, and float32 on the variants where that is faster than PyTorch's
    products (``_SPANS_FP32``)."""
    return rows > row_range(dtype)[1] > 0 and (invariant() or (dtype == torch.float32 and isa() in _SPANS_FP32))


def plain(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is None or a plain tensor or parameter, not a subclass (an FSDP shard, say) whose
    storage does not hold its values."""
    return tensor is None or type(tensor) in _PLAIN


def weights_fit(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the kernel reads ``weight`` (out × in) and ``bias`` (out, or None) for inputs of ``dtype``:
    contiguous CPU tensors of that dtype, the kernels available."""
    return (
        dtype in _DTYPES
        and plain(weight)
        and plain(bias)
        and weight.dtype == dtype
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and (bias is None or (bias.dtype == dtype and bias.shape == weight.shape[:1] and bias.is_contiguous()))
        and kernel_available()
    )


def raw_lora():
    """``lora_rows(out, x, weight, bias, rows, in, out_features, is_bf16, A, sBt, rank, blocks, rows_per_block,
    threads)`` taking addresses, unchecked: an unmerged LoRA layer's whole output, the product over threads
    and then ``kernels.lowrank``'s update, in one call. For plans that checked their tensors once
    (``weights_fit``, ``lowrank.kernel_fits``) and keep them alive. None when unavailable."""
    return _cpu.lora_rows if kernel_available() else None


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` computed by the kernel (float32 sums, rounded once into the dtype), or None
    where the kernel does not take it: outside ``decoding()``; x (…, in) of as many rows as ``row_range`` gives
    (more in spans of the most it gives: ``takes_in_spans``), contiguous, on the CPU, in the weight's dtype
    (float32 or bf16); weight (out × in) and bias (out) contiguous likewise; autograd off or nothing that needs a
    gradient."""
    dtype = weight.dtype
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if (
        not active()
        or not (takes(rows, dtype) or takes_in_spans(rows, dtype))
        or x.dtype != dtype
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or not weights_fit(weight, bias, dtype)
        or x.shape[-1] != weight.shape[1]
    ):
        return None
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=dtype)
    most = row_range(dtype)[1]
    for first in range(0, rows, most):  # (more rows than it takes in one call: in spans, see takes_in_spans)
        _cpu.linear_rows(
            out.data_ptr() + first * weight.shape[0] * out.element_size(),
            x.data_ptr() + first * weight.shape[1] * x.element_size(),
            weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            min(most, rows - first),
            weight.shape[1],
            weight.shape[0],
            _DTYPES[dtype],
            torch.get_num_threads(),
        )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: the kernel's product where it applies (``product``), PyTorch's otherwise."""
    out = product(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out
