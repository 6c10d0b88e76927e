"""The record of what loratune wrote: every output directory holds ``.loratune-output.json`` listing each file
it wrote there (path, size, and a SHA-256 where cheap), the directories it made, and the outputs nested in it
(an adapter inside a run, a run inside a sweep: each with its own record). A single-file output (a GGUF file,
predictions) gets the same record in a hidden file beside it, ``.NAME.loratune-output.json``.

``--overwrite`` replaces only what this record lists, unchanged since it was written (``Manifest.foreign``).
While a command writes, its open records (``open_record``) follow every file published under them:
``record_published`` is called by the writers just before a file or directory takes its final name, so a crash
leaves at worst a record of something missing, never a file that is not recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loratune.files import give_default_mode, is_temp_name, temp_file_beside
from loratune.outputs.lock import is_lock_name
from loratune.outputs.paths import resolved

MANIFEST_NAME = ".loratune-output.json"
FORMAT = 2
HASH_LIMIT = 64 * 2**20  # files up to this size are recorded with their SHA-256 (larger ones by size)


def sidecar_for(path: Path) -> Path:
    """Where the record of a single-file output lives: a hidden file beside it."""
    return path.parent / f".{path.name}{MANIFEST_NAME}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, appended: bool = False) -> dict:
    """What the record keeps of one file: its size, its SHA-256 when small enough, or that it grows (a log)."""
    size = os.stat(path).st_size
    if appended:
        return {"size": size, "appended": True}
    return {"size": size, **({"sha256": _sha256(path)} if size <= HASH_LIMIT else {})}


def unchanged(record: dict, path: Path) -> bool:
    """Whether the file at ``path`` is still what ``record`` says loratune wrote (a log may only have grown)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return False
    if record.get("appended"):
        return size >= record.get("size", 0)
    if size != record.get("size"):
        return False
    return "sha256" not in record or _sha256(path) == record["sha256"]


def ours_by_name(name: str) -> bool:
    """Entries that are loratune's by their name alone: temporary names a crash may leave, and lock files."""
    return is_temp_name(name) or is_lock_name(name)


