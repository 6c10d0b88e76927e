"""Leaner training ops for Llama-family blocks: RMSNorm and the SiLU-gated MLP as autograd functions that
save only their bf16 inputs (and one float per token), recomputing the cheap elementwise parts in backward
(with a LoRA ``down_proj``, the MLP's product is recomputed rather than kept).

Left to autograd, HF's RMSNorm keeps float32 copies of its input and the MLP keeps six intermediates of the
intermediate width per block; its rotary embedding of queries and keys is a dozen operations each way, here one
kernel call (``RopeFunction``: backward is the same rotation by the negated angle). The math is unchanged (same
float32 internals, same rounding points); on the CPU the elementwise work runs in the compiled kernels of
``kernels.fused``. Under ``recompute_norm_outputs`` the layers fed by a norm keep a recipe instead of its output.
``patch_for_training`` swaps the forward of those modules in place; the patched model still runs eval and
generation as before.
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from loratune.inference.lean import attention, attention_class_of
from loratune.kernels import fused as fused_cpu
from loratune.layers import LoraLayer, dora
from loratune.layers.execution import fused_term
from loratune.layers.fused_linear import (
    dora_linear_backward,
    dora_linear_forward,
    lora_linear_backward,
    lora_linear_forward,
)
from loratune.models.devices import model_device
from loratune.models.structure import has_silu_activation, llama_family_classes


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # float32 math for bf16/fp16, float64 stays


class _NormRecipe:
    """What a saved RMSNorm output is rebuilt from in backward: the norm's input (which the norm keeps anyway),
    its weight and rstd. The first unpack recomputes the output; the layers sharing it (q/k/v, gate/up) reuse
    that one copy until the last of them has run its backward."""

    __slots__ = ("rstd", "value", "weight", "x")

    def __init__(self, x, weight, rstd):
        self.x, self.weight, self.rstd, self.value = x, weight, rstd, None

    def materialize(self) -> torch.Tensor:
        if self.value is None:
            self.value = _rms_norm_apply(self.x, self.weight, self.rstd)
        return self.value


# The norm outputs of the forward running under ``recompute_norm_outputs``: data pointer -> (a weak reference
# to the output, its version when made, its recipe). Weak, so the registry itself keeps no output alive.
_norm_outputs: dict[int, tuple] | None = None


def _register_norm_output(registry: dict, out: torch.Tensor, recipe: _NormRecipe) -> None:
    """Enter ``out`` in ``registry`` until it dies. Its recipe holds the norm's input: kept beyond the output,
    it would keep every block's input alive where nothing saved the output (a layer recomputed in backward)."""
    key = out.data_ptr()

    def forget(ref):
        entry = registry.get(key)
        if entry is not None and entry[0] is ref:
            del registry[key]

    registry[key] = (weakref.ref(out, forget), out._version, recipe)


def _pack(tensor: torch.Tensor):
    entry = _norm_outputs.get(tensor.data_ptr()) if _norm_outputs else None
    if entry is not None and entry[0]() is tensor and tensor._version == entry[1]:
        return entry[2]  # rebuilt in backward instead of kept: the norm's input is kept anyway
    return tensor


def _unpack(saved):
    return saved.materialize() if isinstance(saved, _NormRecipe) else saved


@contextlib.contextmanager
def recompute_norm_outputs():
    """Inside the block, a forward through the patched RMSNorm lets the layers that consume its output
    (q/k/v, gate/up) save a recipe instead of the output itself; backward recomputes it once per norm (one
    pass over memory), which saves two activations of the hidden size per block. Results are bit-identical."""
    global _norm_outputs
    outer = _norm_outputs
    _norm_outputs = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _norm_outputs = outer


