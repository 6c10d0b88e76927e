"""Loading a model with its Linear layers in 4 bits, streaming the checkpoint so that the full-precision model
never exists in memory; and quantizing a model that is already loaded (the same choice of layers).

Streaming: the model is built with its parameters on the meta device (no memory), the Linear layers to
quantize become empty ``Linear4bit`` modules, then the safetensors files are read one tensor at a time (see
``quant.safetensors_stream``): each Linear weight is quantized as it arrives and its full-precision copy
dropped, every other tensor is cast to the model dtype and put in place. Peak memory is about the 4-bit model
plus the unquantized modules plus the largest single Linear weight and bitsandbytes' working memory while it
quantizes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from loratune.adapters.targets import module_name_matches, output_head_path
from loratune.errors import ConfigError, LoratuneError
from loratune.quant import Linear4bit, QuantSpec, checkpoint_files, iter_tensors, read_header
from loratune.quant.memory import release_freed_memory

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
        path for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and path != head and not (names and module_name_matches(names, path))
    ]


def quantize_model(model: nn.Module, spec: QuantSpec, unquantized: Sequence[str] = DEFAULT_UNQUANTIZED) -> nn.Module:
    """Replace the Linear layers ``modules_to_quantize`` picks by ``Linear4bit`` (in place); return ``model``.

    Raises ``ConfigError`` for a
    weight that cannot be quantized.
    """
    for path in modules_to_quantize(model, unquantized):
        linear = model.get_submodule(path)
        layer = Linear4bit.from_weight(linear.weight, linear.bias, spec, name=f"{path}.weight")
        model.set_submodule(path, layer)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside the block, new parameters are created on the meta device (no memory); buffers stay real, since
    modules compute some in ``__init__`` (rotary frequencies) and checkpoints do not carry them."""
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_quantized_model(
    model_dir: str | Path,
    spec: QuantSpec,
    dtype: torch.dtype,
    device: str = "cpu",
    unquantized: Sequence[str] = DEFAULT_UNQUANTIZED,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Build the causal LM of ``model_dir`` with 4-bit Linear layers, streaming its safetensors weights.

    Non-quantized tensors are cast to ``dtype``; everything is placed on ``device`` as it is read. Returns the
    model in eval mode. Raises ``ModelNotFoundError`` without safetensors weights, ``ConfigError`` for a tensor
    that cannot be quantized, and ``LoratuneError`` when checkpoint and model disagree (missing or unknown
    tensors, wrong shapes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    # A checkpoint written in 4 bits (bitsandbytes format) names its quantized layers by their state tensors.
    names = [name for file in files for name in read_header(file)[1]]
    prequantized = sorted(n[: -len(_PACKED_MARK)] for n in names if n.endswith(_PACKED_MARK))
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we do the quantizing; transformers must not try bitsandbytes' own
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for path in prequantized or modules_to_quantize(model, unquantized):
        meta = model.get_submodule(path)
        model.set_submodule(path, Linear4bit(meta.in_features, meta.out_features, meta.bias is not None, spec, device))
    quantized = {path + ".weight": model.get_submodule(path) for path in modules_to_quantize_in(model)}
    # packed data + state tensors of each pre-quantized layer, gathered until all of them have been read
    expected = {p + ".weight": {n for n in names if n == p + ".weight" or n.startswith(p + ".weight.")} for p in prequantized}
    pending: dict[str, dict[str, torch.Tensor]] = {}

    unknown, mismatched = [], []
    for file in files:
        for name, tensor in iter_tensors(file):
            owner = _owner_of(name, expected)
            if owner is not None:
                pending.setdefault(owner, {})[name[len(owner) + 1:] if name != owner else ""] = tensor.to(device)
                if len(pending[owner]) == len(expected[owner]):
                    parts = pending.pop(owner)
                    quantized.pop(owner).set_packed(parts.pop(""), parts, owner)
                continue
            if name in quantized:
                quantized.pop(name).set_weight(tensor.to(device), name)
                del tensor
                release_freed_memory()  # or heap holes left by quantizing add up to hundreds of MB
                continue
            problem = _place_tensor(model, name, tensor.to(device), dtype)
            if problem == "unknown":
                unknown.append(name)
            elif problem:
                mismatched.append(problem)
            del tensor
    model.tie_weights()  # shares the output head with the embeddings when the config says so
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    missing += [n for n in quantized]
    problems = []
    if mismatched:
        problems.append(f"shapes differ from config.json: {', '.join(mismatched[:3])}")
    if missing:
        problems.append(f"tensors missing from the checkpoint: {', '.join(missing[:5])}")
    if unknown:
        problems.append(f"tensors the model has no place for: {', '.join(unknown[:5])}")
    if problems:
        raise LoratuneError(f"cannot load {model_dir} in 4 bits: {'; '.join(problems)}")
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model.to(device)
    model.eval()
    return model


def _place_tensor(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Put checkpoint tensor ``name`` (cast to ``dtype`` if floating) in place of the model's parameter or
    buffer of that name. Returns None when done, "unknown" when the model has no such tensor, else what differs."""
    module_path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return "unknown"
    holder = module._parameters if leaf in module._parameters else module._buffers
    current = holder.get(leaf)
    if current is None:
        return "unknown"
    if tuple(current.shape) != tuple(tensor.shape):
        return f"{name} {tuple(tensor.shape)} vs {tuple(current.shape)}"
    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
    holder[leaf] = nn.Parameter(value, requires_grad=current.requires_grad) if holder is module._parameters else value
    return None


_PACKED_MARK = ".weight.absmax"  # present for every layer bitsandbytes stored in 4 bits


def _owner_of(name: str, expected: dict[str, set[str]]) -> str | None:
    """The ``<path>.weight`` of the pre-quantized layer tensor ``name`` belongs to, or None."""
    if name in expected:
        return name
    head, sep, _ = name.partition(".weight.")
    return head + ".weight" if sep and head + ".weight" in expected else None


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
    """Counts for reports: quantized parameters, their storage bytes and bytes per parameter."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    params = sum(m.in_features * m.out_features for m in layers)
    stored = sum(m.storage_bytes() for m in layers)
    return {"layers": len(layers), "parameters": params, "bytes": stored,
            "bytes_per_parameter": stored / params if params else None}

