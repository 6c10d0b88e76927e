"""What a verb writes and reads, declared by each verb module (``writes(args)``) so that ``main`` puts every
verb through the same guard (``loratune.outputs.guard_output``) before it loads anything."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loratune.outputs import guard_output


@dataclass(frozen=True)
class Writes:
    """One verb's output (None: it writes nothing) and its inputs, as the guard takes them.

    ``kind``: ``"directory"`` or ``"file"``; ``existing``: ``"replace"`` (a new output, or ``--overwrite`` of one
    loratune wrote) or ``"continue"`` (the verb decides: a resumed run, a sweep); ``record_kind``: for a file, what
    the record beside it calls it; ``lock``: False only where a child process takes the lock."""

    output: Path | None
    inputs: tuple[tuple[str, Path], ...] = ()
    kind: str = "directory"
    overwrite: bool = False
    existing: str = "replace"
    what: str = "--out"
    record_kind: str | None = None
    lock: bool = True
    covers: tuple[Path, ...] = field(default=())


NOTHING = Writes(None)


def inputs_of(*groups: Iterable[tuple[str, str | os.PathLike | None]]) -> tuple[tuple[str, Path], ...]:
    """The (what, path) pairs of ``groups`` that name something (a None path is left out)."""
    return tuple((what, Path(path)) for group in groups for what, path in group if path is not None)


def adapter_inputs(adapters) -> list[tuple[str, str]]:
    """``--adapter`` values (``(path, strength)`` pairs) as guard inputs."""
    return [("the adapter", path) for path, _ in adapters]


def model_inputs(name: str | None) -> list[tuple[str, Path]]:
    """The local files a model name reads (see ``models.model_sources``)."""
    if name is None:
        return []
    from loratune.models import model_sources

    return [("the base model", path) for path in model_sources(name)]


@contextlib.contextmanager
def guarded(writes: Writes) -> Iterator[None]:
    """Hold the guard of ``writes`` for the block (nothing to guard when the verb writes nothing)."""
    if writes.output is None:
        yield
        return
    with guard_output(
        writes.output,
        kind=writes.kind,
        overwrite=writes.overwrite,
        existing=writes.existing,
        inputs=writes.inputs,
        what=writes.what,
        lock=writes.lock,
        covers=writes.covers,
        record_kind=writes.record_kind,
    ):
        yield
