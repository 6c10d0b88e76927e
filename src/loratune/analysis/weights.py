"""Read a model directory's safetensors weights one tensor at a time (single file or sharded with an index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from loratune.errors import ConfigError
from loratune.files import reading

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class WeightReader:
    """The tensors of a Hugging Face model directory by name, each read from disk when asked for (so holding
    a reader costs no memory). ``keys()`` lists them, ``shape(key)`` reads only the header."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            with reading(index, "weight index", ConfigError):
                text = index.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{index}: invalid JSON ({exc})") from None
            files = {key: self.directory / name for key, name in data.get("weight_map", {}).items()}
        elif (self.directory / SINGLE_NAME).is_file():
            single = self.directory / SINGLE_NAME
            with reading(single, "weights", ConfigError), safe_open(str(single), framework="pt") as handle:
                files = dict.fromkeys(handle.keys(), single)
        else:
            raise ConfigError(
                f"{self.directory} holds no {SINGLE_NAME} or {INDEX_NAME}; point to a Hugging Face model directory "
                "saved with safetensors"
            )
        self._files = files

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        with reading(self._files[key], "weights", ConfigError), safe_open(str(self._files[key]), "pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored (its own dtype)."""
        with reading(self._files[key], "weights", ConfigError), safe_open(str(self._files[key]), "pt") as handle:
            return handle.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the matrix ``key`` (only those bytes are read)."""
        with reading(self._files[key], "weights", ConfigError), safe_open(str(self._files[key]), "pt") as handle:
            return handle.get_slice(key)[start:stop]