def _rms_norm_apply(x, weight, rstd):
    """``weight * (x·rstd).to(dtype)`` for a known rstd: the forward's output again, bit for bit."""
    fused = fused_cpu.rms_norm_with_rstd(x, weight, rstd)
    if fused is not None:
        return fused
    return weight * (x.to(_compute_dtype(x)) * rstd).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / sqrt(mean(x²) + eps)).to(x.dtype)`` with float32 internals; saves x and rstd only."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        fused = fused_cpu.rms_norm(x, weight, eps)
        if fused is not None:
            out, rstd = fused
        else:
            xf = x.to(_compute_dtype(x))
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        if _norm_outputs is not None:
            _register_norm_output(_norm_outputs, out, _NormRecipe(x, weight, rstd))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = fused_cpu.rms_norm_backward(grad_out, x, weight, rstd)
        xhat = None
        if grad_x is None:
            xhat = x.to(_compute_dtype(x)) * rstd
            grad_xhat = (grad_out * weight).to(xhat.dtype)
            grad_x = (rstd * (grad_xhat - xhat * (grad_xhat * xhat).mean(-1, keepdim=True))).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            xhat = x.to(_compute_dtype(x)) * rstd if xhat is None else xhat
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def _silu_mul(gate, up):
    fused = fused_cpu.silu_mul(gate, up)
    return fused if fused is not None else F.silu(gate) * up


def _silu_mul_backward(gate, up, grad_out, out=None):
    fused = fused_cpu.silu_mul_backward(gate, up, grad_out.contiguous(), out)
    if fused is not None:
        return fused
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
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        return _silu_mul_backward(*ctx.saved_tensors, grad_out)


class SiluMulLoraDownFunction(torch.autograd.Function):
    """``down(silu(gate) * up)`` with a LoRA ``down``: saves gate, up and the rank-r product, not the
    intermediate-width product ``silu(gate) * up``, which backward recomputes (elementwise, cheap). The frozen
    base weight comes from ``source.dense_weight`` in forward and again in backward (a 4-bit one is dequantized
    each time, never kept in between)."""

    @staticmethod
    def forward(ctx, gate, up, source, bias, lora_A, lora_B, scale: float):
        product = _silu_mul(gate, up).reshape(-1, gate.shape[-1])
        dense = source.dense_weight(product.dtype)
        out, xa = lora_linear_forward(product, dense, bias, lora_A, lora_B, scale)
        ctx.save_for_backward(gate, up, lora_A, lora_B, xa)
        ctx.source, ctx.scale = source, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*gate.shape[:-1], dense.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, lora_A, lora_B, xa = ctx.saved_tensors
        product = _silu_mul(gate, up).reshape(-1, gate.shape[-1])
        dense = ctx.source.dense_weight(product.dtype)
        needs = (True, *ctx.needs_input_grad[3:6])
        grad_product, grad_bias, grad_A, grad_B = lora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]), product, xa, dense, lora_A, lora_B, ctx.scale, needs
        )
        # grad_product and product are this backward's own: the gradients overwrite them instead of new tensors
        grad_gate, grad_up = _silu_mul_backward(
            gate, up, grad_product.view(gate.shape), out=(grad_product.view(gate.shape), product.view(up.shape))
        )
        grad_bias = grad_bias.to(ctx.bias_dtype) if grad_bias is not None else None
        return grad_gate, grad_up, None, grad_bias, grad_A, grad_B, None


