"""The kinds of LoRA layer: what A and B mean for each base module type.

``LoraLinear`` wraps ``nn.Linear`` and ``LoraLinear4bit`` a quantized Linear (``QuantizedLinear``:
``quant.Linear4bit``, weight out × in); ``LoraConv1D`` wraps transformers' GPT-2 ``Conv1D`` (weight in × out);
``LoraEmbedding`` wraps ``nn.Embedding`` (A is a lookup table); ``LoraConv`` wraps ``nn.Conv1d``/``Conv2d``/
``Conv3d`` (A a convolution like the base's with r output channels, B a 1 × 1 one). The Linear-like kinds also tell
``layers.execution`` how to compute their base product and dense weight, which its fast paths need.
"""

from __future__ import annotations

import functools
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from loratune.errors import ConfigError
from loratune.kernels import rows
from loratune.layers.lora import LoraLayer

MERGE_4BIT_HINT = (
    "the base weights are stored in 4 bits, so an adapter cannot be merged into them in place; use "
    "`loratune merge` (dequantizes, adds the delta in float32, writes a bf16/fp16 model) or its --requantize "
    "option (writes a 4-bit model and reports the error re-quantizing adds)"
)


@runtime_checkable
class QuantizedLinear(Protocol):
    """A frozen Linear layer whose weight is stored compressed (``quant.Linear4bit``): what LoRA needs of it."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    compute_dtype: torch.dtype

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor: ...


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` (weight out × in)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # a subclass of nn.Linear may compute its own way: only the reference path calls it as it is
        self.fast_paths = type(base_layer) is nn.Linear

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base multiplies in: inputs in it take the fused paths."""
        return self.base_layer.weight.dtype

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(x.dtype))

    def plain_weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of a base that is exactly ``nn.Linear`` (what the few-row kernel multiplies by
        itself), else None."""
        base = self.base_layer
        return (base.weight, base.bias) if type(base) is nn.Linear else None

    def base_product(self):
        """A function computing the base output for an input (…, in), bound to the current base weight (for a
        plain Linear, ``F.linear`` itself, or the few-row kernel's product when decoding: no module call per
        use)."""
        return functools.partial(rows.linear, weight=self.base_layer.weight, bias=self.base_layer.bias)


class LoraLinear4bit(LoraLinear):
    """LoRA around a Linear whose frozen weight is stored in 4 bits (``QuantizedLinear``): the base is dequantized
    on the fly to multiply; PiSSA/OLoRA starts and merging in place are refused (the weight cannot change)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fast_paths = True

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.base_layer.compute_dtype

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight (out × in), dequantized into ``dtype`` (default: the compute dtype): a new tensor."""
        return self.base_layer.dequantized_weight(dtype or self.compute_dtype)

    def base_product(self):
        return self.base_layer

    def base_trains(self) -> bool:
        return False

    def _check_pissa(self, weight_is_shared: bool) -> None:
        raise ConfigError(
            "PiSSA and OLoRA starts rewrite the base weight, which is stored in 4 bits here; load the base "
            "unquantized (model.quantize: null) to start from them"
        )

    def check_merge(self, name: str, *, safe: bool = False) -> None:
        raise ConfigError(MERGE_4BIT_HINT)


class LoraConv1D(LoraLinear):
    """LoRA around transformers' GPT-2 ``Conv1D`` (weight in × out, i.e. transposed). Same A/B as Linear."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fast_paths = True

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1]

    def weight_layout(self, delta):
        return delta.T

    def base_product(self):
        return self.base_layer


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: A is r × num_embeddings (a lookup table), B is embedding_dim × r.

    Follows loralib/PEFT: A starts at zero and B normal; no dropout on token ids; the low-rank path runs in
    the adapter's dtype (token ids carry none).
    """

    embedding = True

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def weight_layout(self, delta):
        return delta.T  # num_embeddings × embedding_dim

    def down(self, ids: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        table = A.to(ids.device).T
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def _check_pissa(self, weight_is_shared: bool) -> None:
        raise ConfigError("PiSSA and OLoRA starts are not supported for embeddings; use init_lora_weights=True")


class LoraConv(LoraLayer):
    """LoRA around ``nn.Conv1d``/``Conv2d``/``Conv3d`` (groups = 1), PEFT's definition: A is a convolution
    like the base's (r × in × k…: same kernel, stride, padding, dilation and padding mode), B a 1 × 1 one
    (out × r × 1…). As matrices — A flattened to r × (in·k…), B to out × r — ΔW = s·B·A is the change
    to the base kernel flattened the same way, which merging adds."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def factor_shapes(self, r: int):
        kernel = tuple(self.base_layer.kernel_size)
        return (r, self.in_features, *kernel), (self.out_features, r, *(1,) * len(kernel))

    def matrix_layout(self, weight):
        return weight.flatten(1)

    def weight_layout(self, delta):
        return delta.reshape(self.base_weight.shape)

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, A.to(x.device, x.dtype), None)

    def up(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return _CONV_BY_DIMS[B.ndim - 2](h, B.to(h.device, h.dtype))

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_weight, None)

    def _check_dora(self) -> None:
        raise ConfigError(
            "DoRA is not supported on convolution layers yet; use plain LoRA there (use_dora: false) or "
            "leave convolutions out of target_modules"
        )

    def _check_pissa(self, weight_is_shared: bool) -> None:
        raise ConfigError("PiSSA and OLoRA starts are not supported for convolutions; use init_lora_weights=True")


_CONV_BY_DIMS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution LoRA can wrap: ``nn.Conv1d``/``Conv2d``/``Conv3d`` with groups = 1."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style, transposed weight), without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer LoRA can wrap: ``nn.Linear``, a quantized Linear or a ``Conv1D``."""
    return isinstance(module, (nn.Linear, QuantizedLinear)) or is_conv1d(module)


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or None when LoRA does not support its type."""
    if isinstance(module, QuantizedLinear):
        return LoraLinear4bit
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if is_conv1d(module):
        return LoraConv1D
    if is_conv(module):
        return LoraConv
    return None
