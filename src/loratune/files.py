"""Low-level file helpers: default permissions, loratune's temporary names, atomic directory swaps, and one-line
errors for files that cannot be read or written.

- Everything loratune writes gets the permissions a plain ``open()`` / ``mkdir()`` would give under the user's
  umask (``tempfile`` creates owner-only files, which would make adapters and models unshareable).
- Temporary files and directories carry ``TEMP_MARK`` in their names, so what a crash leaves behind is
  recognisably loratune's.
- Reading a damaged file (a truncated safetensors file, say) is a one-line ``LoratuneError`` naming it.

What may be written where, and the record of what was written, live in ``loratune.outputs``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from loratune.errors import FileAccessError, LoratuneError

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
    for directory, _subdirs, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


# --- temporary names and swaps ---------------------------------------------------------------------


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


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is one of loratune's temporary names (what a crash may leave)."""
    return name.startswith(".") and TEMP_MARK in name


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

    Raises ``error`` (default ``FileAccessError``) naming the file when it is missing, unreadable, truncated or not
    safetensors.
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
