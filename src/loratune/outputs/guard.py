"""The one guard every writing command goes through (``guard_output``), before anything is loaded:

1. the output and every input resolved (symbolic links, ``..``, relative paths); an output that is, contains or
   lies inside an input refused;
2. places loratune never writes refused (the current directory and its parents, home, a filesystem root, a
   symbolic link, a file where a directory goes and the reverse);
3. the output's parents created and its lock taken (``outputs.lock``): one process per output, and none inside
   or around an output another process is writing; creating the lock file proves the place writable;
4. what is there already: a new output needs an empty place, ``--overwrite`` replaces only what loratune's
   record lists as written by it (``outputs.manifest``), a continued output (a resumed run, a sweep) is the
   caller's to check.

Where the size to be written is known, ``check_free_space`` says so before the work (a merge, say).

Guards nest: inside an output this process already guards, a nested guard checks the place again but takes no
second lock (a run writing its ``adapter/``, a sweep running its runs, a command's guard around the library
function that writes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loratune.errors import ConfigError, FileAccessError
from loratune.files import describe_read_error, is_temp_name
from loratune.outputs import lock as locks
from loratune.outputs.manifest import Manifest, open_record, sidecar_for, unchanged
from loratune.outputs.paths import (
    check_file_location,
    check_location,
    nearest_existing,
    refuse_aliasing,
    resolved,
)

DIRECTORY, FILE = "directory", "file"
REPLACE, CONTINUE = "replace", "continue"


@dataclass
class _Guarded:
    lock: locks.HeldLock | None
    covers: list[Path] = field(default_factory=list)


_guarded: dict[Path, _Guarded] = {}
_registry = threading.RLock()


def _guarded_here(path: Path) -> bool:
    """Whether this process guards ``path`` already: itself, a directory above it, or a place a guard covers."""
    for root, guarded in _guarded.items():
        for place in (root, *guarded.covers):
            if path == place or place in path.parents:
                return True
    return False


@contextlib.contextmanager
def guard_output(
    path: str | os.PathLike,
    *,
    kind: str = DIRECTORY,
    overwrite: bool = False,
    existing: str = REPLACE,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
    what: str | None = None,
    lock: bool = True,
    covers: Iterable[str | os.PathLike] = (),
    record_kind: str | None = None,
) -> Iterator[Path]:
    """Guard output ``path`` (a ``"directory"`` or a ``"file"``) for the block; yields it.

    ``existing``: ``"replace"`` — an existing non-empty output needs ``overwrite`` and must be loratune's, unchanged
    (``check_only_ours``); ``"continue"`` — the caller decides what to do with what is there. ``inputs``: (what,
    path) pairs the command reads. ``lock=False``: check everything but take no lock (a launcher whose worker takes
    it). ``covers``: other
    places this lock stands for (a run's replacement, built beside it). ``record_kind``: for a single-file output,
    keep its record beside it (the file written in the block is recorded as loratune's).

    Raises ``ConfigError`` for an output that may not be written there, ``OutputInUse`` naming the process that
    writes it (or a directory around or inside it), ``FileAccessError`` when the place is not writable.
    """
    target = Path(path)
    what = what or f"output {kind}"
    (check_location if kind == DIRECTORY else check_file_location)(target, what)
    refuse_aliasing(target, list(inputs), what)
    key = resolved(target)
    with _registry:
        nested = _guarded_here(key)
    if nested:  # the enclosing guard holds the lock for as long as this block runs
        _check_existing(target, kind, existing, overwrite, what)
        with _single_file_record(key, kind, record_kind):
            yield target
        return
    made = _make_parents(target, what)
    held = None
    try:
        held = _lock(key, what) if lock else _probe_writable(key, what)
        _refuse_writers_around(key, what)
        _check_existing(target, kind, existing, overwrite, what)
        if kind == DIRECTORY and key.is_dir():
            _refuse_writers_inside(key, what)
        with _registry:
            _guarded[key] = _Guarded(held, [resolved(c) for c in covers])
        try:
            with _single_file_record(key, kind, record_kind):
                yield target
        finally:
            with _registry:
                _guarded.pop(key, None)
    except BaseException:
        if held is not None:  # (its file sits in the first directory made)
            held.release()
            held = None
        _remove_empty(made)
        raise
    finally:
        if held is not None:
            held.release()


@contextlib.contextmanager
def _single_file_record(key: Path, kind: str, record_kind: str | None):
    if kind == FILE and record_kind is not None:
        with open_record(key, record_kind, single_file=True):
            yield
    else:
        yield


def _make_parents(target: Path, what: str) -> list[Path]:
    """Create the missing parents of ``target`` (the lock file goes beside it); return those made, deepest first."""
    made = []
    parent = resolved(target).parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    try:
        for directory in reversed(made):
            directory.mkdir()
    except OSError as error:
        _remove_empty(made)
        raise FileAccessError(f"cannot write {what} {target}: {describe_read_error(error)}") from None
    return made


def _remove_empty(made: list[Path]) -> None:
    for directory in made:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            break


def _lock(key: Path, what: str) -> locks.HeldLock | None:
    try:
        return locks.acquire(key, locks.command_name(), what)
    except OSError as error:  # the lock file cannot be made: the place takes no new files
        raise FileAccessError(f"cannot write {what} {key}: {describe_read_error(error)}") from None


def _probe_writable(key: Path, what: str) -> None:
    """Check that the output's parent takes new files, without locking (a probe file, removed at once)."""
    probe = key.parent / f".{key.name}.loratune-tmp-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise FileAccessError(f"cannot write {what} {key}: {describe_read_error(error)}") from None


def being_written(path: str | os.PathLike) -> str | None:
    """Which other process is writing ``path``, a directory around it or anything inside it (what a reader says
    instead of reading a half-replaced output), or None."""
    key = resolved(path)
    for place in (key, *key.parents):
        if _guarded_here(place):
            return None
        holder = locks.holder(place)
        if holder is not None:
            return f"{holder} is writing {place}"
    if key.is_dir():
        for directory, _, names in os.walk(key):
            for name in names:
                if locks.is_lock_name(name):
                    inner = Path(directory) / name[1:].removesuffix(locks.LOCK_SUFFIX)
                    holder = locks.holder(inner)
                    if holder is not None:
                        return f"{holder} is writing {inner}"
    return None


def _refuse_writers_around(key: Path, what: str) -> None:
    for parent in key.parents:
        if _guarded_here(parent):
            return
        holder = locks.holder(parent)
        if holder is not None:
            raise locks.OutputInUse(
                f"{what} {key} lies inside {parent}, which {holder} is writing; wait for it to "
                "finish, or write elsewhere"
            )


def _refuse_writers_inside(key: Path, what: str) -> None:
    for directory, _subdirs, names in os.walk(key):
        for name in names:
            if locks.is_lock_name(name):
                inner = Path(directory) / name[1:].removesuffix(locks.LOCK_SUFFIX)
                holder = locks.holder(inner)
                if holder is not None:
                    raise locks.OutputInUse(
                        f"{what} {key} contains {inner}, which {holder} is writing; wait for it "
                        "to finish, or write elsewhere"
                    )


def check_free_space(target: str | os.PathLike, expected_bytes: int | None, what: str = "output") -> None:
    """Raise ``FileAccessError`` when the filesystem of ``target`` has less room than ``expected_bytes`` (with a
    5% margin): better said before an hour of work than as a full disk after it."""
    target = Path(target)
    if not expected_bytes:
        return
    free = shutil.disk_usage(nearest_existing(target)).free
    if free < expected_bytes * 1.05:
        raise FileAccessError(
            f"not enough space for {what} {target}: about {_size(expected_bytes)} to write, "
            f"{_size(free)} free there; free some space or write elsewhere"
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- what is there already ---------------------------------------------------------------------------------------


def _check_existing(target: Path, kind: str, existing: str, overwrite: bool, what: str) -> None:
    if existing != REPLACE:
        return
    if kind == DIRECTORY:
        check_output_dir(target, overwrite=overwrite, what=what)
    else:
        check_output_file(target, overwrite=overwrite, what=what)


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with something in it (loratune's temporary leftovers do not count)."""
    target = Path(path)
    return target.is_dir() and any(
        not is_temp_name(p.name) and not locks.is_lock_name(p.name) for p in target.iterdir()
    )


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:3]) + (f" (+{len(entries) - 3} more)" if len(entries) > 3 else "")


def check_only_ours(path: str | os.PathLike, action: str = "--overwrite replaces") -> None:
    """Refuse (``ConfigError``) to replace a directory holding anything loratune's record does not list as written
    by it, unchanged: files a user put there, files a user edited, an output of an earlier loratune that recorded
    only names, a directory with no record at all."""
    target = Path(path)
    manifest = Manifest.read(target)
    if manifest is None:
        raise ConfigError(
            f"{action} only what loratune wrote, and {target} holds no record of loratune's "
            f"({_shown(sorted(p.name for p in target.iterdir()))}); choose another path or move those "
            "files yourself"
        )
    if manifest.legacy:
        raise ConfigError(
            f"{action} only files loratune recorded, and {target} was written by an earlier loratune "
            "that recorded only names; remove it yourself or choose another path"
        )
    foreign = manifest.foreign(target)
    if foreign:
        raise ConfigError(
            f"{action} only what loratune wrote, but {target} also holds {_shown(foreign)}; "
            "choose another path or move those files yourself"
        )


def check_output_dir(path: str | os.PathLike, *, overwrite: bool, what: str = "output directory") -> bool:
    """Check that an output directory may be written at ``path``; return True when an existing output there will
    be replaced. Raises ``ConfigError`` for a path ``check_location`` refuses, a non-empty directory without
    ``overwrite``, and with ``overwrite`` a directory ``check_only_ours`` refuses."""
    check_location(path, what)
    if not is_nonempty_dir(path):
        return False
    if not overwrite:
        raise ConfigError(f"{what} {path} already exists and is not empty; pass --overwrite to replace it")
    check_only_ours(path)
    return True


def written_by_loratune(path: str | os.PathLike) -> bool:
    """Whether the single file at ``path`` is one loratune wrote and nobody changed since (its record beside it)."""
    target = Path(path)
    manifest = Manifest.read_file(sidecar_for(target))
    record = manifest.files.get(target.name) if manifest is not None and not manifest.legacy else None
    return record is not None and unchanged(record, target)


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    what: str = "output file",
    ours: Callable[[Path], bool] = written_by_loratune,
) -> None:
    """Check that a single output file may be written at ``path``: refused (``ConfigError``) when it is a
    directory or a link, when it exists without ``overwrite``, and when loratune did not write it (or it changed
    since)."""
    target = Path(path)
    check_file_location(target, what)
    if not target.exists():
        return
    if not overwrite:
        raise ConfigError(f"{what} {target} exists; pass --overwrite to replace it")
    if not target.is_file() or not ours(target):
        raise ConfigError(
            f"--overwrite replaces only files loratune wrote (and nobody changed since), and {target} "
            "is not one; choose another path or move it yourself"
        )
