"""A base model's ``config.json`` by name, without loading its weights (what adapter tools need to know)."""

from __future__ import annotations

import json
from pathlib import Path

from loratune.errors import ModelNotFoundError
from loratune.models.aliases import ALIASES, get_alias
from loratune.models.loader import resolve_model_dir


def alias_for_hf_id(hf_id: str) -> str | None:
    """The alias whose Hugging Face id is ``hf_id`` (as adapters record it), or None."""
    for alias in ALIASES.values():
        if alias.hf_id.lower() == str(hf_id).strip().lower():
            return alias.name
    return None


def model_name_for(recorded: str) -> str:
    """The name to load an adapter's base by, from its ``base_model_name_or_path``: the alias of a built-in
    model's Hugging Face id, else the name as recorded."""
    return alias_for_hf_id(recorded) or recorded


def base_model_config(name: str | Path) -> dict:
    """The ``config.json`` content of the model ``name``: an alias, an alias's Hugging Face id (what adapters
    record), a ``.gguf`` file (converted once into the cache) or a local model directory.

    Raises ``ModelNotFoundError`` when ``name`` cannot be resolved or its config cannot be read.
    """
    if get_alias(str(name)) is None:
        name = alias_for_hf_id(str(name)) or name
    config_file = resolve_model_dir(name) / "config.json"
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"cannot read {config_file}: {error}") from None
