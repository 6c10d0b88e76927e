"""Reading adapter directories for the server: the disk work, kept off the engine thread and the event loop.

``AdapterPool`` runs these on its reader thread: ``inspect`` (config, base model, tokenizer) once, when an
adapter becomes known, and ``read`` (config and tensors) each time it is brought into memory. Nothing here
touches the model; the engine thread attaches what ``read`` returns between two decoding steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.adapters import LoraConfig, read_adapter, read_adapter_config
from loratune.errors import LoratuneError
from loratune.outputs import being_written
from loratune.serve.protocol import RequestError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Inspected:
    """What the server keeps of an adapter directory while the adapter is known (its tensors aside)."""

    tokenizer: object | None  # the directory's own tokenizer, when it has one
    replaces_modules: bool  # carries modules_to_save (whole modules, not low-rank terms)


def check_name(name: str) -> None:
    """Raise ``RequestError`` for a name no request could use (blank, padded, or reserved ``__...``)."""
    if not name or name.strip() != name or name.startswith("__"):
        raise RequestError(f"adapter name {name!r} is not usable; give a plain name such as 'support-bot'")


def inspect(path: Path, model_name: str | None) -> Inspected:
    """Check the adapter directory at ``path`` for a server of ``model_name`` and load its tokenizer, if any.
    Raises ``RequestError`` when it is not an adapter directory, is being written, or records another base."""
    refuse_while_written(path)
    try:
        config = read_adapter_config(path)
    except LoratuneError as error:
        raise RequestError(str(error)) from None
    theirs = config.base_model_name_or_path
    if model_name and theirs and not _same_base(model_name, theirs):
        raise RequestError(
            f"adapter {path} was trained on {theirs!r}, but this server runs {model_name!r}; serve it with its own base"
        )
    tokenizer = None
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    return Inspected(tokenizer, bool(config.modules_to_save))


def read(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the adapter at ``path``; ``RequestError`` when they cannot be read now."""
    refuse_while_written(path)
    _into_memory(path)
    try:
        return read_adapter(path)
    except LoratuneError as error:
        raise RequestError(str(error)) from None


def _into_memory(path: Path) -> None:
    """Read the weights files once with plain reads, which release the GIL while the disk works, so that
    safetensors' copy, which holds it, finds them in the page cache: a cold 30 MB read then slowed the
    engine's concurrent step by ~30 ms instead of ~50 ms (2 cores). Errors are left to the real read."""
    buffer = bytearray(1 << 20)
    for weights in path.glob("adapter_model*.safetensors"):
        try:
            with open(weights, "rb", buffering=0) as file:
                while file.readinto(buffer):
                    pass
        except OSError:
            pass


def refuse_while_written(path: Path) -> None:
    """A 409 while another loratune process writes the adapter (or the run around it): it may be half replaced."""
    writer = being_written(path)
    if writer is not None:
        raise RequestError(
            f"adapter {path} cannot be read now: {writer}; load it when that finishes",
            409,
            "invalid_request_error",
            "adapter_busy",
        )


def _same_base(ours: str, theirs: str) -> bool:
    """Whether two recorded base names mean the same model: equal, or paths to the same directory."""
    if ours == theirs:
        return True
    mine, other = Path(ours), Path(theirs)
    return mine.exists() and other.exists() and mine.resolve() == other.resolve()
