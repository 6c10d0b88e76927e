"""LoRA modules: the math of low-rank adapters around Linear, Conv1D and Embedding layers."""

from loratune.layers.lora import (
    INIT_CHOICES,
    UNINITIALISED,
    LoraConv1D,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    PissaStart,
    RowGroups,
    is_conv1d,
    lora_class_for,
    lora_scaling,
)

__all__ = [
    "INIT_CHOICES",
    "UNINITIALISED",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "PissaStart",
    "RowGroups",
    "is_conv1d",
    "lora_class_for",
    "lora_scaling",
]
