"""The run directory ``train`` writes: refusing to clobber one, the resolved ``config.yaml``, data hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import tempfile
from pathlib import Path

import yaml

from loratune.errors import ConfigError
from loratune.train.config import TrainConfig

CONFIG_FILE = "config.yaml"
_VERSIONED = ("loratune", "torch", "transformers", "safetensors", "peft", "bitsandbytes")


def prepare_run_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``path`` for a new run, or check it for ``resume``.

    Raises ``ConfigError`` when a non-empty directory exists and neither ``resume`` nor ``overwrite`` is
    given, and when ``resume`` finds no run there.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    exists = path.is_dir() and any(path.iterdir())
    if resume:
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {path} holds no run to resume (no {CONFIG_FILE}); start it without --resume")
        return
    if exists and not overwrite:
        raise ConfigError(
            f"output directory {path} already exists and is not empty; use --resume to continue that run "
            "or --overwrite to replace it (or set output_dir)"
        )
    if exists:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_run_config(path: Path, config: TrainConfig) -> TrainConfig:
    """Write the fully resolved config, with package versions and data hashes under ``meta``; return it."""
    hashes = {key: file_sha256(value) for key in ("train", "eval") if (value := getattr(config.data, key))}
    config = config.model_copy(update={"meta": {"versions": package_versions(), "data_sha256": hashes}})
    write_text_atomic(path / CONFIG_FILE, yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    return config


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
