"""A sweep's plan: ``--grid KEY=V1,V2,...`` options parsed into values, their Cartesian product (times seeds)
as named runs, each an ordinary training config checked before anything runs."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratune.errors import ConfigError
from loratune.train.config import TrainConfig, load_config

_OPENING, _CLOSING = "[{(", "]})"


def split_values(text: str) -> list[str]:
    """``"a,[b,c],d"`` → ``["a", "[b,c]", "d"]``: commas inside brackets do not split."""
    values, depth, current = [], 0, []
    for char in text:
        if char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    values.append("".join(current).strip())
    return values


def parse_grid(spec: str) -> tuple[str, list[Any]]:
    """``"lora.r=4,8"`` → ("lora.r", [4, 8]); values are YAML (``[q_proj,v_proj]`` is a list).
    Raises ``ConfigError`` for a missing key or ``=``, an empty value or a repeated value."""
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,..., e.g. --grid lora.r=4,8,16")
    texts = split_values(raw)
    if any(not text for text in texts):
        raise ConfigError(f"--grid {spec!r}: an empty value; give values separated by single commas")
    try:
        values = [yaml.safe_load(text) for text in texts]
    except yaml.YAMLError as error:
        raise ConfigError(f"--grid {spec!r}: a value is not valid YAML ({str(error).splitlines()[0]})") from None
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ConfigError(f"--grid {spec!r}: a value appears twice")
    return key, values


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its name (its directory under the sweep's output), the grid values it takes (dotted
    key → value, the seed included when there are several), and its validated config."""

    name: str
    settings: dict[str, Any]
    config: TrainConfig = field(repr=False)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_short(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def run_name(settings: dict[str, Any]) -> str:
    """A directory name for ``settings``: ``r=8,target_modules=q_proj+v_proj,seed=1`` (last key component,
    or the whole key where two grids share a last component)."""
    lasts = [key.rsplit(".", 1)[-1] for key in settings]
    parts = []
    for key, last in zip(settings, lasts):
        label = last if lasts.count(last) == 1 else key
        parts.append(f"{label}={_short(settings[key])}")
    return ",".join(parts) or "run"


def plan_runs(
    config_path: str | Path,
    grids: list[tuple[str, list[Any]]],
    out: str | Path,
    *,
    seeds: int = 1,
    overrides: list[str] | None = None,
) -> list[PlannedRun]:
    """Every run of the sweep, in order: the product of ``grids`` (in the order given) and, with ``seeds`` > 1,
    seeds 0..seeds-1 (``train.seed``). Each config is ``config_path`` with ``overrides`` and the run's values,
    writing into ``out/<name>``. Raises ``ConfigError`` (naming the grid key) for a key the config does not
    have or a value it refuses, before anything runs."""
    keys = [key for key, _ in grids]
    if len(set(keys)) != len(keys):
        raise ConfigError("--grid: each key may be given once; put all its values in one --grid")
    if seeds > 1 and "train.seed" in keys:
        raise ConfigError("--seeds and --grid train.seed both choose seeds; use one of them")
    if "output_dir" in keys:
        raise ConfigError("--grid output_dir: each run's directory is chosen by the sweep (--out DIR/<run name>)")
    runs = []
    for values in itertools.product(*(values for _, values in grids), *([range(seeds)] if seeds > 1 else [])):
        settings = dict(zip([*keys, *(["train.seed"] if seeds > 1 else [])], values))
        name = run_name(settings)
        sets = [
            *(overrides or []),
            *(f"{key}={json.dumps(value)}" for key, value in settings.items()),
            f"output_dir={json.dumps(str(Path(out) / name))}",
        ]
        try:
            config = load_config(config_path, sets)
        except ConfigError as error:
            raise ConfigError(f"--grid: {error}") from None
        runs.append(PlannedRun(name, settings, config))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError("--grid: two runs would share a directory name; use values that differ when printed")
    return runs
