"""LoRA layers, read top to bottom:

- ``state``: what a layer does now (``LayerState``, ``Routing``) as an immutable value, and its ``Term``s;
- ``init``: how factors start (LoRA's, gaussian, PiSSA and its randomized variant, OLoRA);
- ``dora``: DoRA's math (row norms without the dense update, the weight change, strength);
- ``lora``: the layer and its math (``reference_forward`` defines the output);
- ``kinds``: what A and B mean around a Linear, a 4-bit Linear, a GPT-2 Conv1D, an Embedding and a convolution;
- ``execution``: faster ways to compute the same output, as backends ``select`` picks from (fused training,
  stacked mixed batches, no-grad plans, the compiled kernel);
- ``fused_linear``: the lean autograd function of the fused path;
- ``experts``: a fused mixture-of-experts block with adapted experts, computed per expert group;
- ``parameters``: LoRA on parameters that are not a Linear's weight (PEFT's ``target_parameters``): 3-D expert
  stacks and other 2-D weights (``LoraParameter``), held by the ``AdaptedModule`` that replaces their owner;
- the compiled CPU kernel that plans use for a few rows lives in ``loratune.kernels.lowrank``.
"""

from loratune.layers.init import INIT_CHOICES, UNINITIALISED, PissaStart, is_residual_start, is_valid_init
from loratune.layers.kinds import (
    MERGE_4BIT_HINT,
    LoraConv,
    LoraConv1D,
    LoraEmbedding,
    LoraLinear,
    LoraLinear4bit,
    QuantizedLinear,
    is_conv,
    is_conv1d,
    is_linear,
    lora_class_for,
)
from loratune.layers.lora import AdapterSpec, LoraLayer, lora_scaling
from loratune.layers.parameters import AdaptedModule, LoraParameter
from loratune.layers.state import BASE_ADAPTER, LayerState, Routing, Term

__all__ = [
    "BASE_ADAPTER",
    "INIT_CHOICES",
    "MERGE_4BIT_HINT",
    "UNINITIALISED",
    "AdaptedModule",
    "AdapterSpec",
    "LayerState",
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraLinear4bit",
    "LoraParameter",
    "PissaStart",
    "QuantizedLinear",
    "Routing",
    "Term",
    "is_conv",
    "is_conv1d",
    "is_linear",
    "is_residual_start",
    "is_valid_init",
    "lora_class_for",
    "lora_scaling",
]
