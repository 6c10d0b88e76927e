"""The module names of a diffusers model or pipeline, from its configs alone (no weights read).

Mapping a kohya LoRA file's names (``lora_unet_down_blocks_0_…``) back to module paths needs them, since "_"
occurs inside module names too. The models are built on the ``meta`` device: no memory, no weights, no
download. ``trust_remote_code`` is never used: a class the installed diffusers / transformers lacks is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from loratune.errors import ConfigError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _read_config(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file} cannot be read as a model config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} is not a model config (expected a JSON object)")
    return data


def _module_paths_of(config_file: Path) -> list[str]:
    """The ``named_modules()`` paths of the model ``config_file`` describes (diffusers or transformers)."""
    config = _read_config(config_file)
    with torch.device("meta"):
        if "_class_name" in config:
            try:
                import diffusers
            except ImportError:
                raise ConfigError(
                    f"{config_file} is a diffusers model; reading its module names needs the diffusers "
                    "package: pip install diffusers"
                ) from None

            cls = getattr(diffusers, config["_class_name"], None)
            if cls is None:
                raise ConfigError(f"{config_file}: the installed diffusers has no {config['_class_name']}")
            model = cls.from_config(config)
        else:
            import transformers

            names = config.get("architectures") or []
            cls = getattr(transformers, names[0], None) if names else None
            if cls is None:
                raise ConfigError(
                    f"{config_file}: no model class the installed transformers knows (architectures: {names})"
                )
            model = cls(transformers.AutoConfig.from_pretrained(config_file.parent))
    return [path for path, _ in model.named_modules() if path]


def diffusers_module_paths(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{component: module paths}`` for a diffusers pipeline root (its ``unet/``, ``text_encoder/`` and
    ``text_encoder_2/``), a model directory or a model's ``config.json`` (a diffusers model is taken as the
    UNet, a transformers one as the text encoder).

    Raises ``ConfigError`` naming ``path`` when it is none of these."""
    root = Path(path)
    if root.is_file() and root.suffix == ".json":
        component = "unet" if "_class_name" in _read_config(root) else "text_encoder"
        return {component: _module_paths_of(root)}
    if (root / "model_index.json").is_file():
        found = {
            c: _module_paths_of(root / c / "config.json") for c in COMPONENTS if (root / c / "config.json").is_file()
        }
        if not found:
            raise ConfigError(f"{root} is a diffusers pipeline without unet/ or text_encoder/ configs")
        return found
    if (root / "config.json").is_file():
        component = "unet" if "_class_name" in _read_config(root / "config.json") else "text_encoder"
        return {component: _module_paths_of(root / "config.json")}
    raise ConfigError(
        f"{root} is not a diffusers pipeline directory (model_index.json), a model directory "
        "(config.json) or a config file; give --model one of those"
    )


__all__ = ["COMPONENTS", "diffusers_module_paths"]
