"""4-bit base weights (NF4/FP4 via bitsandbytes) behind a small interface; the bottom layer of loratune.

``QuantSpec`` says how weights are stored, ``Linear4bit`` is a frozen Linear holding them, and
``iter_tensors`` / ``checkpoint_files`` stream safetensors checkpoints tensor by tensor for memory-lean loading.
"""

from loratune.quant.linear4bit import Dequantized4bitMatmul, Linear4bit, dequantize_weight, quantize_weight
from loratune.quant.safetensors_stream import checkpoint_files, iter_tensors, read_header
from loratune.quant.spec import BLOCKSIZE, QUANT_TYPES, QuantSpec

__all__ = [
    "BLOCKSIZE",
    "QUANT_TYPES",
    "Dequantized4bitMatmul",
    "Linear4bit",
    "QuantSpec",
    "checkpoint_files",
    "dequantize_weight",
    "iter_tensors",
    "quantize_weight",
    "read_header",
]
