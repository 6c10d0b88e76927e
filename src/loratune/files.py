"""Files loratune writes and reads.

- Everything is written under a temporary name beside its target and renamed into place, with the
  permissions a plain ``open()`` / ``mkdir()`` would give under the user's umask (``tempfile`` creates
  owner-only files, which would make adapters and models unshareable).
- An output directory (a run, a merged model, a mixed adapter) carries a small manifest,
  ``.loratune-output.json``, naming what loratune put there. ``--overwrite`` replaces a directory only
  when every entry in it is loratune's, never the current directory, one of its parents, the home
  directory or a filesystem root; the new output is built beside the old one and swapped in, so a crash
  leaves the old output whole.
- Reading a damaged file (a truncated safetensors file, say) is a one-line ``LoratuneError`` naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from loratune.errors import ConfigError, FileAccessError, LoratuneError

MANIFEST_NAME = ".loratune-output.json"
TEMP_MARK = ".loratune-tmp-"  # in every temporary name: what a crash leaves behind is recognisably ours


# --- permissions ------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read from /proc on Linux, so no thread ever sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: Path) -> None:
    """chmod ``path`` to what ``open()`` (files) or ``mkdir()`` (directories) would have created."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def give_default_modes(root: Path) -> None:
    """``give_default_mode`` for ``root`` and everything below it. Libraries that write through a temporary
    file (safetensors does) leave owner-only files behind; this is applied before anything is published."""
    mask = current_umask()
    for directory, subdirs, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


# --- temporary names and atomic writes ---------------------------------------------------------------------


def temp_dir_beside(target: Path) -> Path:
    """A new empty directory next to ``target`` (same filesystem, so it can be renamed onto it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent))
    give_default_mode(staging)
    return staging


def temp_file_beside(target: Path) -> Path:
    """A new empty file next to ``target``, with default permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent)
    os.close(handle)
    temp = Path(name)
    give_default_mode(temp)
    return temp


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
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename; return ``path``."""
    return write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))


# --- output directories ------------------------------------------------------------------------------------


def _protected_reason(path: Path) -> str | None:
    """Why a directory at ``path`` must never be replaced (None when it may be)."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "is the current directory"
    if resolved in cwd.parents:
        return "contains the current directory"
    if resolved == Path.home().resolve():
        return "is your home directory"
    if resolved == Path(resolved.anchor) or os.path.ismount(resolved):
        return "is a filesystem root"
    return None


def read_manifest(directory: Path) -> dict | None:
    """The manifest of an output directory, or None when it has none (or an unreadable one)."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "loratune" or not isinstance(data.get("entries"), list):
        return None
    return data


def write_manifest(directory: Path, kind: str, entries: Iterable[str]) -> None:
    """Record that loratune wrote ``entries`` (names directly inside ``directory``) as a ``kind`` output."""
    from loratune.version import __version__

    record = {"written_by": "loratune", "version": __version__, "kind": kind, "entries": sorted(set(entries))}
    write_text_atomic(directory / MANIFEST_NAME, json.dumps(record, indent=1) + "\n")


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is one of loratune's temporary names (what a crash may leave)."""
    return name.startswith(".") and TEMP_MARK in name


def foreign_entries(directory: Path) -> list[str]:
    """The entries of ``directory`` that loratune did not write there, by its manifest (all of them when
    it has none)."""
    manifest = read_manifest(directory)
    ours = set(manifest["entries"]) if manifest else set()
    ours.add(MANIFEST_NAME)
    return sorted(p.name for p in directory.iterdir() if p.name not in ours and not is_temp_name(p.name))


def check_location(path: str | os.PathLike, what: str = "output directory") -> None:
    """Refuse (``ConfigError``) an output directory path that loratune must never replace: the current
    directory, a parent of it, the home directory, a filesystem root, a symbolic link, or a file."""
    target = Path(path)
    if target.is_symlink():
        raise ConfigError(f"{what} {target} is a symbolic link; give the directory it points to, or a new path")
    if not target.exists():
        return
    reason = _protected_reason(target)
    if reason:
        raise ConfigError(f"{what} {target} {reason}; loratune never writes into it — name a new directory")
    if not target.is_dir():
        raise ConfigError(f"{what} {target} is a file, not a directory; give a directory path")


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    target = Path(path)
    return target.is_dir() and any(target.iterdir())


