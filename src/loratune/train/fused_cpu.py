"""The compiled CPU kernels for a Llama block's elementwise training work: RMSNorm and ``silu(gate)·up``,
forward and backward, each one pass over memory (``_fused_cpu.c``, built by ``pip install``).

In PyTorch operations each of these is a chain of five to fifteen operations that each write a fresh tensor;
on a CPU that memory traffic, not the arithmetic, is what they cost. Every function here returns None when
the kernel cannot take its tensors (not built, switched off with ``LORATUNE_NO_KERNEL=1``, not on the CPU,
not contiguous, not one dtype of bf16 or float32), and the caller runs its PyTorch code instead: the two agree
up to the order of float32 sums. Like PyTorch's own operations, the kernels split their work over
``torch.get_numtorch.get_num_threads()`` threads.
"""

from __future__ import annotations

import os

import torch

try:
    from loratune.train import _fused_cpu
except ImportError:  # built without a C compiler: fused_ops.py runs the same arithmetic in PyTorch
    _fused_cpu = None

_DTYPES = {torch.bfloat16: 1, torch.float32: 0}


def kernel_available() -> bool:
    """True when the compiled kernels are importable and not switched off with ``LORATUNE_NO_KERNEL=1``."""
    return _fused_cpu is not None and os.environ.get("LORATUNE_NO_KERNEL", "") in ("", "0")


def _fits(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return (
        dtype in _DTYPES
        and kernel_available()
        and all(t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` (silu rounded to the dtype first, as PyTorch does), or None."""
    if gate.shape != up.shape or not _fits(gate, up):
        return None
    out = torch.empty_like(gate)
    _fused_cpu.silu_mul(out.data_ptr(), gate.data_ptr(), up.data_ptr(), gate.numel(), _DTYPES[gate.dtype], torch.get_num_threads())
    return out


def silu_mul_backward(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(grad_gate, grad_up) of ``silu(gate) * up`` for the output gradient ``grad``, or None. ``out``: two
    tensors like ``gate`` to write them into, which may be any of the three inputs themselves (elementwise,
    each element is read before it is written), saving two allocations."""
    if not (gate.shape == up.shape == grad.shape) or not _fits(gate, up, grad):
        return None
    if out is None:
        out = torch.empty_like(gate), torch.empty_like(up)
    elif not all(o.shape == gate.shape for o in out) or not _fits(gate, *out):
        return None
    grad_gate, grad_up = out
    _fused_cpu.silu_mul_backward(
        grad_gate.data_ptr(), grad_up.data_ptr(), gate.data_ptr(), up.data_ptr(), grad.data_ptr(), gate.numel(),
        _DTYPES[gate.dtype], torch.get_num_threads(),
    )
    return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``weight * (x·rstd).to(dtype)``, rstd) with rstd = 1/√(mean(x²) + eps) per row as float32 of shape
    ``x.shape[:-1] + (1,)``, or None."""
    if x.dim() == 0 or weight.shape != x.shape[-1:] or not _fits(x, weight):
        return None
    h = x.shape[-1]
    out = torch.empty_like(x)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    _fused_cpu.rms_norm(
        out.data_ptr(), rstd.data_ptr(), x.data_ptr(), weight.data_ptr(), x.numel() // max(h, 1), h, float(eps),
        _DTYPES[x.dtype], torch.get_num_threads(),
    )
    return out, rstd


def _norm_fits(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *more: torch.Tensor) -> bool:
    """Whether the kernels can take a norm's input, weight and its float32 rstd (one per row of x)."""
    return (
        x.dim() > 0 and weight.shape == x.shape[-1:] and rstd.dtype == torch.float32 and rstd.is_contiguous()
        and rstd.numel() * x.shape[-1] == x.numel() and _fits(x, weight, *more)
    )


def rms_norm_with_rstd(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor | None:
    """``weight * (x·rstd).to(dtype)`` for a float32 rstd that ``rms_norm`` returned (the same bits again),
    or None."""
    if not _norm_fits(x, weight, rstd):
        return None
    h = x.shape[-1]
    out = torch.empty_like(x)
    _fused_cpu.rms_norm_apply(
        out.data_ptr(), rstd.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.numel(), h, _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return out


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor | None:
    """The input gradient of ``rms_norm`` for the output gradient ``grad``, or None."""
    if grad.shape != x.shape or not _norm_fits(x, weight, rstd, grad):
        return None
    h = x.shape[-1]
    grad_x = torch.empty_like(x)
    _fused_cpu.rms_norm_backward(
        grad_x.data_ptr(), grad.data_ptr(), x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), rstd.numel(), h,
        _DTYPES[x.dtype], torch.get_num_threads(),
    )
    return grad_x


def dropout_fits(x: torch.Tensor) -> bool:
    """Whether ``dropout`` can take ``x`` (the kernel is built and on, ``x`` is a contiguous CPU tensor in bf16
    or float32)."""
    return _fits(x)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    """``x`` with each element zeroed with probability ``p`` and the rest scaled by 1/(1 − p), the mask a pure
    function of (``seed``, element index): the same ``seed`` on a tensor of the same size gives the same mask
    (dropout's backward is this function applied to the output gradient). None when the kernel cannot take
    ``x``."""
    if not 0.0 < p < 1.0 or not _fits(x):
        return None
    keep_below = min(round((1.0 - p) * 2**32), 2**32 - 1)
    out = torch.empty_like(x)
    _fused_cpu.dropout(out.data_ptr(), x.data_ptr(), x.numel(), seed, keep_below, 1.0 / (1.0 - p), _DTYPES[x.dtype],
                       torch.get_num_threads())
    return out
