"""Convert a GGUF file (or extract a zipped model directory) once into a Hugging Face safetensors
directory, and reuse it afterwards.

Dequantizing a GGUF on every load is slow while loading safetensors is fast, so the first use of a ``.gguf`` writes
the dequantized model, tokenizer, chat template
and generation config to ``<cache root>/models/<stem>-<hash>``; later loads read that directory.

Storage dtype: whatever transformers dequantizes the GGUF to — float32 for the legacy GGUF loader, which
covers Llama-family files such as SmolLM2's Q4_1. We keep it rather than casting to bf16 because the
dequantized values (``scale * q + min`` in float32) are not representable in bf16: storing float32 makes
the cached model bit-identical to loading the GGUF directly, and ``load_model`` casts to the requested
dtype afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from loratune.errors import ModelNotFoundError
from loratune.files import give_default_modes, temp_dir_beside, writing
from loratune.models.aligned import pad_safetensors_header

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "LORATUNE_CACHE"
SOURCE_RECORD = "loratune_source.json"  # written into each cache dir: where it came from, for humans
_VERY_LARGE_INTEGER = int(1e29)  # transformers' "no limit" model_max_length is ~1e30


def cache_root() -> Path:
    """Return loratune's cache directory: ``$LORATUNE_CACHE`` if set, else ``~/.cache/loratune``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "loratune"


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Return the cache directory for a GGUF file (it may not exist yet).

    The name is ``<stem>-<hash>`` where the hash covers the file's absolute path, size and modification
    time, so replacing or editing the file gives a fresh conversion instead of a stale one.

    Raises ``ModelNotFoundError`` when the file does not exist.
    """
    path = Path(gguf_path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as error:
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}; check the path") from error
    fingerprint = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    short_hash = hashlib.sha256(fingerprint).hexdigest()[:12]
    return cache_root() / "models" / f"{path.stem}-{short_hash}"


def is_cached(gguf_path: str | os.PathLike) -> bool:
    """Return True when ``gguf_path`` has already been converted into the cache."""
    return _is_complete(gguf_cache_dir(gguf_path))


def cached_hf_dir(gguf_path: str | os.PathLike) -> Path:
    """Return a Hugging Face model directory holding ``gguf_path`` dequantized, converting it on first use
    (a ``.zip`` of a model directory, as a built-in encoder ships, is extracted instead).

    The conversion is written to a temporary sibling directory and renamed into place when complete, so an
    interrupted run never leaves a half-written cache, and two runs converting at once both end up using
    one complete copy.

    Raises ``ModelNotFoundError`` when the file is missing or transformers cannot read it.
    """
    final = gguf_cache_dir(gguf_path)
    if _is_complete(final):
        _align_data(final)  # (a cache written before loratune aligned its data: once)
        return final
    logger.info("converting %s once into %s; later loads read that copy in about a second", gguf_path, final)
    with writing(final, "model cache"):
        staging = temp_dir_beside(final)
    try:
        if Path(gguf_path).suffix.lower() == ".zip":
            extract_model_zip(gguf_path, staging)
        else:
            convert_gguf_to_hf(gguf_path, staging)
        _align_data(staging)
        give_default_modes(staging)
        try:
            os.rename(staging, final)  # atomic on one filesystem: readers see nothing or everything
        except OSError:
            if not _is_complete(final):
                raise
            # Another process published the same conversion first; use theirs.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize ``gguf_path`` with transformers and save it to ``out_dir`` as a Hugging Face directory.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (tied embeddings stored
    once), the tokenizer files with the chat template, and ``loratune_source.json``. A tokenizer without a
    pad token gets its EOS token as pad.

    Raises ``ModelNotFoundError`` when the file is missing or transformers cannot convert it.
    """
    # Imported here: transformers is slow to import and only needed when converting.
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}; check the path")
    stat = path.stat()
    try:
        # dequantize=True: transformers 5 otherwise marks the model as GGUF-quantized and refuses to
        # save_pretrained it, even when (as for Llama) every weight was already unpacked to float.
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(
            f"cannot convert GGUF file {gguf_path} with transformers {transformers.__version__}: {first_line}"
        ) from error

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF metadata carries no model_max_length; use the context length so truncation has a real limit.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length >= _VERY_LARGE_INTEGER:
        tokenizer.model_max_length = max_positions
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "source": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": str(model.dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
    }
    (out / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def extract_model_zip(zip_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Extract a zip holding a Hugging Face model directory (``config.json`` at its top, or in one folder)
    into ``out_dir``. Raises ``ModelNotFoundError`` for an unreadable zip, a member that would land outside
    ``out_dir`` or a pickle weights file (safetensors only)."""
    out = Path(out_dir)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            for name in names:
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise ModelNotFoundError(f"{zip_path}: member {name!r} would land outside the model directory")
                if name.endswith((".bin", ".pt", ".pth", ".pkl")):
                    raise ModelNotFoundError(
                        f"{zip_path} holds pickle weights ({name}); loratune loads safetensors only"
                    )
            top = (
                ""
                if "config.json" in names
                else next(
                    (n[: -len("config.json")] for n in names if n.endswith("/config.json") and n.count("/") == 1), None
                )
            )
            if top is None:
                raise ModelNotFoundError(f"{zip_path} holds no config.json; it is not a zipped model directory")
            for name in names:
                if name.startswith(top):
                    target = out / name[len(top) :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(name) as source, open(target, "wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)
    except (OSError, zipfile.BadZipFile) as error:
        raise ModelNotFoundError(f"cannot extract model {zip_path}: {error}") from error


def _is_complete(directory: Path) -> bool:
    # Directories are published by an atomic rename, so one that exists is complete.
    return (directory / "config.json").is_file()


def _align_data(directory: Path) -> None:
    """Start the data of every safetensors file in ``directory`` at a 64-byte boundary (``models.aligned``), so
    that its weights are used in place at full speed."""
    for path in sorted(Path(directory).glob("*.safetensors")):
        pad_safetensors_header(path)
