"""A mixture-of-experts block's fused expert weights stored in 4 bits (QLoRA over an MoE).

transformers keeps all experts of one projection in a 3-D parameter (E × d1 × d2). ``Experts4bit`` takes its
place on the module: a frozen parameter whose data is the packed codes, one row per expert (E × d1·d2/2 bytes),
with one bitsandbytes ``QuantState`` per expert. Each expert is quantized on its own, so a checkpoint that stores
experts one by one is quantized as it streams in, and an expert's weight is dequantized alone when tokens are
routed to it. ``Dequantized4bitGroupedMatmul`` is the grouped product over such a stack: per expert with tokens,
dequantize, multiply, drop; backward dequantizes again, so no dense expert weight lives between the two.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from loratune.errors import ConfigError
from loratune.quant.linear4bit import dequantize_weight, quantize_weight
from loratune.quant.spec import QuantSpec


class Experts4bit(nn.Parameter):
    """E experts' d1 × d2 weights of one projection in 4 bits. ``expert_shape`` is the parameter's shape in the
    model (E, d1, d2); the tensor itself is the packed codes (E × d1·d2/2, uint8). Build with ``empty`` and
    ``set_expert``, or ``from_stack``."""

    spec: QuantSpec
    states: list
    expert_shape: tuple[int, int, int]

    def __new__(cls, packed: torch.Tensor, expert_shape, spec: QuantSpec, states: list | None = None):
        param = super().__new__(cls, packed, requires_grad=False)
        param.expert_shape, param.spec = tuple(expert_shape), spec
        param.states = list(states) if states is not None else [None] * expert_shape[0]
        return param

    def __deepcopy__(self, memo):
        return type(self)(self.data.clone(), self.expert_shape, self.spec, copy.deepcopy(self.states, memo))

    def __reduce_ex__(self, proto):
        raise TypeError("4-bit expert weights are not pickled; save adapters, or merge into a float model")

    @classmethod
    def empty(cls, expert_shape, spec: QuantSpec, device=None) -> Experts4bit:
        """A stack whose experts are filled in by ``set_expert``."""
        E, d1, d2 = expert_shape
        if (d1 * d2) % 2:
            raise ConfigError(f"cannot store experts of shape {d1} x {d2} in 4 bits (an odd number of weights)")
        return cls(torch.zeros(E, d1 * d2 // 2, dtype=torch.uint8, device=device), expert_shape, spec)

    @classmethod
    def from_stack(cls, stack: torch.Tensor, spec: QuantSpec, name: str = "experts") -> Experts4bit:
        """Quantize a float stack (E × d1 × d2), expert by expert."""
        param = cls.empty(tuple(stack.shape), spec, stack.device)
        for e in range(stack.shape[0]):
            param.set_expert(e, stack[e], f"{name}[{e}]")
        return param

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.spec.compute_dtype

    @property
    def complete(self) -> bool:
        """Whether every expert has been quantized in."""
        return all(state is not None for state in self.states)

    def set_expert(self, e: int, weight: torch.Tensor, name: str = "expert") -> None:
        """Quantize expert ``e``'s float weight (d1 × d2) into the stack."""
        if tuple(weight.shape) != self.expert_shape[1:]:
            raise ConfigError(
                f"{name}: checkpoint shape {tuple(weight.shape)} does not match the model's {self.expert_shape[1:]}; "
                "the checkpoint does not belong to this config.json"
            )
        packed, state = quantize_weight(weight, self.spec, name)
        self.data[e].copy_(packed.view(-1))
        self.states[e] = self._compacted(e, state)

    def _compacted(self, e: int, state):
        """``state`` with its per-block scales moved into one buffer per stack (filled expert by expert) and its
        code tables shared: thousands of small tensors kept between the large transient ones would fragment the
        heap of a streamed load."""
        first = next((s for s in self.states if s is not None), None)
        if first is None:
            E, device = len(self.states), state.absmax.device
            self._scales = torch.empty(E, *state.absmax.shape, dtype=state.absmax.dtype, device=device)
            if state.nested:
                nested = state.state2.absmax
                self._nested_scales = torch.empty(E, *nested.shape, dtype=nested.dtype, device=device)
                self._offsets = torch.empty(E, dtype=state.offset.dtype, device=device)
        else:
            state.code = first.code
        self._scales[e].copy_(state.absmax)
        state.absmax = self._scales[e]
        if state.nested:
            self._nested_scales[e].copy_(state.state2.absmax)
            self._offsets[e] = state.offset
            state.state2.absmax, state.offset = self._nested_scales[e], self._offsets[e]
            if first is not None:
                state.state2.code = first.state2.code
        return state

    def expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``e``'s dense weight (d1 × d2) in ``dtype`` (default: the compute dtype): a new tensor."""
        state = self.states[e]
        if state.absmax.device != self.device:
            state.to(self.device)
        return dequantize_weight(self.data[e].view(-1, 1), state, dtype or self.compute_dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole dense stack (E × d1 × d2) in ``dtype``."""
        return torch.stack([self.expert(e, dtype) for e in range(self.expert_shape[0])])

    def storage_bytes(self) -> int:
        """Bytes of the quantized stack: packed codes plus every expert's block scales."""
        tensors = {}  # by storage: the stack's scale buffers and shared code tables count once
        for state in self.states:
            parts = [state.absmax, state.code]
            if state.nested:
                parts += [state.state2.absmax, state.state2.code, state.offset]
            for t in parts:
                tensors[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
        return self.numel() + sum(tensors.values())

    def __repr__(self) -> str:
        E, d1, d2 = self.expert_shape
        return f"Experts4bit({E} x {d1} x {d2}, {self.spec.quant_type})"


def is_experts_4bit(value) -> bool:
    """Whether ``value`` is a 4-bit expert stack."""
    return isinstance(value, Experts4bit)


def _in_out(weight: Experts4bit, e: int, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    dense = weight.expert(e, dtype)
    return dense if transposed else dense.T


class Dequantized4bitGroupedMatmul(torch.autograd.Function):
    """``x[rows of expert e] @ W_e`` (in × out) for every expert with rows, W_e dequantized from ``weight``;
    ``transposed``: the stack is E × in × out (else E × out × in). Keeps nothing dense for backward."""

    @staticmethod
    def forward(ctx, x, weight, counts, transposed):
        out_features = weight.expert_shape[2] if transposed else weight.expert_shape[1]
        parts = [x_e @ _in_out(weight, e, x.dtype, transposed) for e, x_e in enumerate(x.split(counts)) if counts[e]]
        ctx.weight, ctx.counts, ctx.transposed = weight, counts, transposed
        return torch.cat(parts) if parts else x.new_zeros(0, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        weight, counts, transposed = ctx.weight, ctx.counts, ctx.transposed
        parts = [
            g_e @ _in_out(weight, e, g_e.dtype, transposed).T
            for e, g_e in enumerate(grad_out.split(counts))
            if counts[e]
        ]
        in_features = weight.expert_shape[1] if transposed else weight.expert_shape[2]
        grad_x = torch.cat(parts) if parts else grad_out.new_zeros(0, in_features)
        return grad_x, None, None, None
