"""The run directory ``train`` writes: where a run goes (never over anything loratune did not write), the
resolved ``config.yaml``, data hashes, and what ``--resume`` may change.

``run_directory`` guards the run for as long as it trains (``loratune.outputs``: inputs kept apart, the lock,
the record of every file written). A new run writes straight into ``output_dir``. ``--overwrite`` of an
existing run builds the new run beside it (``.<name>.loratune-tmp-replacement``) and swaps it in when it
completes, so the old run stays whole until then; ``--resume`` continues an unfinished replacement first. A run
that fails before its first step is removed again (or, after a crash, recognised and replaced), so it never
blocks the corrected rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from loratune.errors import ConfigError
from loratune.files import TEMP_MARK, swap_into_place
from loratune.outputs import (
    Manifest,
    check_only_ours,
    guard_output,
    is_nonempty_dir,
    open_record,
    record_published,
    remove_written,
    write_text_atomic,
)
from loratune.train.config import TrainConfig, load_config, validate_config

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
_VERSIONED = ("loratune", "torch", "transformers", "safetensors", "peft", "bitsandbytes")

# What --resume may change in a run's config: how long it trains, how it is evaluated, logged and saved.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.log_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "train.eval_max_new_tokens",
    "train.exact_match",
    "train.tensorboard",
    "data.eval_max_examples",
)


@dataclass(frozen=True)
class RunDirs:
    """Where a run ends up (``final``: the configured output_dir) and where this invocation writes
    (``work``: ``final`` itself, or the replacement being built beside it). ``created``: this invocation
    made ``work``, so a run that fails before its first step removes it."""

    final: Path
    work: Path
    created: bool


def replacement_dir(final: Path) -> Path:
    """Where ``--overwrite`` builds the run that replaces ``final``."""
    return final.parent / f".{final.name}{TEMP_MARK}replacement"


def run_inputs(
    config: TrainConfig, config_file: str | os.PathLike | None = None, *, resume: bool = False
) -> list[tuple[str, Path]]:
    """What a run reads, which its output directory must stay clear of: the data files, a local base model, the
    config file (unless a resumed run reads its own ``config.yaml`` back)."""
    from loratune.models import model_sources

    found = [
        (f"data.{key}", Path(value))
        for key in ("train", "eval", "retain")
        if (value := getattr(config.data, key)) and value != "builtin"
    ]
    found += [("the base model", path) for path in model_sources(config.model.name)]
    final = Path(config.output_dir)
    own = {(place / CONFIG_FILE).resolve() for place in (final, replacement_dir(final))}
    if config_file is not None and not (resume and Path(config_file).resolve() in own):
        found.append(("the config file", Path(config_file)))
    return found


@contextlib.contextmanager
def run_directory(
    path: str | os.PathLike,
    *,
    resume: bool,
    overwrite: bool,
    log=print,
    inputs: Iterable[tuple[str, str | os.PathLike]] = (),
) -> Iterator[RunDirs]:
    """Guard the run directory ``path`` for the block and decide where this invocation writes (created for a new
    run), keeping the record of what the run writes there current.

    Raises ``ConfigError`` (one line) when ``resume`` and ``overwrite`` are both given, when ``resume`` finds no
    run, when a non-empty output directory exists without either, when ``overwrite`` would replace a path
    loratune never replaces or one holding files loratune did not write, and when the directory is, contains or
    lies inside one of ``inputs`` (what the run reads: ``run_inputs``); ``OutputInUse`` when another process
    writes it.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    final = Path(path)
    pending = replacement_dir(final)
    with guard_output(final, existing="continue", inputs=inputs, what="output directory", covers=[pending]):
        dirs = _decide(final, pending, resume, overwrite, log)
        with open_record(dirs.work, "run"):
            record_published(final, dirs.work)  # in the record of a sweep around it
            yield dirs


def _decide(final: Path, pending: Path, resume: bool, overwrite: bool, log) -> RunDirs:
    if resume:
        for candidate in (pending, final):
            if (candidate / CONFIG_FILE).is_file():
                if candidate == pending:
                    log(f"resuming the run that replaces {final} (built in {pending} until it completes)")
                return RunDirs(final, candidate, created=False)
        raise ConfigError(f"--resume: {final} holds no run to resume (no {CONFIG_FILE}); start it without --resume")
    replace = False
    if is_nonempty_dir(final):
        if never_started(final):
            log(f"{final} holds a run that never completed a step; starting afresh")
            remove_written(final)
        elif not overwrite:
            raise ConfigError(
                f"output directory {final} already exists and is not empty; use --resume to continue that run "
                "or --overwrite to replace it (or set output_dir)"
            )
        else:
            check_only_ours(final)
            replace = True
    if pending.exists():  # a replacement that never finished: it is superseded now
        check_only_ours(pending)
        shutil.rmtree(pending)
    work = pending if replace else final
    work.mkdir(parents=True, exist_ok=True)
    return RunDirs(final, work, created=True)


def finish_run_dir(dirs: RunDirs) -> None:
    """Put a completed replacement run in place of the old one (nothing to do for a run written in place)."""
    if dirs.work != dirs.final:
        swap_into_place(dirs.work, dirs.final)


def abandon_run_dir(dirs: RunDirs) -> None:
    """Remove what a run that failed before its first step created (an existing run is never touched)."""
    if dirs.created:
        remove_written(dirs.work)


