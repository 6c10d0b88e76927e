"""One process at a time per output: an exclusive OS lock (``flock``) on a small file beside the output,
``.NAME.loratune-lock``, holding who took it (pid, command, since when).

The lock dies with its process, so a crash never leaves a stale lock (the file may stay; it is harmless and
reused). Taking it never waits: a second process learns at once who holds it. The file is removed on release;
a process that opened it just before is told so by its inode and takes a fresh one, so two processes can never
both believe they hold it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from loratune.errors import LoratuneError
from loratune.files import current_umask

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking (loratune's supported systems all have flock)
    fcntl = None

LOCK_SUFFIX = ".loratune-lock"


class OutputInUse(LoratuneError):
    """Another process is writing the output (or a directory around it); the message names it."""


def lock_file_for(target: Path) -> Path:
    """The lock file of output ``target``: beside it, so it exists before the output does."""
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def is_lock_name(name: str) -> bool:
    """Whether a directory entry is a loratune lock file."""
    return name.startswith(".") and name.endswith(LOCK_SUFFIX)


@dataclass
class HeldLock:
    """An exclusive lock this process holds on ``target`` (released by ``release``)."""

    target: Path
    file: Path
    fd: int

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one can take the old inode after), then unlock."""
        try:
            if os.stat(self.file).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.file)
        except OSError:
            pass
        os.close(self.fd)


def _describe_holder(fd: int) -> str:
    """Who holds a lock, from what its holder wrote into the file (it may not have written yet: wait briefly)."""
    for _ in range(50):
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "null")
        except (OSError, ValueError, UnicodeDecodeError):
            holder = None
        if isinstance(holder, dict) and "pid" in holder:
            host = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
            return f"{holder.get('command', 'loratune')} (pid {holder['pid']}{host}, since {holder.get('since', '?')})"
        time.sleep(0.01)
    return "another loratune process"


def _holder_record(command: str) -> bytes:
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    record = {"pid": os.getpid(), "command": command, "since": since, "host": socket.gethostname()}
    return json.dumps(record).encode("utf-8")


def acquire(target: Path, command: str, what: str = "output") -> HeldLock | None:
    """Take the exclusive lock of ``target`` for ``command`` (e.g. ``loratune train``); None where the system has
    no flock. Raises ``OutputInUse`` naming the holder when another process has it, ``OSError`` when the lock
    file cannot be created (a read-only or missing parent: the caller reports it as a write failure)."""
    if fcntl is None:
        return None
    file = lock_file_for(target)
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise OutputInUse(
                f"{what} {target} is in use by {holder}; wait for it to finish, or write elsewhere"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed it between our open and our lock: take the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record(command), 0)
        return HeldLock(target, file, fd)


def holder(target: Path) -> str | None:
    """Who holds ``target``'s lock, when another process does (None when no one does, or it is this process's)."""
    if fcntl is None:
        return None
    file = lock_file_for(target)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def command_name() -> str:
    """``loratune VERB`` for the running command line, else the program's name (for a lock's holder record)."""
    argv = sys.argv or ["python"]
    program = Path(argv[0]).name
    if program in ("loratune", "__main__.py") or argv[0] == "-m":
        verb = next((a for a in argv[1:] if not a.startswith("-")), "")
        return f"loratune {verb}".strip()
    return program
