"""Load base models and tokenizers: local Hugging Face directories, ``.gguf`` files and short aliases.

Imports only torch, transformers, gguf, safetensors and ``loratune.errors``; never a higher layer.
"""

from loratune.models.aliases import ALIASES, ModelAlias, alias_gguf_path, alias_names, get_alias
from loratune.models.devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from loratune.models.gguf_cache import cache_root, cached_hf_dir, convert_gguf_to_hf, gguf_cache_dir, is_cached
from loratune.models.loader import (
    check_quantize,
    context_length,
    hf_name_for,
    load_classifier,
    load_model,
    load_tokenizer,
    model_sources,
    resolve_model_dir,
)

__all__ = [
    "ALIASES",
    "ModelAlias",
    "alias_gguf_path",
    "alias_names",
    "cache_root",
    "cached_hf_dir",
    "check_quantize",
    "context_length",
    "convert_gguf_to_hf",
    "cpu_has_native_bf16",
    "get_alias",
    "gguf_cache_dir",
    "hf_name_for",
    "is_cached",
    "load_classifier",
    "load_model",
    "load_tokenizer",
    "model_sources",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_dir",
]
