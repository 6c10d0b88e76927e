"""The run directory ``train`` writes: where a run goes (never over anything loratune did not write), the
resolved ``config.yaml``, data hashes, and what ``--resume`` may change.

A new run writes straight into ``output_dir``. ``--overwrite`` of an existing run builds the new run beside
it (``.<name>.loratune-replacement``) and swaps it in when it completes, so the old run stays whole until
then; ``--resume`` continues an unfinished replacement first. A run that fails before its first step is
removed again (or, after a crash, recognised and replaced), so it never blocks the corrected rerun.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from loratune.errors import ConfigError
from loratune.files import (
    check_location,
    check_only_ours,
    is_nonempty_dir,
    read_manifest,
    swap_into_place,
    write_manifest,
    write_text_atomic,
)
from loratune.train.config import TrainConfig, load_config, validate_config

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
RUN_ENTRIES = ("adapter", "model", "intrinsic", "best", "checkpoints", CONFIG_FILE, "metrics.jsonl", "loss.png", SUMMARY_FILE, "tensorboard")
_VERSIONED = ("loratune", "torch", "transformers", "safetensors", "peft", "bitsandbytes")

# What --resume may change in a run's config: how long it trains, how it is evaluated, logged and saved.
RESUMABLE_CHANGES = (
    "train.max_steps", "train.epochs", "train.eval_every", "train.log_every", "train.save_every",
    "train.keep_checkpoints", "train.eval_batch_size", "train.eval_max_new_tokens", "train.exact_match",
    "train.tensorboard", "data.eval_max_examples",
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
    return final.parent / f".{final.name}.loratune-replacement"


def prepare_run_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool, log=print) -> RunDirs:
    """Decide where this invocation of ``train`` writes, creating it for a new run.

    Raises ``ConfigError`` (one line) when ``resume`` and ``overwrite`` are both given, when ``resume`` finds
    no run, when a non-empty ``path`` exists without either, and when ``overwrite`` would replace a path
    loratune never replaces (see ``loratune.files``) or one holding files loratune did not write.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    final = Path(path)
    pending = replacement_dir(final)
    check_location(final)
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
            shutil.rmtree(final)
        elif not overwrite:
            raise ConfigError(
                f"output directory {final} already exists and is not empty; use --resume to continue that run "
                "or --overwrite to replace it (or set output_dir)"
            )
        else:
            check_only_ours(final, adopt=is_legacy_run)
            replace = True
    if pending.exists():  # a replacement that never finished: it is superseded now
        check_only_ours(pending)
        shutil.rmtree(pending)
    work = pending if replace else final
    work.mkdir(parents=True, exist_ok=True)
    write_manifest(work, "run", RUN_ENTRIES)
    return RunDirs(final, work, created=True)


def finish_run_dir(dirs: RunDirs) -> None:
    """Put a completed replacement run in place of the old one (nothing to do for a run written in place)."""
    if dirs.work != dirs.final:
        swap_into_place(dirs.work, dirs.final)


def abandon_run_dir(dirs: RunDirs) -> None:
    """Remove what a run that failed before its first step created (an existing run is never touched)."""
    if dirs.created:
        shutil.rmtree(dirs.work, ignore_errors=True)


def never_started(path: Path) -> bool:
    """A loratune run directory with nothing to lose: no checkpoint, no adapter or model and no logged step."""
    is_run = (read_manifest(path) or {}).get("kind") == "run" or is_legacy_run(path)
    if not is_run:
        return False
    if any((path / name).exists() for name in ("adapter", "model", "intrinsic")) or any(
            (path / "checkpoints").glob("step-*")):
        return False
    metrics = path / "metrics.jsonl"
    return not (metrics.is_file() and metrics.stat().st_size > 0) and all(
        p.name in RUN_ENTRIES or _is_our_temp(p.name) or p.name.startswith(".loratune-output") for p in path.iterdir()
    )


def is_legacy_run(path: Path) -> bool:
    """A run directory written before loratune kept manifests: its config.yaml records loratune's version
    and everything in it has a run directory's names."""
    try:
        data = yaml.safe_load((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    versions = ((data or {}).get("meta") or {}).get("versions") if isinstance(data, dict) else None
    if not isinstance(versions, dict) or "loratune" not in versions:
        return False
    return all(p.name in RUN_ENTRIES or _is_our_temp(p.name) for p in path.iterdir())


def _is_our_temp(name: str) -> bool:
    # temporary names of this and earlier versions: .adapter.tmp, .config.yaml.XXXX, .loss.png.tmp.png, ...
    return name.startswith(".") and any(name[1:].startswith(entry) for entry in RUN_ENTRIES)


# --- config.yaml ------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_run_config(path: Path, config: TrainConfig, meta: dict | None = None) -> TrainConfig:
    """Write the fully resolved config into run directory ``path``, with package versions and data hashes
    under ``meta`` (or the given ``meta``, for a resumed run); return it."""
    if meta is None:
        hashes = {key: file_sha256(value) for key in ("train", "eval") if (value := getattr(config.data, key))}
        meta = {"versions": package_versions(), "data_sha256": hashes}
    config = config.model_copy(update={"meta": meta})
    write_text_atomic(path / CONFIG_FILE, yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
    return config


def saved_run_config(run_dir: Path) -> TrainConfig:
    """The config a run was started with (its ``config.yaml``); refuses when its data files changed since."""
    config = load_config(run_dir / CONFIG_FILE)
    for key, digest in ((config.meta or {}).get("data_sha256") or {}).items():
        path = getattr(config.data, key)
        if file_sha256(path) != digest:
            raise ConfigError(f"--resume: data.{key} ({path}) changed since the run started; use --overwrite to start over")
    return config


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
    ignore = {"meta", "output_dir"}
    old = _leaves({k: v for k, v in saved.to_yaml_dict().items() if k not in ignore})
    new = _leaves({k: v for k, v in requested.to_yaml_dict().items() if k not in ignore})
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
