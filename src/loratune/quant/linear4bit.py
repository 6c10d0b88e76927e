"""A frozen Linear layer whose weight is stored in 4 bits (NF4/FP4 via bitsandbytes) and dequantized on the fly.

``Linear4bit`` is a module of its own, not an ``nn.Linear``: its ``weight`` is the packed uint8 data (two
4-bit codes per byte, shape (out·in/2, 1)) and ``quant_state`` holds the per-block scales. What LoRA layers
need of it is small: ``in_features``, ``out_features``, ``bias``, ``compute_dtype``, ``dequantized_weight``
and calling it. The weight never gets a gradient; the input does,
through ``Dequantized4bitMatmul``, which dequantizes in forward, drops the result, and dequantizes again in
backward, so no dense copy of the weight lives between the two.

State-dict keys follow bitsandbytes / transformers (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so a saved
quantized model reads like one transformers wrote.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from loratune.errors import ConfigError
from loratune.quant.spec import QuantSpec

_QUANTIZABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_functional():
    # bitsandbytes is imported on first use: `import loratune` stays fast for unquantized work, and it is an
    # optional dependency (the `quant` extra).
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as error:
        raise ConfigError(
            f"4-bit weights need bitsandbytes ({error}); install it with: pip install 'loratune[quant]'"
        ) from None
    return bnb_functional


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, name: str = "weight"):
    """(packed uint8 data, bitsandbytes ``QuantState``) for a 2-D float ``weight`` on its own device.

    bitsandbytes computes in float32 whatever the input dtype (a bf16 weight and its float32 copy give the same
    codes), so the weight is passed as it is, without a float32 copy. The state's dtype is ``spec.compute_dtype``:
    dequantizing gives the compute dtype directly.
    Raises ``ConfigError`` (naming ``name``) for a weight that is not 2-D, empty, or not a float dtype.
    """
    if weight.dtype not in _QUANTIZABLE_DTYPES:
        raise ConfigError(
            f"{name}: cannot quantize a {weight.dtype} tensor to 4 bits (needs float32, bfloat16 or float16); "
            "convert the checkpoint to a float dtype or load it with quantize=null"
        )
    if weight.dim() != 2 or weight.numel() == 0:
        raise ConfigError(
            f"{name}: cannot quantize a tensor of shape {tuple(weight.shape)} as a Linear weight (needs out x in); "
            "keep this module unquantized (model.unquantized_modules) or load with quantize=null"
        )
    packed, state = _bnb_functional().quantize_4bit(
        weight.detach().contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
    )
    state.dtype = spec.compute_dtype
    return packed, state


def dequantize_weight(packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out × in) weight in ``dtype`` (default: the state's compute dtype), computed in that dtype."""
    if dtype is not None and dtype != state.dtype:
        state = copy.copy(state)  # shares the tensors; only the output dtype differs
        state.dtype = dtype
    return _bnb_functional().dequantize_4bit(packed, state, quant_type=state.quant_type)


class Dequantized4bitMatmul(torch.autograd.Function):
    """``x·Wᵀ + bias`` for a 4-bit W: saves only x's shape and the packed data; backward dequantizes again."""

    @staticmethod
    def forward(ctx, x, packed, bias, state):
        weight = dequantize_weight(packed, state, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ weight.T if bias is None else torch.addmm(bias.to(x.dtype), x2, weight.T)
        ctx.save_for_backward(packed)
        ctx.state, ctx.dtype, ctx.x_shape = state, x.dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2.to(ctx.dtype) @ dequantize_weight(packed, ctx.state, ctx.dtype)).view(ctx.x_shape)
        grad_bias = g2.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen Linear layer stored in 4 bits. Build it with ``from_linear`` or ``from_weight``.

    Inputs are cast to the compute dtype and outputs back to the input dtype. Only the bias (if any) can train.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, device=None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.weight = nn.Parameter(torch.empty(0, 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.quant_state = None
        self.bias = (
            None if not bias else nn.Parameter(torch.zeros(out_features, dtype=spec.compute_dtype, device=device))
        )

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, name: str = "weight"):
        """A 4-bit layer holding ``weight`` (out × in, quantized on its device) and ``bias`` (kept as given).

        Raises ``ConfigError`` when ``weight`` cannot be quantized (see ``quantize_weight``).
        """
        layer = cls(weight.shape[1] if weight.dim() == 2 else 0, weight.shape[0], False, spec, device=weight.device)
        layer.set_weight(weight, name)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, name: str = "weight"):
        """The 4-bit version of ``linear`` (its weight quantized, its bias kept)."""
        return cls.from_weight(linear.weight, linear.bias, spec, name)

    def set_weight(self, weight: torch.Tensor, name: str = "weight") -> None:
        """Quantize ``weight`` (out × in) into this layer. Raises ``ConfigError`` for a wrong shape or dtype."""
        if weight.dim() == 2 and tuple(weight.shape) != (self.out_features, self.in_features) and self.in_features:
            raise ConfigError(
                f"{name}: checkpoint shape {tuple(weight.shape)} does not match the model's "
                f"({self.out_features}, {self.in_features}); the checkpoint does not belong to this config.json"
            )
        packed, self.quant_state = quantize_weight(weight, self.spec, name)
        self.weight = nn.Parameter(packed, requires_grad=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the weight is dequantized to and multiplied in."""
        return self.spec.compute_dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out × in) in ``dtype`` (default: the compute dtype); a new tensor each call."""
        return dequantize_weight(self.weight, self.quant_state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = Dequantized4bitMatmul.apply(x.to(self.spec.compute_dtype), self.weight, self.bias, self.quant_state)
        return out.to(x.dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight: packed codes plus block scales (and their own scales)."""
        state = self.quant_state
        tensors = [self.weight, state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the packed data with the module; the scales live outside the parameters, so follow
        # them here. dtype casts leave both alone (uint8 data, float32 scales stay exact).
        super()._apply(fn, recurse)
        if self.quant_state is not None and self.quant_state.absmax.device != self.weight.device:
            self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value

    def set_packed(self, packed: torch.Tensor, state_tensors: dict[str, torch.Tensor], name: str = "weight") -> None:
        """Take already-quantized data: ``packed`` codes and the bitsandbytes state tensors (keys ``absmax``,
        ``quant_map``, ... without the ``weight.`` prefix). Raises ``ConfigError`` when they do not fit."""
        try:
            state = _bnb_functional().QuantState.from_dict(dict(state_tensors), device=packed.device)
        except (ValueError, KeyError) as error:
            raise ConfigError(f"{name}: unreadable 4-bit quantization state ({error})") from None
        if tuple(state.shape) != (self.out_features, self.in_features) or state.quant_type != self.spec.quant_type:
            raise ConfigError(
                f"{name}: stored as {state.quant_type} {tuple(state.shape)}, expected {self.spec.quant_type} "
                f"({self.out_features}, {self.in_features}); load it with quantize={state.quant_type}"
            )
        state.dtype = self.spec.compute_dtype
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        extra = {
            k[len(prefix) + len("weight.") :]: state_dict.pop(k)
            for k in list(state_dict)
            if k.startswith(prefix + "weight.")
        }
        packed = state_dict.pop(prefix + "weight", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if packed is not None:
            missing_keys[:] = [k for k in missing_keys if k != prefix + "weight"]
            self.set_packed(packed.to(self.weight.device), extra, prefix + "weight")

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{s.quant_type}, double_quant={s.double_quant}, compute_dtype={s.compute_dtype}"
        )