@dataclass
class Manifest:
    """What loratune wrote in one output directory (``kind``: run, adapter, model, sweep, ...).

    ``files``: path relative to the directory → ``file_record``; ``directories``: directories it made (also
    empty ones); ``outputs``: subdirectories that are outputs of their own, with their own manifest. ``legacy``:
    read from an earlier loratune that recorded only names, which proves nothing about the files.
    """

    kind: str
    files: dict[str, dict] = field(default_factory=dict)
    directories: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)
    legacy: bool = False

    # --- reading and writing ---------------------------------------------------------------------------------

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest of output directory ``directory``, or None when it has none (or one loratune cannot read)."""
        return cls.read_file(Path(directory) / MANIFEST_NAME)

    @classmethod
    def read_file(cls, path: Path) -> Manifest | None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("written_by") != "loratune":
            return None
        kind = str(data.get("kind", "output"))
        if data.get("format") != FORMAT:
            return cls(kind, legacy=True) if isinstance(data.get("entries"), list) else None
        files = data.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            return None
        return cls(kind, dict(files), set(data.get("directories") or ()), set(data.get("outputs") or ()))

    def to_json(self) -> str:
        from loratune.version import __version__

        return (
            json.dumps(
                {
                    "written_by": "loratune",
                    "format": FORMAT,
                    "version": __version__,
                    "kind": self.kind,
                    "files": dict(sorted(self.files.items())),
                    "directories": sorted(self.directories),
                    "outputs": sorted(self.outputs),
                },
                indent=1,
            )
            + "\n"
        )

    def write(self, directory: Path) -> None:
        """Write this manifest into ``directory`` (atomically)."""
        self.write_file(Path(directory) / MANIFEST_NAME)

    def write_file(self, path: Path) -> None:
        temp = temp_file_beside(path)
        try:
            temp.write_text(self.to_json(), encoding="utf-8")
            give_default_mode(temp)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    # --- recording -------------------------------------------------------------------------------------------

    def add(self, relative: str, source: Path, appended: bool = False) -> None:
        """Record ``source`` (a file, or a directory and everything in it) as written at ``relative``."""
        self.remove(relative)
        source = Path(source)
        if not source.is_dir():
            self.files[relative] = file_record(source, appended)
            return
        if (source / MANIFEST_NAME).is_file():
            self.outputs.add(relative)
            return
        self.directories.add(relative)
        for directory, subdirs, names in os.walk(source):
            inside = Path(directory).relative_to(source)
            for name in names:
                path = Path(directory) / name
                if not path.is_symlink():
                    self.files[(Path(relative) / inside / name).as_posix()] = file_record(path, appended)
            for name in list(subdirs):
                path = Path(directory) / name
                rel = (Path(relative) / inside / name).as_posix()
                if (path / MANIFEST_NAME).is_file():
                    self.outputs.add(rel)
                    subdirs.remove(name)  # its own manifest speaks for it
                elif not path.is_symlink():
                    self.directories.add(rel)

    def add_all(self, directory: Path) -> None:
        """Record everything in ``directory`` (this manifest's own directory) as written."""
        for entry in Path(directory).iterdir():
            if entry.name != MANIFEST_NAME and not ours_by_name(entry.name):
                self.add(entry.name, entry)

    def remove(self, relative: str) -> None:
        """Forget ``relative`` and everything below it."""
        prefix = relative.rstrip("/") + "/"
        self.files = {k: v for k, v in self.files.items() if k != relative and not k.startswith(prefix)}
        self.directories = {d for d in self.directories if d != relative and not d.startswith(prefix)}
        self.outputs = {d for d in self.outputs if d != relative and not d.startswith(prefix)}

    # --- checking --------------------------------------------------------------------------------------------

    def foreign(self, directory: Path) -> list[str]:
        """What ``directory`` holds that this manifest does not list as written by loratune, or that changed since
        (relative paths; directories end in ``/``). Nested outputs are checked against their own manifests."""
        found: list[str] = []
        parents = {
            p.as_posix()
            for rel in (*self.files, *self.outputs, *self.directories)
            for p in Path(rel).parents
            if p.as_posix() != "."
        }
        known_dirs = self.directories | parents

        def visit(path: Path, prefix: str) -> None:
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                rel = prefix + entry.name
                if ours_by_name(entry.name) or rel == MANIFEST_NAME:
                    continue
                if entry.is_symlink():
                    found.append(rel)
                elif entry.is_dir():
                    if rel in self.outputs:
                        nested = Manifest.read(Path(entry.path))
                        found.extend(
                            [rel + "/"]
                            if nested is None or nested.legacy
                            else [f"{rel}/{inner}" for inner in nested.foreign(Path(entry.path))]
                        )
                    elif rel in known_dirs:
                        visit(Path(entry.path), rel + "/")
                    elif not _begun_output(Path(entry.path)) and not _only_leftovers(Path(entry.path)):
                        found.append(rel + "/")
                elif rel not in self.files:
                    found.append(rel)
                elif not unchanged(self.files[rel], Path(entry.path)):
                    found.append(f"{rel} (changed since loratune wrote it)")

        if not self.legacy:
            visit(Path(directory), "")
        else:
            found = [
                e.name + ("/" if e.is_dir() else "")
                for e in sorted(Path(directory).iterdir())
                if e.name != MANIFEST_NAME and not ours_by_name(e.name)
            ]
        return found


def _only_leftovers(path: Path) -> bool:
    """Whether directory ``path`` holds loratune's temporary or lock entries and nothing else: made for something
    loratune was writing (a checkpoint's staging inside ``checkpoints/``) when it was killed, before the result was
    recorded. Nothing in it can be lost; an empty directory is not taken as loratune's."""
    names = os.listdir(path)
    return bool(names) and all(ours_by_name(name) for name in names)


def _begun_output(path: Path) -> bool:
    """Whether ``path`` is an output loratune began and was stopped (killed) before it wrote anything into it or
    recorded it above: nothing in it but its own valid record (and loratune's lock files)."""
    names = [name for name in os.listdir(path) if not ours_by_name(name)]
    if names != [MANIFEST_NAME]:
        return False
    manifest = Manifest.read(path)
    return manifest is not None and not manifest.legacy and not (manifest.files or manifest.outputs)


# --- the records open while a command writes --------------------------------------------------------------------


@dataclass
class _OpenRecord:
    root: Path  # resolved: an output directory, or a single output file
    manifest: Manifest
    single_file: bool
    users: int = 1

    def save(self) -> None:
        if self.single_file:
            self.manifest.write_file(sidecar_for(self.root))
        else:
            self.manifest.write(self.root)


_open: dict[Path, _OpenRecord] = {}
_guard = threading.RLock()


@contextlib.contextmanager
def open_record(root: Path, kind: str, *, single_file: bool = False, fresh: bool = False) -> Iterator[Manifest]:
    """Keep the record of output ``root`` current while the block writes into it: every file or directory published
    under it (``record_published``) is added, every one removed (``record_removed``) forgotten. The record starts
    from ``root``'s existing manifest unless ``fresh`` (or none is there); nested opens share it."""
    key = resolved(root)
    with _guard:
        current = _open.get(key)
        if current is not None:
            current.users += 1
        else:
            existing = None if fresh else (Manifest.read_file(sidecar_for(key)) if single_file else Manifest.read(key))
            manifest = existing if existing is not None and not existing.legacy else Manifest(kind)
            if single_file:
                manifest.files = {k: v for k, v in manifest.files.items() if k == key.name}
            current = _open[key] = _OpenRecord(key, manifest, single_file)
            if not single_file:
                key.mkdir(parents=True, exist_ok=True)
                current.save()
    try:
        yield current.manifest
    finally:
        with _guard:
            current.users -= 1
            if current.users == 0:
                del _open[key]


def _records_over(final: Path) -> list[tuple[_OpenRecord, str]]:
    found = []
    for root, record in _open.items():
        if record.single_file:
            if final == root:
                found.append((record, root.name))
        elif root in final.parents:
            found.append((record, final.relative_to(root).as_posix()))
    return found


def record_published(final: str | os.PathLike, source: str | os.PathLike | None = None, appended: bool = False) -> None:
    """Record in every open record over ``final`` that loratune wrote it, as ``source`` is now (the temporary file
    or directory about to be renamed to ``final``; ``final`` itself when already in place). ``appended``: a log
    that keeps growing."""
    target = resolved(final)
    with _guard:
        for record, relative in _records_over(target):
            record.manifest.add(relative, Path(source if source is not None else final), appended)
            record.save()


def start_log(path: str | os.PathLike) -> None:
    """Make ``path`` a log loratune appends to, recorded as written (as ``record_published(..., appended=True)``).
    A new one is created under a temporary name, recorded, then renamed into place: a process killed at any point
    leaves no log the record does not list, which would make the directory refuse to be continued."""
    path = Path(path)
    if path.exists():
        record_published(path, appended=True)
        return
    temp = temp_file_beside(path)
    try:
        record_published(path, temp, appended=True)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def record_removed(final: str | os.PathLike) -> None:
    """Forget ``final`` (removed by loratune) in every open record over it."""
    target = resolved(final)
    with _guard:
        for record, relative in _records_over(target):
            record.manifest.remove(relative)
            record.save()
