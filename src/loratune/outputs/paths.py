"""Where an output may go: paths resolved (symbolic links, ``..``, relative paths), an output that is, contains or
lies inside one of the command's inputs refused, and the places loratune never writes into."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from loratune.errors import ConfigError


def resolved(path: str | os.PathLike) -> Path:
    """``path`` absolute, with ``..`` and every symbolic link resolved (also for a path that does not exist yet)."""
    return Path(os.path.abspath(os.fspath(path))).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def relation(output: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How ``output`` overlaps ``source``: ``"is"``, ``"contains"``, ``"lies inside"``, or None when they are apart."""
    out, src = resolved(output), resolved(source)
    if out == src or _same_file(out, src):
        return "is"
    if out in src.parents:
        return "contains"
    if src in out.parents:
        return "lies inside"
    return None


def refuse_aliasing(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]], what: str = "the output"
) -> None:
    """Raise ``ConfigError`` when ``output`` is, contains or lies inside one of ``inputs`` (pairs of (what the input
    is, its path)): writing there would destroy what the command reads."""
    for label, source in inputs:
        overlap = relation(output, source)
        if overlap is None:
            continue
        plain = overlap if overlap != "is" else ("is the same file as" if Path(source).is_file() else "is")
        raise ConfigError(
            f"{what} {output} {plain} {label} {source}; writing it would destroy what this command "
            "reads — choose an output path outside every input"
        )


def protected_reason(path: Path) -> str | None:
    """Why a directory at ``path`` must never be replaced (None when it may be)."""
    target = resolved(path)
    cwd = Path.cwd().resolve()
    if target == cwd:
        return "is the current directory"
    if target in cwd.parents:
        return "contains the current directory"
    if target == Path.home().resolve():
        return "is your home directory"
    if target == Path(target.anchor) or os.path.ismount(target):
        return "is a filesystem root"
    return None


def check_location(path: str | os.PathLike, what: str = "output directory") -> None:
    """Refuse (``ConfigError``) an output directory path that loratune must never replace: the current
    directory, a parent of it, the home directory, a filesystem root, a symbolic link, or a file."""
    target = Path(path)
    if target.is_symlink():
        raise ConfigError(f"{what} {target} is a symbolic link; give the directory it points to, or a new path")
    if not target.exists():
        return
    reason = protected_reason(target)
    if reason:
        raise ConfigError(f"{what} {target} {reason}; loratune never writes into it — name a new directory")
    if not target.is_dir():
        raise ConfigError(f"{what} {target} is a file, not a directory; give a directory path")


def check_file_location(path: str | os.PathLike, what: str = "output file") -> None:
    """Refuse (``ConfigError``) a file output path that is a symbolic link or a directory."""
    target = Path(path)
    if target.is_symlink():
        raise ConfigError(f"{what} {target} is a symbolic link; give a plain file path")
    if target.is_dir():
        raise ConfigError(f"{what} {target} is a directory; give a file path, e.g. {target / ('out' + target.suffix)}")


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    probe = resolved(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe
