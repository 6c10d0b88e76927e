"""GRPO's reward functions, with TRL's signature so functions written for TRL's ``GRPOTrainer`` run unchanged:

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

``prompts`` and ``completions`` hold one entry per completion (a prompt repeated for each completion of its group):
strings for standard rows; for conversational rows, message lists — the prompt's turns, and the completion as
``[{"role": "assistant", "content": text}]``. ``columns`` are the rows' other columns, one value per completion, plus
TRL's ``trainer_state`` (here with ``global_step`` and ``max_steps``), ``log_extra`` and ``log_metric`` (accepted and
ignored). ``None`` means "this function does not score this completion" (TRL's NaN: left out of the sums).

``grpo.rewards`` names them: ``"path/to/file.py:function"`` (the file is imported once), or a built-in:

    exact_match     1.0 when the completion, stripped, equals the row's ``answer`` column, stripped; else 0.0
    regex:PATTERN   1.0 when the stripped completion matches PATTERN whole (``re.fullmatch``); else 0.0
    json_valid      1.0 when the completion parses as JSON; else 0.0

A function that raises, returns something other than one number (or None) per completion, or returns the wrong
number of them is one ``RewardError`` naming the function and the row (found by scoring the rows one by one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from loratune.errors import ConfigError, LoratuneError


class RewardError(LoratuneError):
    """A reward function failed on a row, or returned something that is not one reward per completion."""


@dataclass(frozen=True)
class Reward:
    """A reward function and the name its metrics are logged under (``rewards/<name>/mean``)."""

    name: str
    function: Callable
    where: str  # the spec it came from, as the config gave it


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match(prompts, completions, answer=None, **columns) -> list[float]:
    """1.0 where the completion, stripped, equals the ``answer`` column, stripped (TRL-style built-in)."""
    if answer is None:
        raise KeyError("exact_match compares with an 'answer' column, and the rows have none")
    return [float(_completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def json_valid(prompts, completions, **columns) -> list[float]:
    """1.0 where the completion parses as JSON."""
    scores = []
    for completion in completions:
        try:
            json.loads(_completion_text(completion))
            scores.append(1.0)
        except ValueError:
            scores.append(0.0)
    return scores


def regex_reward(pattern: str) -> Callable:
    """A reward of 1.0 where the stripped completion matches ``pattern`` whole."""
    compiled = re.compile(pattern)

    def regex(prompts, completions, **columns) -> list[float]:
        return [float(compiled.fullmatch(_completion_text(c).strip()) is not None) for c in completions]

    return regex


BUILT_IN = {"exact_match": exact_match, "json_valid": json_valid}


def load_rewards(specs: list[str], base_dir: Path | None = None) -> list[Reward]:
    """The reward functions ``specs`` name (see the module docstring); relative files are looked up from the working
    directory, then ``base_dir``. Raises ``ConfigError`` naming the spec for an unknown built-in, a missing file or
    function, a file that fails to import, or a name that is not callable."""
    rewards = []
    for spec in specs:
        if spec in BUILT_IN:
            rewards.append(Reward(spec, BUILT_IN[spec], spec))
        elif spec.startswith("regex:"):
            try:
                function = regex_reward(spec.removeprefix("regex:"))
            except re.error as exc:
                raise ConfigError(f"grpo.rewards: {spec!r} is not a valid regular expression ({exc})") from None
            rewards.append(Reward("regex", function, spec))
        elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
            rewards.append(_from_file(spec, base_dir))
        else:
            raise ConfigError(
                f"grpo.rewards: unknown reward {spec!r}; give 'path/to/file.py:function' or a built-in "
                f"({', '.join(BUILT_IN)}, regex:PATTERN)"
            )
    names = [r.name for r in rewards]
    for i, name in enumerate(names):  # two functions of one name: number them so their metrics stay apart
        if names.count(name) > 1:
            rewards[i] = Reward(f"{name}_{names[: i + 1].count(name)}", rewards[i].function, rewards[i].where)
    return rewards


def _from_file(spec: str, base_dir: Path | None) -> Reward:
    file, name = spec.rsplit(":", 1)
    candidates = [Path(file)] if Path(file).is_absolute() else [Path(file)] + ([base_dir / file] if base_dir else [])
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ConfigError(
            f"grpo.rewards: {spec!r}: file {file!r} not found (looked in {', '.join(map(str, candidates))})"
        )
    module_name = "loratune_rewards_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)  # the user's own code, as TRL runs it
        except Exception as exc:  # noqa: BLE001 - any failure of the user's file is reported as one line
            raise ConfigError(f"grpo.rewards: {path} failed to import: {type(exc).__name__}: {exc}") from None
        sys.modules[module_name] = module
    function = getattr(module, name, None)
    if function is None:
        defined = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(f"grpo.rewards: {path} has no function {name!r} (it defines {', '.join(defined) or 'none'})")
    if not callable(function):
        raise ConfigError(f"grpo.rewards: {path}:{name} is not a function")
    return Reward(name, function, spec)


def _describe(reward: Reward) -> str:
    """The function as an error names it: its name and where it is defined."""
    try:
        file = inspect.getsourcefile(reward.function)
        line = inspect.getsourcelines(reward.function)[1]
        return f"reward function {reward.name!r} ({file}:{line})"
    except (TypeError, OSError):
        return f"reward function {reward.name!r} ({reward.where})"


def score(
    reward: Reward, prompts: list, completions: list, columns: dict[str, list], locations: list[str], extra: dict
) -> list[float]:
    """``reward``'s score of each completion (NaN for None); ``locations``: each completion's row, for errors.
    Raises ``RewardError`` naming the function and the row (see the module docstring)."""
    n = len(completions)
    try:
        values = reward.function(prompts=prompts, completions=completions, **columns, **extra)
    except Exception as exc:  # noqa: BLE001 - the user's function: find the row and report it in one line
        raise _failure(reward, prompts, completions, columns, locations, extra, exc) from None
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(
            f"{_describe(reward)} returned {type(values).__name__} for rows {_span(locations)}; "
            f"return a list of {n} rewards (one per completion)"
        )
    values = list(values)
    if len(values) != n:
        raise RewardError(
            f"{_describe(reward)} returned {len(values)} rewards for {n} completions (rows {_span(locations)}); "
            "return one reward per completion"
        )
    scores = []
    for value, location in zip(values, locations):
        if value is None:
            scores.append(math.nan)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(
                f"{_describe(reward)} returned {value!r} for row {location}; a reward is a number or None"
            ) from None
        scores.append(number)
    return scores


def _failure(reward, prompts, completions, columns, locations, extra, error) -> RewardError:
    """The error of a function that raised on a batch: the first row it raises on alone, else the batch."""
    for i, location in enumerate(locations):
        one = {key: [values[i]] for key, values in columns.items()}
        try:
            reward.function(prompts=[prompts[i]], completions=[completions[i]], **one, **extra)
        except Exception as exc:  # noqa: BLE001 - this is the row
            return RewardError(f"{_describe(reward)} failed on row {location}: {type(exc).__name__}: {exc}")
    return RewardError(f"{_describe(reward)} failed on rows {_span(locations)}: {type(error).__name__}: {error}")


def _span(locations: list[str]) -> str:
    unique = list(dict.fromkeys(locations))
    return unique[0] if len(unique) == 1 else f"{unique[0]} … {unique[-1]}"


def trainer_state(step: int, max_steps: int) -> SimpleNamespace:
    """What TRL's reward functions may read from ``trainer_state``: the step and the run's length."""
    return SimpleNamespace(global_step=step, max_steps=max_steps)


__all__ = ["BUILT_IN", "Reward", "RewardError", "exact_match", "json_valid", "load_rewards", "regex_reward", "score"]
