"""loratune: fine-tune large language models with LoRA and QLoRA; adapters in PEFT's format."""

from loratune.adapters import (
    LoraConfig,
    active_adapters,
    add_adapter,
    compress_adapter,
    delete_adapter,
    disabled_adapters,
    load_adapter,
    mix_adapter_dirs,
    mix_adapters,
    mixed_batch,
    parameter_report,
    save_adapter,
    set_active,
    set_strength,
    unload,
)
from loratune.adapters import merge_adapters as merge
from loratune.adapters import unmerge_adapters as unmerge
from loratune.errors import AdapterLoadError, ConfigError, DataError, LoratuneError, ModelNotFoundError
from loratune.version import __version__


def load_model(name="smollm2-135m", quantize=None, dtype=None, device=None, **kwargs):
    """Load a base model and its tokenizer: an alias, a ``.gguf`` file or a Hugging Face directory.

    See ``loratune.models.load_model``; imported lazily so that ``import loratune`` stays light.
    """
    from loratune.models import load_model as _load_model

    return _load_model(name, quantize=quantize, dtype=dtype, device=device, **kwargs)


__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "DataError",
    "LoraConfig",
    "LoratuneError",
    "ModelNotFoundError",
    "__version__",
    "active_adapters",
    "add_adapter",
    "compress_adapter",
    "delete_adapter",
    "disabled_adapters",
    "load_adapter",
    "load_model",
    "merge",
    "mix_adapter_dirs",
    "mix_adapters",
    "mixed_batch",
    "parameter_report",
    "save_adapter",
    "set_active",
    "set_strength",
    "unload",
    "unmerge",
]
