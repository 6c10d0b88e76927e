"""A model's module layout without its weights: which modules LoRA can adapt (and of what kind), and whether
the input embedding and output head share one weight."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loratune.errors import ConfigError

# Architectures whose RMSNorm is ``weight * (x·rstd).to(dtype)`` and whose MLP is down(silu(gate(x)) * up(x)):
# model_type -> the prefix of their transformers class names.
# The mixture-of-experts families among them have such norms (and such MLPs in their dense layers and shared
# experts, where they have any); their experts are ``layers.experts``'s.
LLAMA_LIKE_MODEL_TYPES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "smollm3": "SmolLM3",
    "mixtral": "Mixtral",
    "qwen3_moe": "Qwen3Moe",
    "olmoe": "Olmoe",
    "deepseek_v3": "DeepseekV3",
}


@dataclass(frozen=True)
class ModelStructure:
    """``kinds``: {module path: "linear" | "conv1d" | "embedding"}; ``tied``: (input embedding path, output
    head path) when they share one weight, else None; ``model_type`` from the config."""

    kinds: dict[str, str]
    tied: tuple[str, str] | None
    model_type: str | None


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """{path: module} of the model's transformer blocks: the outermost modules whose class, or a class it
    derives from (FSDP gives a module it shards a subclass of its own), the model names in
    ``_no_split_modules``."""
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if any(c.__name__ in kinds for c in type(module).__mro__) and not any(
            path.startswith(outer + ".") for outer in blocks
        ):
            blocks[path] = module
    return blocks


def _kind(module: nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def meta_model(model_dir: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM in ``model_dir`` built on the meta device: its modules and shapes, no weights read.

    Raises ``ConfigError`` when transformers cannot build a causal LM from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot build the model in {model_dir} from its config.json: {first}") from None


def model_structure(model_dir: str | Path, trust_remote_code: bool = False) -> ModelStructure:
    """The ``ModelStructure`` of the causal LM in ``model_dir``, built on the meta device (no weights read).

    Raises ``ConfigError`` when transformers cannot build a causal LM from its config."""
    model = meta_model(model_dir, trust_remote_code)
    config = model.config
    names = {id(module): path for path, module in model.named_modules()}
    kinds = {path: kind for path, module in model.named_modules() if (kind := _kind(module)) is not None}
    tied = None
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and out is not None and inp.weight is out.weight:
        tied = (names[id(inp)], names[id(out)])
    return ModelStructure(kinds, tied, getattr(config, "model_type", None))


def llama_family_classes(model: nn.Module) -> tuple[type, type | None] | None:
    """(RMSNorm class, MLP class or None when it has none) of ``model``'s architecture when it is a Llama-family
    one in transformers (``LLAMA_LIKE_MODEL_TYPES``), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    prefix = LLAMA_LIKE_MODEL_TYPES.get(model_type)
    if prefix is None:
        return None
    try:
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    norm, mlp = getattr(modeling, f"{prefix}RMSNorm", None), getattr(modeling, f"{prefix}MLP", None)
    return (norm, mlp) if norm is not None else None


def has_silu_activation(mlp: nn.Module) -> bool:
    """Whether a Llama-family MLP's ``act_fn`` is plain SiLU (torch's, or transformers' own class for it)."""
    activations = importlib.import_module("transformers.activations")
    kinds = (nn.SiLU, *filter(None, [getattr(activations, "SiLUActivation", None)]))
    return isinstance(getattr(mlp, "act_fn", None), kinds)
