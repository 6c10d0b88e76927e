"""The compiled CPU kernel for a linear layer's product on the few rows of a decoding step: ``x·Wᵀ + b``.

Generating a token multiplies one row per sequence by every weight of the model. For a few rows that product is
bound by reading the weights from memory, and BLAS's matrix-vector path reads them at about half the rate the
memory delivers on the CPUs measured (``docs/benchmarks.md``); the kernel (``csrc/linear_rows_body.h``) reads
each weight once, four rows of W against two rows of x at a time, float32 sums, split over
``torch.get_num_threads()`` threads. ``product`` returns None where it does not apply (not built or switched
off, see ``loader``; other dtypes, devices, layouts; more rows than ``MAX_ROWS``, where BLAS's products win),
and the caller runs ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loratune.kernels.loader import compiled as _cpu
from loratune.kernels.loader import kernel_available

# Up to this many rows the kernel beats BLAS for float32 weights; one bf16 row is as fast through torch.
MAX_ROWS = 16
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` computed by the kernel (float32 sums, rounded once into the dtype), or None
    where the kernel does not take it: x (…, in) of at most ``MAX_ROWS`` rows, contiguous, on the CPU, in the
    weight's dtype (float32, or bf16 from two rows up); weight (out × in) and bias (out) contiguous likewise;
    autograd off or nothing that needs a gradient."""
    dtype = weight.dtype
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if (
        dtype not in _DTYPES
        or not 1 <= rows <= MAX_ROWS
        or (dtype == torch.bfloat16 and rows == 1)
        or x.dtype != dtype
        or weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or not (x.device.type == "cpu" and weight.device.type == "cpu")
        or not (x.is_contiguous() and weight.is_contiguous())
        or (bias is not None and (bias.dtype != dtype or bias.shape != weight.shape[:1] or not bias.is_contiguous()))
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or not kernel_available()
    ):
        return None
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=dtype)
    _cpu.linear_rows(
        out.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        rows,
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