def check_only_ours(path: str | os.PathLike, adopt: Callable[[Path], bool] | None = None) -> None:
    """Refuse (``ConfigError``) to replace a directory holding anything loratune did not write there.

    ``adopt`` may recognise an output written before manifests existed (it returns True: all loratune's).
    """
    target = Path(path)
    foreign = foreign_entries(target)
    if foreign and not (read_manifest(target) is None and adopt is not None and adopt(target)):
        shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
        raise ConfigError(
            f"--overwrite replaces only what loratune wrote, but {target} also holds {shown}; "
            "choose another path or move those files yourself"
        )


def check_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    what: str = "output directory",
    adopt: Callable[[Path], bool] | None = None,
) -> bool:
    """Check that an output directory may be written at ``path``; return True when an existing output there
    will be replaced.

    Raises ``ConfigError`` (one line) for a path ``check_location`` refuses, a non-empty directory without
    ``overwrite``, and with ``overwrite`` a directory ``check_only_ours`` refuses.
    """
    check_location(path, what)
    if not is_nonempty_dir(path):
        return False
    if not overwrite:
        raise ConfigError(f"{what} {path} already exists and is not empty; pass --overwrite to replace it")
    check_only_ours(path, adopt)
    return True


def check_output_file(
    path: str | os.PathLike, *, overwrite: bool, ours: Callable[[Path], bool], what: str = "output file"
) -> None:
    """Check that a single output file may be written at ``path``: refused (``ConfigError``) when it is a
    directory or a link, when it exists without ``overwrite``, and when ``ours(path)`` says loratune did not
    write it."""
    target = Path(path)
    if target.is_symlink():
        raise ConfigError(f"{what} {target} is a symbolic link; give a plain file path")
    if target.is_dir():
        raise ConfigError(f"{what} {target} is a directory; give a file path, e.g. {target / 'adapter.gguf'}")
    if not target.exists():
        return
    if not overwrite:
        raise ConfigError(f"{what} {target} exists; pass --overwrite to replace it")
    if not target.is_file() or not ours(target):
        raise ConfigError(f"--overwrite replaces only files loratune wrote, and {target} is not one; "
                          "choose another path or move it yourself")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), str(b))


def swap_into_place(staging: Path, target: Path) -> None:
    """Put the complete directory ``staging`` at ``target``, removing what was there.

    The old ``target`` stays whole until the new one is in place (an atomic exchange where the system has
    one; elsewhere it is first renamed aside, so at worst a crash leaves it under a hidden name beside).
    """
    if not target.exists():
        os.rename(staging, target)
        return
    if not _exchange(staging, target):
        aside = temp_dir_beside(target)
        os.rmdir(aside)
        os.rename(target, aside)
        os.rename(staging, target)
        staging = aside
    shutil.rmtree(staging, ignore_errors=True)


def write_output_dir(path: str | os.PathLike, kind: str, fill: Callable[[Path], None]) -> Path:
    """Build an output directory: ``fill(staging)`` writes everything into a new directory beside ``path``,
    which gets a manifest of what ``fill`` wrote and is swapped into place.

    The caller checks ``path`` first (``check_output_dir``). A failure removes the staging directory and
    leaves ``path`` untouched. Returns ``path``.
    """
    target = Path(path)
    with writing(target, "output directory"):
        staging = temp_dir_beside(target)
        try:
            fill(staging)
            give_default_modes(staging)
            write_manifest(staging, kind, [p.name for p in staging.iterdir()])
            swap_into_place(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


# --- reading -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file", error: type[LoratuneError] = FileAccessError):
    """Inside the block, a failure to read ``path`` (an OS error, damaged safetensors, bad encoding) becomes
    ``error`` (default ``FileAccessError``) with a one-line message naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, UnicodeDecodeError) as failure:
        raise error(f"{what} {path} cannot be read: {describe_read_error(failure)}") from None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "output"):
    """Inside the block, a failure to write (disk full, permission denied, a path through a file) becomes a
    ``FileAccessError`` naming ``path``; loratune's own errors pass unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as failure:
        raise FileAccessError(f"cannot write {what} {path}: {describe_read_error(failure)}") from None


def read_safetensors(
    path: str | os.PathLike, *, what: str = "file", error: type[LoratuneError] = FileAccessError
) -> dict:
    """All tensors of the safetensors file at ``path`` (on the CPU).

    Raises ``error`` (default ``FileAccessError``) naming the file when it is missing, unreadable, truncated or not safetensors.
    """
    from safetensors import safe_open

    with reading(path, what, error), safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def describe_read_error(error: BaseException) -> str:
    """A short, one-line reason for a failed read (OS error text, or the library's first line)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if type(error).__name__ == "SafetensorError":
        io_error = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
        return io_error.group(1) if io_error else f"truncated or not a safetensors file ({text})"
    return text