class SiluMulDoraDownFunction(torch.autograd.Function):
    """``down(silu(gate) * up)`` with a DoRA ``down``: like ``SiluMulLoraDownFunction``, the intermediate-width
    product is recomputed in backward instead of kept."""

    @staticmethod
    def forward(ctx, gate, up, layer, term, bias, lora_A, lora_B, magnitude):
        product = _silu_mul(gate, up).reshape(-1, gate.shape[-1])
        dense = layer.dense_weight(product.dtype)
        norms = dora.row_norms(dense, lora_A, lora_B, term.scaling, layer.base_row_norms_squared())
        out, xa, kept, ctx.kept_is_out = dora_linear_forward(
            product, dense, bias, lora_A, lora_B, magnitude, norms, term.scaling, term.strength
        )
        ctx.save_for_backward(gate, up, lora_A, lora_B, magnitude, xa, kept, norms, bias)
        ctx.layer, ctx.scaling, ctx.strength = layer, term.scaling, term.strength
        return out.view(*gate.shape[:-1], dense.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, lora_A, lora_B, magnitude, xa, kept, norms, bias = ctx.saved_tensors
        product = _silu_mul(gate, up).reshape(-1, gate.shape[-1])
        dense = ctx.layer.dense_weight(product.dtype)
        needs = (True, *ctx.needs_input_grad[4:8])
        grad_product, grad_bias, grad_A, grad_B, grad_m = dora_linear_backward(
            grad_out.reshape(-1, grad_out.shape[-1]),
            product,
            xa,
            kept,
            ctx.kept_is_out,
            dense,
            bias,
            lora_A,
            lora_B,
            magnitude,
            norms,
            ctx.scaling,
            ctx.strength,
            needs,
        )
        grad_gate, grad_up = _silu_mul_backward(
            gate, up, grad_product.view(gate.shape), out=(grad_product.view(gate.shape), product.view(up.shape))
        )
        grad_bias = grad_bias.to(bias.dtype) if ctx.needs_input_grad[4] else None
        return grad_gate, grad_up, None, None, grad_bias, grad_A, grad_B, grad_m


def _rms_norm_forward(self, hidden_states):
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    term = fused_term(down, gate) if isinstance(down, LoraLayer) else None
    if term is None:
        return down(SiluMulFunction.apply(gate, up))
    if term.magnitude is not None:
        return SiluMulDoraDownFunction.apply(gate, up, down, term, down.base_layer.bias, term.A, term.B, term.magnitude)
    return SiluMulLoraDownFunction.apply(gate, up, down, down.base_layer.bias, term.A, term.B, term.scale)


class RopeFunction(torch.autograd.Function):
    """Rotary embedding of queries and keys in one kernel call each way. transformers' cos and sin repeat their
    first half in their second (``cat(freqs, freqs)``), so the rotation's transpose — its backward — is the
    same rotation with ``-sin``."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return fused_cpu.rope(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = grad_q.contiguous(), grad_k.contiguous()
        return (*fused_cpu.rope(grad_q, grad_k, cos, -sin), None, None)


def rope_for_training(q, k, cos, sin):
    """``kernels.fused.rope`` with a backward, or None where the kernel cannot take the tensors or cos and sin
    are not in transformers' repeated-halves form (the attention then rotates as transformers does)."""
    half = cos.shape[-1] // 2
    if not fused_cpu.rope_fits(q, k, cos, sin) or cos.requires_grad or sin.requires_grad:
        return None
    if not torch.equal(sin[..., :half], sin[..., half:]):
        return None
    return RopeFunction.apply(q, k, cos, sin)


def patch_for_training(model: nn.Module) -> int:
    """Give the RMSNorm and SiLU-MLP modules of a Llama-family model, and the attention of the families whose
    attention is Llama's (``inference.lean.attention``), their lean forward (exactly these transformers classes,
    whose math is the one above); return how many modules were patched (0 for other architectures, which keep
    their own code)."""
    classes = llama_family_classes(model)
    if classes is None:
        return 0
    norm_class, mlp_class = classes
    # the rotation kernel is CPU code: elsewhere the attention keeps transformers' own forward
    attention_class = attention_class_of(model) if model_device(model).type == "cpu" else None
    patched = 0
    for module in model.modules():
        if type(module) is norm_class:
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif type(module) is mlp_class and has_silu_activation(module):
            module.forward = types.MethodType(_mlp_forward, module)
        elif attention_class is not None and type(module) is attention_class:
            module.forward = functools.partial(attention, module, rotate=rope_for_training)
        else:
            continue
        patched += 1
    return patched
