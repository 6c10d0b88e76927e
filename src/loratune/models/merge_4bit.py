"""Merging adapters over a 4-bit base without silently losing quality, and writing 4-bit models.

The in-place ``merge`` refuses on 4-bit layers (adding a small delta to 4-bit codes would mostly round it
away). Instead ``dequantize_model`` turns every ``Linear4bit`` back into a float32 ``nn.Linear`` (exactly the
weights the adapter was trained against), the ordinary float32 merge runs on that, and the result is written
in bf16/fp16. ``requantize_model`` is the explicit way back to 4 bits; it returns the error it adds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.adapters.surgery import lora_layers
from loratune.models.export import weights_are_tied
from loratune.outputs import check_output_dir, write_output_dir
from loratune.quant import Linear4bit, QuantSpec, dequantize_weight, quantize_weight
from loratune.quant.experts4bit import is_experts_4bit


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, QuantSpec]:
    """Replace every ``Linear4bit`` of ``model`` (in place) by an ``nn.Linear`` holding its dequantized weight in
    ``dtype``, and every 4-bit expert stack by its float stack; return {path: spec} of the replaced Linear layers,
    for ``requantize_model`` (expert stacks stay float). Call before adding adapters."""
    specs = {}
    for path, module in list(model.named_modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            if is_experts_4bit(param):
                setattr(module, name, nn.Parameter(param.dequantized(dtype), requires_grad=False))
                module.__dict__.pop("forward", None)  # its own forward again (``layers.experts.run_grouped``)
        if isinstance(module, Linear4bit):
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                device=module.weight.device,
                dtype=dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            model.set_submodule(path, linear)
            specs[path] = module.spec
    return specs


def requantize_model(
    model: nn.Module, specs: dict[str, QuantSpec], reference_deltas: dict[str, float] | None = None
) -> dict:
    """Quantize the Linear layers at ``specs``' paths back to 4 bits (in place); return the error this adds:
    ``relative_error`` = ‖Q(W) − W‖ / ‖W‖ over all those weights together, the worst layer's, and, given
    ``reference_deltas`` ({path: ‖ΔW‖², the merged adapters' change}), ``error_vs_delta`` = ‖Q(W) − W‖ / ‖ΔW‖:
    how large the re-quantization noise is next to what the adapters changed (≥ 1: the adapters drown in it)."""
    err_sq = ref_sq = 0.0
    worst = 0.0
    for path, spec in specs.items():
        linear = model.get_submodule(path)
        dense = linear.weight.detach().float()
        packed, state = quantize_weight(dense, spec, name=f"{path}.weight")
        layer_err = float((dequantize_weight(packed, state, torch.float32) - dense).norm()) ** 2
        layer_ref = float(dense.norm()) ** 2
        err_sq, ref_sq = err_sq + layer_err, ref_sq + layer_ref
        worst = max(worst, math.sqrt(layer_err / layer_ref) if layer_ref else 0.0)
        model.set_submodule(path, Linear4bit.from_weight(dense, linear.bias, spec, name=f"{path}.weight"))
    report = {
        "layers": len(specs),
        "relative_error": math.sqrt(err_sq / ref_sq) if ref_sq else 0.0,
        "worst_layer_relative_error": worst,
    }
    if reference_deltas:
        delta_sq = sum(reference_deltas.get(p, 0.0) for p in specs)
        report["error_vs_delta"] = math.sqrt(err_sq / delta_sq) if delta_sq else None
    return report


def merged_delta_norms(model: nn.Module) -> dict[str, float]:
    """{path: ‖Σ active s·B·A‖²} for every LoRA layer of ``model``: the change merging will make there."""
    norms = {}
    for path, layer in lora_layers(model):
        names = [n for n in layer.state.active if n in layer.specs and layer.state.merged_scale(n) is None]
        if names:
            delta = sum(layer.delta_weight(n) for n in names)
            norms[path] = float(delta.norm()) ** 2
    return norms


def save_quantized_model(model: nn.Module, tokenizer, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` with its ``Linear4bit`` layers as a Hugging Face directory in bitsandbytes' 4-bit format
    (``quantization_config`` in config.json, packed weights + quantization state in safetensors), which
    transformers + bitsandbytes and ``load_model(quantize=...)`` read. Built beside ``out_dir`` and swapped in;
    ``ConfigError`` when ``out_dir`` cannot be replaced (see ``loratune.outputs.check_output_dir``)."""
    layers = {p: m for p, m in model.named_modules() if isinstance(m, Linear4bit)}
    spec = next(iter(layers.values())).spec
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_are_tied(model):
        head = next(p for p, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{head}.weight")  # the embeddings hold it; safetensors refuses shared tensors
    keep = sorted({p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p not in layers})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": spec.quant_type,
        "bnb_4bit_use_double_quant": spec.double_quant,
        "bnb_4bit_compute_dtype": str(spec.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": [p.rsplit(".", 1)[-1] for p in keep] or None,
    }
    check_output_dir(out_dir, overwrite=overwrite)

    def fill(staging: Path) -> None:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))

    return write_output_dir(out_dir, "model", fill, overwrite=overwrite)
