"""Writing a plain Hugging Face model directory (e.g. a merged model) that ``transformers`` loads as is."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loratune.outputs import check_output_dir, write_output_dir


def weights_are_tied(model: nn.Module) -> bool:
    """Whether the input embeddings and the output head share one weight tensor."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return False
    inp, out = get_in(), get_out()
    return inp is not None and out is not None and inp.weight is out.weight


def save_hf_model(
    model,
    tokenizer,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    extras: dict[str, str] | None = None,
) -> Path:
    """Save ``model`` (safetensors), its tokenizer and chat template and generation config into ``out_dir``
    (and ``extras``: more text files by name, such as a classifier's ``labels.json``).

    Built in a directory beside ``out_dir`` and swapped in, so ``out_dir`` is complete or as it was. When the
    embeddings and output head are no longer the same tensor (merging untied them), the config says so, or
    transformers would re-tie them on load. Raises ``ConfigError`` when ``out_dir`` exists and is not empty
    without ``overwrite``, or cannot be replaced (see ``loratune.outputs.check_output_dir``).
    """
    check_output_dir(out_dir, overwrite=overwrite)
    if dtype is not None:
        model = model.to(dtype)

    def fill(staging: Path) -> None:
        write_hf_model(model, tokenizer, staging)
        for name, text in (extras or {}).items():
            (staging / name).write_text(text, encoding="utf-8")

    return write_output_dir(out_dir, "model", fill, overwrite=overwrite)


def write_hf_model(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """Write ``model`` (safetensors), its tokenizer and chat template and generation config into the existing
    directory ``directory`` (no atomicity of its own: build it in a staging directory). ``state_dict``: the
    weights to write in place of the model's own (a sharded model's, gathered)."""
    model.config.tie_word_embeddings = weights_are_tied(model)
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = model.config.tie_word_embeddings
    model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(directory))
