"""Writing outputs: every file and directory is built under a temporary name beside its target, recorded
(``outputs.manifest``) and renamed into place, so a failure or a crash leaves the old one whole and the record
never misses a file."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from loratune.files import (
    give_default_mode,
    give_default_modes,
    swap_into_place,
    temp_dir_beside,
    temp_file_beside,
    writing,
)
from loratune.outputs.guard import guard_output
from loratune.outputs.manifest import Manifest, record_published, record_removed


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)`` for a temporary file beside ``path``, then rename it onto ``path``.

    A failure (or crash) leaves ``path`` as it was. Returns ``path``.
    """
    target = Path(path)
    with writing(target, "file"):
        temp = temp_file_beside(target)
        try:
            write(temp)
            give_default_mode(temp)
            record_published(target, temp)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename; return ``path``."""
    return write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def publish_dir(staging: Path, target: Path) -> None:
    """Put the complete directory ``staging`` at ``target`` (replacing what is there), recorded as loratune's."""
    give_default_modes(staging)
    record_published(target, staging)
    swap_into_place(staging, target)


def remove_written(path: str | os.PathLike) -> None:
    """Remove a file or directory loratune wrote, and its record."""
    target = Path(path)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)
    record_removed(target)


def write_output_dir(
    path: str | os.PathLike, kind: str, fill: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Build an output directory: ``fill(staging)`` writes everything into a new directory beside ``path``, which
    gets a record of every file ``fill`` wrote (``Manifest``) and is swapped into place.

    The place is checked and locked first (``guard_output``: a non-empty ``path`` is replaced only with
    ``overwrite``, and only when all of it is loratune's). A failure removes the staging directory and leaves
    ``path`` untouched. Returns ``path``.
    """
    target = Path(path)
    with guard_output(target, overwrite=overwrite), writing(target, "output directory"):
        staging = temp_dir_beside(target)
        try:
            fill(staging)
            give_default_modes(staging)
            record = Manifest(kind)
            record.add_all(staging)
            record.write(staging)
            publish_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target
