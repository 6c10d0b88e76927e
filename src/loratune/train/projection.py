"""A seeded random projection ℝ^d → ℝ^D that never exists as a D × d matrix: the Fastfood transform, as the
intrinsic-dimension paper (Li et al., 2018) uses it.

Fastfood (Le, Sarlós and Smola, 2013) stands in for a Gaussian matrix with ``V = H·G·Π·H·B`` on blocks of
L = 2^⌈log₂ d⌉: B a random ±1 diagonal, H the Walsh–Hadamard matrix (applied as a Kronecker product of small
ones), Π a random permutation, G a Gaussian diagonal. ``⌈D / L⌉`` independent blocks are stacked and the first D
rows kept. Each block is divided by ``√(L·ΣG²)`` and the stack by ``√blocks``, so every column of P has unit norm
(a column of a block is ``H·G·z`` for a ±1 vector z, whose norm is exactly ``√(L·ΣG²)``). A product costs
O(D log d) time and O(D) memory, and its gradient (Pᵀ·g) flows through the same operations. Chosen over a sparse
random matrix because its cost does not grow with d and it is the paper's own choice.
"""

from __future__ import annotations

import functools
import math

import torch

from loratune.kernels.loader import compiled as _cpu
from loratune.kernels.loader import kernel_available

_FACTOR = 32  # the largest Sylvester matrix one product uses: H_L is computed as H_32 ⊗ H_32 ⊗ … (fewest passes)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x·H`` over the last dimension (a power of two), H the Sylvester–Hadamard matrix (entries ±1);
    differentiable. H_L is the Kronecker product of smaller Sylvester matrices (``H_a ⊗ H_b ⊗ …``, a·b·… = L), so it
    runs as one matrix product per factor over the last axis, each followed by a rotation of the axes that brings
    the next factor's axis last: a few BLAS products and copies instead of log₂(L) passes of additions."""
    length = x.shape[-1]
    if length & (length - 1):
        raise ValueError(f"the Walsh–Hadamard transform needs a power-of-two length, got {length}")
    lead = x.shape[:-1]
    bits, most, sizes = length.bit_length() - 1, _FACTOR.bit_length() - 1, []
    while bits > 0:
        sizes.append(1 << min(bits, most))
        bits -= min(bits, most)
    y = x.reshape(-1, length)
    rows = y.shape[0]
    for size in sizes:
        y = (y.reshape(-1, size) @ _sylvester(size, x.dtype, x.device)).reshape(rows, length // size, size)
        y = y.transpose(1, 2).reshape(rows, length)  # (…, a, b) → (b, …, a): the next factor's axis last
    return y.reshape(*lead, length)


@functools.lru_cache(maxsize=32)
def _sylvester(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    H = torch.ones(1, 1)
    while H.shape[0] < size:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H.to(dtype=dtype, device=device)


class FastfoodProjection:
    """``P·θ`` for θ ∈ ℝ^d, P a seeded D × d Fastfood projection with unit-norm columns (see the module docstring).
    The random parts (B, Π, G) are drawn from a generator seeded with ``seed`` on the CPU, so a saved
    (seed, d, D) rebuilds the same P anywhere. On the CPU in float32 the compiled kernel computes ``P·θ`` and
    ``Pᵀ·g`` block by block in the cache (one pass over D values each way); elsewhere PyTorch operations do."""

    def __init__(self, d: int, D: int, seed: int, device=None):
        if d < 1 or D < 1:
            raise ValueError(f"a projection needs d ≥ 1 and D ≥ 1, got d={d}, D={D}")
        self.d, self.D, self.seed = d, D, seed
        self.block = 1 << max(0, math.ceil(math.log2(d)))
        self.blocks = math.ceil(D / self.block)
        generator = torch.Generator().manual_seed(seed)
        shape = (self.blocks, self.block)
        self.signs = (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(torch.int8).to(device)
        self.permutation = torch.argsort(torch.rand(shape, generator=generator), dim=1).to(torch.int32).to(device)
        gaussian = torch.randn(shape, generator=generator)
        norms = torch.sqrt(self.block * gaussian.square().sum(1, keepdim=True))
        # G with each block's share of the normalisation folded in (the last transform is linear)
        self.gaussian = (gaussian / (norms * math.sqrt(self.blocks))).to(device)

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """``P·θ`` (D values, in θ's dtype) for θ of length d."""
        if theta.shape != (self.d,):
            raise ValueError(f"expected θ of shape ({self.d},), got {tuple(theta.shape)}")
        if self._kernel_takes(theta):
            return _FastfoodKernel.apply(theta, self)
        x = torch.nn.functional.pad(theta, (0, self.block - self.d)).expand(self.blocks, self.block)
        x = hadamard(x * self.signs.to(theta.dtype))
        x = torch.gather(x, 1, self.permutation.long())
        x = hadamard(x * self.gaussian.to(theta.dtype))
        return x.reshape(-1)[: self.D]

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and self.signs.device.type == "cpu"
            and (kernel_available() and hasattr(_cpu, "fastfood"))
        )

    def kernel(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``P·x`` (x: d values) or, with ``transpose``, ``Pᵀ·x`` (x: D values) by the compiled kernel (float32
        CPU tensors; ``_kernel_takes``)."""
        x = x.contiguous()
        threads = max(1, min(torch.get_num_threads(), self.blocks))
        chunk = math.ceil(self.blocks / threads)
        chunks = math.ceil(self.blocks / chunk)
        scratch = torch.empty(chunks, 2 * self.block)
        out = torch.zeros(chunks, self.d) if transpose else torch.empty(self.D)
        _cpu.fastfood(
            out.data_ptr(),
            x.data_ptr(),
            self.signs.data_ptr(),
            self.permutation.data_ptr(),
            self.gaussian.data_ptr(),
            self.d,
            self.block,
            self.D,
            self.blocks,
            int(transpose),
            chunk,
            scratch.data_ptr(),
            threads,
        )
        return out.sum(0) if transpose else out

    def dense(self) -> torch.Tensor:
        """P as a D × d matrix, for tests on tiny sizes (its columns: P applied to the unit vectors)."""
        eye = torch.eye(self.d)
        return torch.stack([self(column) for column in eye], dim=1)


class _FastfoodKernel(torch.autograd.Function):
    """``P·θ`` by the compiled kernel, its gradient ``Pᵀ·g`` by the same kernel (P is linear: nothing is saved)."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, projection: FastfoodProjection) -> torch.Tensor:
        ctx.projection = projection
        return projection.kernel(theta, transpose=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.projection.kernel(grad, transpose=True), None
