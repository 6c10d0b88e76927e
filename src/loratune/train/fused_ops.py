"""Leaner training ops for Llama-family blocks: RMSNorm and the SiLU-gated MLP as autograd functions that
save only their bf16 inputs (and one float per token), recomputing the cheap elementwise parts in backward
(with a LoRA ``down_proj``, the MLP's product is recomputed rather than kept).

Left to autograd, HF's RMSNorm keeps float32 copies of its input and the MLP keeps six intermediates of the
intermediate width per block. The math is unchanged (same float32 internals, same rounding points).
``patch_for_training`` swaps the forward of those modules in place; the patched model still runs eval and
generation exactly as before.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from loratune.layers import LoraLinear
from loratune.layers.fused_linear import lora_linear_backward, lora_linear_forward
from loratune.quant import Linear4bit, dequantize_weight

# Architectures whose RMSNorm is ``weight * (x·rstd).to(dtype)`` and whose MLP is down(silu(gate(x)) * up(x)).
LLAMA_LIKE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3"}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32 math for bf16/fp16, float64 stays


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / sqrt(mean(x²) + eps)).to(x.dtype)`` with float32 internals; saves x and rstd only."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(_compute_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(_compute_dtype(x)) * rstd
        grad_xhat = (grad_out * weight).to(xhat.dtype)
        grad_x = rstd * (grad_xhat - xhat * (grad_xhat * xhat).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def _silu_mul_backward(gate, up, grad_out):
    g = gate.to(_compute_dtype(gate))
    sig = torch.sigmoid(g)
    grad = grad_out.to(g.dtype)
    grad_up = (grad * g * sig).to(up.dtype)
    grad_gate = (grad * up.to(g.dtype) * sig * (1 + g * (1 - sig))).to(gate.dtype)
    return grad_gate, grad_up


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes the sigmoid in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        return _silu_mul_backward(*ctx.saved_tensors, grad_out)


class SiluMulLoraDownFunction(torch.autograd.Function):
    """``down(silu(gate) * up)`` with a LoRA ``down``: saves gate, up and the rank-r product, not the
    intermediate-width product ``silu(gate) * up``, which backward recomputes (elementwise, cheap).
    With a 4-bit ``down`` (``quant_state`` given), ``weight`` is the packed data, dequantized in forward and
    again in backward, never kept in between."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_A, lora_B, scale: float, quant_state=None):
        product = (F.silu(gate) * up).reshape(-1, gate.shape[-1])
        dense = _dense_weight(weight, quant_state, product.dtype)
        bias = None if bias is None else bias.to(product.dtype)
        out, xa = lora_linear_forward(product, dense, bias, lora_A, lora_B, scale)
        ctx.save_for_backward(gate, up, weight, lora_A, lora_B, xa)
        ctx.scale, ctx.quant_state = scale, quant_state
        return out.view(*gate.shape[:-1], dense.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight, lora_A, lora_B, xa = ctx.saved_tensors
        product = (F.silu(gate) * up).reshape(-1, gate.shape[-1])
        dense = _dense_weight(weight, ctx.quant_state, product.dtype)
        needs = (True, ctx.needs_input_grad[2] and ctx.quant_state is None, *ctx.needs_input_grad[3:6])
        grad_product, grad_weight, grad_bias, grad_A, grad_B = lora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), product, xa, dense, lora_A, lora_B, ctx.scale, needs
        )
        grad_gate, grad_up = _silu_mul_backward(gate, up, grad_product.view(gate.shape))
        return grad_gate, grad_up, grad_weight, grad_bias, grad_A, grad_B, None, None


def _dense_weight(weight, quant_state, dtype):
    return weight if quant_state is None else dequantize_weight(weight, quant_state, dtype)


def _rms_norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    name = down._single_fusable_adapter(gate) if isinstance(down, LoraLinear) else None
    if name is None:
        return down(SiluMulFunction.apply(gate, up))
    base = down.base_layer
    quant_state = base.quant_state if isinstance(base, Linear4bit) else None
    return SiluMulLoraDownFunction.apply(
        gate, up, base.weight, base.bias, down.lora_A[name], down.lora_B[name], down.effective_scale(name), quant_state
    )


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")


def _is_silu_mlp(module: nn.Module) -> bool:
    act = type(getattr(module, "act_fn", None)).__name__  # nn.SiLU or transformers' SiLUActivation
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and act in ("SiLU", "SiLUActivation")


def patch_for_training(model: nn.Module) -> int:
    """Give the RMSNorm and SiLU-MLP modules of a Llama-family model their lean forward; return how many
    modules were patched (0 for other architectures, which keep their own code)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LLAMA_LIKE_MODEL_TYPES:
        return 0
    patched = 0
    for module in model.modules():
        if _is_rms_norm(module):
            module.forward = types.MethodType(_rms_norm_forward, module)
            patched += 1
        elif _is_silu_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            patched += 1
    return patched
