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
from loratune.layers.lora_4bit import MERGE_4BIT_HINT, LoraLinear4bit

__all__ = [
    "INIT_CHOICES",
    "UNINITIALISED",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraLinear4bit",
    "MERGE_4BIT_HINT",
    "PissaStart",
    "RowGroups",
    "is_conv1d",
    "lora_class_for",
    "lora_scaling",
]
