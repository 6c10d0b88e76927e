"""How a base weight is stored in 4 bits: the one place that names the formats and their defaults."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratune.errors import ConfigError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # elements per absmax block (the QLoRA paper's choice)


@dataclass(frozen=True)
class QuantSpec:
    """4-bit storage of frozen Linear weights.

    ``quant_type``: "nf4" (NormalFloat, the QLoRA default) or "fp4". ``double_quant``: the per-block absmax
    values are themselves quantized to 8 bits in blocks of 256 (~0.37 bits/parameter saved).
    ``compute_dtype``: the dtype weights are dequantized to and matmuls run in.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    blocksize: int = BLOCKSIZE

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"unknown quant_type {self.quant_type!r}; use one of: {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(f"compute dtype {self.compute_dtype} is not supported; use bf16, fp16 or fp32")
