"""Which Linear layers a 4-bit model stores in 4 bits, and quantizing a model that is already loaded. Loading
one in 4 bits from its checkpoint, without the full-precision model ever in memory, is ``models.streamed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from loratune.adapters.targets import module_name_matches, output_head_path
from loratune.errors import ConfigError
from loratune.quant import Linear4bit, QuantSpec

# Keywords of ``unquantized_modules``; any other entry names Linear modules (exact path or dotted suffix).
EMBEDDINGS, OUTPUT_HEAD, NORMS = "embeddings", "output_head", "norms"
DEFAULT_UNQUANTIZED = (EMBEDDINGS, OUTPUT_HEAD, NORMS)


def check_unquantized_modules(unquantized: Sequence[str]) -> list[str]:
    """``unquantized`` as a list; ``ConfigError`` when it leaves out embeddings or norms, which only Linear-layer
    4-bit storage could hold and therefore always stay in the model dtype."""
    unquantized = list(unquantized)
    for keyword in (EMBEDDINGS, NORMS):
        if keyword not in unquantized:
            raise ConfigError(
                f"model.unquantized_modules must include {keyword!r}: only Linear layers are stored in 4 bits, "
                f"{keyword} always stay in the model dtype"
            )
    return unquantized


def modules_to_quantize(model: nn.Module, unquantized: Sequence[str] = DEFAULT_UNQUANTIZED) -> list[str]:
    """Paths of the ``nn.Linear`` modules of ``model`` that 4-bit loading quantizes: all of them except the
    output head (unless ``"output_head"`` is left out of ``unquantized``) and those ``unquantized`` names."""
    unquantized = check_unquantized_modules(unquantized)
    names = [n for n in unquantized if n not in DEFAULT_UNQUANTIZED]
    head = output_head_path(model) if OUTPUT_HEAD in unquantized else None
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path != head and not (names and module_name_matches(names, path))
    ]


def expert_blocks_to_quantize(model: nn.Module, unquantized: Sequence[str] = DEFAULT_UNQUANTIZED) -> list[str]:
    """Paths of the fused experts modules (mixture-of-experts models) whose expert stacks 4-bit loading stores in
    4 bits: all of them except those ``unquantized`` names."""
    from loratune.layers.experts import is_fused_experts

    names = [n for n in check_unquantized_modules(unquantized) if n not in DEFAULT_UNQUANTIZED]
    return [
        path
        for path, module in model.named_modules()
        if is_fused_experts(module) and not (names and module_name_matches(names, path))
    ]


def quantize_model(model: nn.Module, spec: QuantSpec, unquantized: Sequence[str] = DEFAULT_UNQUANTIZED) -> nn.Module:
    """Replace the Linear layers ``modules_to_quantize`` picks by ``Linear4bit`` and store the expert stacks of
    ``expert_blocks_to_quantize`` in 4 bits (in place); return ``model``.

    Raises ``ConfigError`` for a weight that cannot be quantized.
    """
    from loratune.layers.experts import quantize_experts

    for path in modules_to_quantize(model, unquantized):
        linear = model.get_submodule(path)
        layer = Linear4bit.from_weight(linear.weight, linear.bias, spec, name=f"{path}.weight")
        model.set_submodule(path, layer)
    for path in expert_blocks_to_quantize(model, unquantized):
        quantize_experts(model.get_submodule(path), spec, path)
    return model


def stored_in_4bit(model_dir: str | Path) -> str | None:
    """The 4-bit type ("nf4"/"fp4") a model directory's config.json says its weights are stored in, or None."""
    import json

    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    quant = config.get("quantization_config") or {}
    return quant.get("bnb_4bit_quant_type", "fp4") if quant.get("load_in_4bit") else None


def modules_to_quantize_in(model: nn.Module) -> list[str]:
    """Paths of the ``Linear4bit`` modules of ``model``."""
    return [path for path, module in model.named_modules() if isinstance(module, Linear4bit)]


def quantized_summary(model: nn.Module) -> dict:
    """Counts for reports: quantized layers (a 4-bit expert stack counts as one), their parameters, their storage
    bytes and bytes per parameter."""
    from loratune.quant.experts4bit import is_experts_4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    stacks = [p for p in model.parameters() if is_experts_4bit(p)]
    params = sum(m.in_features * m.out_features for m in layers) + sum(math.prod(p.expert_shape) for p in stacks)
    stored = sum(m.storage_bytes() for m in layers) + sum(p.storage_bytes() for p in stacks)
    return {
        "layers": len(layers) + len(stacks),
        "parameters": params,
        "bytes": stored,
        "bytes_per_parameter": stored / params if params else None,
    }