def never_started(path: Path) -> bool:
    """A loratune run directory with nothing to lose: only files loratune recorded, and no checkpoint, no adapter
    or model and no logged step among them."""
    manifest = Manifest.read(path)
    if manifest is None or manifest.legacy or manifest.kind != "run" or manifest.foreign(path):
        return False
    if any((path / name).exists() for name in ("adapter", "model", "intrinsic")) or any(
        (path / "checkpoints").glob("step-*")
    ):
        return False
    metrics = path / "metrics.jsonl"
    return not (metrics.is_file() and metrics.stat().st_size > 0)


# --- config.yaml ------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a data file (remembered while its size and modification time stay the same: a sweep checks
    the same files for every run)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashed:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _hashed[key] = digest.hexdigest()
    return _hashed[key]


_hashed: dict[tuple, str] = {}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def data_hashes(config: TrainConfig) -> dict[str, str]:
    """SHA-256 of the run's training and evaluation data files, by key (``train``, ``eval``)."""
    return {key: file_sha256(value) for key in ("train", "eval") if (value := getattr(config.data, key))}


def requested_settings(config: TrainConfig) -> dict:
    """A config as it was asked for (before the run fitted it to the model), as plain data: what identifies a run."""
    return {k: v for k, v in config.to_yaml_dict().items() if k not in ("meta", "output_dir")}


def write_run_config(
    path: Path, config: TrainConfig, meta: dict | None = None, requested: TrainConfig | None = None
) -> TrainConfig:
    """Write the fully resolved config into run directory ``path``, with package versions, data hashes and the
    config as ``requested`` (before fitting) under ``meta`` (or the given ``meta``, for a resumed run); return
    it."""
    if meta is None:
        meta = {"versions": package_versions(), "data_sha256": data_hashes(config)}
    if requested is not None:
        meta = {**meta, "requested": requested_settings(requested)}
    config = config.model_copy(update={"meta": meta})
    write_text_atomic(path / CONFIG_FILE, yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    return config


def differences(run_dir: Path, config: TrainConfig) -> list[tuple[str, object, object]]:
    """How ``config`` differs from what trained the run in ``run_dir`` (its ``config.yaml``: the config as it was
    requested, and the data files' hashes): (dotted key, then, now) for each setting, ("data.KEY", "file with
    SHA-256 …", "changed since") for a data file. Empty when the run is this config's."""
    saved = load_config(run_dir / CONFIG_FILE)
    meta = saved.meta or {}
    then = meta.get("requested") or requested_settings(saved)
    old, new = _leaves(then), _leaves(requested_settings(config))
    methods = {old.get("train.method"), new.get("train.method")}
    found = [
        (key, old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and _used_by(key, methods)
    ]
    for key, digest in (meta.get("data_sha256") or {}).items():
        path = getattr(config.data, key, None)
        if (
            path
            and Path(path).is_file()
            and file_sha256(path) != digest
            and not any(k == f"data.{key}" for k, *_ in found)
        ):
            found.append((f"data.{key}", f"{path} as it was", "its contents changed since"))
    return found


def saved_run_config(run_dir: Path) -> TrainConfig:
    """The config a run was started with (its ``config.yaml``); refuses when its data files changed since."""
    config = load_config(run_dir / CONFIG_FILE)
    for key, digest in ((config.meta or {}).get("data_sha256") or {}).items():
        path = getattr(config.data, key)
        if file_sha256(path) != digest:
            raise ConfigError(
                f"--resume: data.{key} ({path}) changed since the run started; use --overwrite to start over"
            )
    return config


# settings that only one training method reads: a change of them (a default loratune changed, say) leaves a run of
# another method what it was
_METHOD_SECTIONS = {"intrinsic.": "intrinsic"}


def _used_by(key: str, methods: set[str]) -> bool:
    """Whether setting ``key`` can change a run trained (then or now) by one of ``methods``."""
    return all(not key.startswith(prefix) or method in methods for prefix, method in _METHOD_SECTIONS.items())


def _leaves(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def resume_config(saved: TrainConfig, requested: TrainConfig | None) -> tuple[TrainConfig, list[str]]:
    """The config a resumed run continues with: ``saved`` with what ``requested`` (the config given now:
    the file and its ``--set`` overrides) changes among ``RESUMABLE_CHANGES``; and those changes described.

    Raises ``ConfigError`` naming every other key that differs: a run cannot change its model, adapter,
    data or optimisation half-way.
    """
    if requested is None:
        return saved, []
    # compared as requested: what the run fitted to its model (a classifier's task and LoRA targets) is not a change
    old = _leaves((saved.meta or {}).get("requested") or requested_settings(saved))
    new = _leaves(requested_settings(requested))
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        shown = ", ".join(f"{key} ({old.get(key)!r} → {new.get(key)!r})" for key in refused[:4])
        more = f" (+{len(refused) - 4} more)" if len(refused) > 4 else ""
        raise ConfigError(
            f"--resume continues the run as it was configured, and these differ from its {CONFIG_FILE}: {shown}{more}; "
            f"--resume may change only {', '.join(RESUMABLE_CHANGES)} — start a new run (--overwrite or another "
            "output_dir) to change the rest"
        )
    if not changed:
        return saved, []
    sections = saved.to_yaml_dict()
    for key in changed:
        section, field = key.split(".", 1)
        sections[section][field] = new.get(key)
    config = validate_config(sections, default_output_dir=saved.output_dir)
    return config, [f"{key}: {old.get(key)!r} → {new.get(key)!r}" for key in changed]
