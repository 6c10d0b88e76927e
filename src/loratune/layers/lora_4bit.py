"""LoRA around a 4-bit base (``quant.Linear4bit``): same adapter keys and math as ``LoraLinear``.

Training runs ``base(x) + s·B·A·x`` as one autograd function that dequantizes W in forward, drops it, and
dequantizes it again in backward for the input gradient; it saves x (by reference) and the rank-r product
``A·x``, like ``fused_linear``, whose two halves it reuses. The base weight is never modified: merging,
PiSSA (both rewrite W0) refuse with a pointer to ``loratune merge``.
"""

from __future__ import annotations

import torch

from loratune.errors import ConfigError
from loratune.layers.fused_linear import lora_linear_backward, lora_linear_forward
from loratune.layers.lora import LoraLinear
from loratune.quant import Linear4bit, dequantize_weight

MERGE_4BIT_HINT = (
    "the base weights are stored in 4 bits, so an adapter cannot be merged into them in place; use "
    "`loratune merge` (dequantizes, adds the delta in float32, writes a bf16/fp16 model) or its --requantize "
    "option (writes a 4-bit model and reports the error re-quantizing adds)"
)


class Lora4bitLinearFunction(torch.autograd.Function):
    """``x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ`` for a 4-bit W; only x, A, B, ``A·x`` and the packed W are saved."""

    @staticmethod
    def forward(ctx, x, packed, bias, lora_A, lora_B, scale: float, state):
        weight = dequantize_weight(packed, state, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out, xa = lora_linear_forward(x2, weight, None if bias is None else bias.to(x.dtype), lora_A, lora_B, scale)
        del weight  # dequantized again in backward, never kept alive between the two
        ctx.save_for_backward(x, packed, lora_A, lora_B, xa)
        ctx.scale, ctx.state = scale, state
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x, packed, lora_A, lora_B, xa = ctx.saved_tensors
        weight = dequantize_weight(packed, ctx.state, x.dtype) if ctx.needs_input_grad[0] else None
        needs = ctx.needs_input_grad
        grads = lora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1]), xa, weight, lora_A, lora_B,
            ctx.scale, (needs[0], False, needs[2], needs[3], needs[4]),
        )
        grad_x = grads[0].view(x.shape) if grads[0] is not None else None
        grad_bias = grads[2].to(ctx.bias_dtype) if grads[2] is not None else None
        return grad_x, None, grad_bias, grads[3], grads[4], None, None


def lora_4bit_linear(x, base: Linear4bit, lora_A, lora_B, scale: float) -> torch.Tensor:
    """LoRA over a 4-bit Linear in ``x``'s dtype, with lean autograd (see the module docstring)."""
    return Lora4bitLinearFunction.apply(x, base.weight, base.bias, lora_A, lora_B, scale, base.quant_state)


class LoraLinear4bit(LoraLinear):
    """``LoraLinear`` whose base is a ``Linear4bit``. One active adapter without dropout takes the lean
    function above; anything else takes the general path (the base's own 4-bit forward plus each adapter)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._single_fusable_adapter(x)
        if name is None:
            return super(LoraLinear, self).forward(x, *args, **kwargs)
        return lora_4bit_linear(x, self.base_layer, self.lora_A[name], self.lora_B[name], self.effective_scale(name))

    def _single_fusable_adapter(self, x: torch.Tensor) -> str | None:
        if self.base_only or self.pissa or self.row_groups is not None or len(self.active) != 1:
            return None
        name = self.active[0]
        if name in self.merged or (self.training and not isinstance(self.lora_dropout[name], torch.nn.Identity)):
            return None
        return name if x.dtype == self.base_layer.spec.compute_dtype else None

    def dense_base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight dequantized to ``dtype`` (out × in); a new tensor."""
        return self.base_layer.dequantized_weight(dtype)

    # Everything that would rewrite the 4-bit base weight refuses, naming the two ways that work.
    def _init_pissa(self, name: str) -> None:
        raise ConfigError("PiSSA rewrites the base weight, which is stored in 4 bits here; load the base "
                          "unquantized (model.quantize: null) to start from PiSSA")

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        raise ConfigError(MERGE_4BIT_HINT)

    def merge_would_be_finite(self, name: str) -> bool:
        raise ConfigError(MERGE_4BIT_HINT)

    def merge(self, name: str, *, safe: bool = False, untie: bool = False) -> None:
        raise ConfigError(MERGE_4BIT_HINT)
