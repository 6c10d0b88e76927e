"""``loratune sweep``: run a planned grid of ordinary training runs one after another, continue an interrupted
sweep (a finished run is skipped, a half-done one resumes from its newest checkpoint), and collect their
results into one table (see ``experiments.results``).

A run is identified by its configuration as requested and its data files' contents: a run directory trained with
anything else is never taken for the planned run. One that only asks for more steps (``train.max_steps``,
``train.epochs``) is extended; any other change is refused, naming it, unless the sweep restarts changed runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from loratune.errors import ConfigError
from loratune.experiments.budget import rank_for_budget
from loratune.experiments.grid import PlannedRun
from loratune.outputs import Manifest
from loratune.train import TrainingDiverged, train
from loratune.train.run_dir import CONFIG_FILE, SUMMARY_FILE, differences, never_started

EXTENDING = ("train.max_steps", "train.epochs")  # changes that continue a run instead of making it another


def apply_budget(runs: list[PlannedRun], budget: int) -> list[PlannedRun]:
    """Each run with ``lora.r`` set to the rank closest to ``budget`` trainable parameters for its targets
    (recorded in its settings as ``lora.r``); the count is computed once per distinct adapter config."""
    chosen: dict[str, int] = {}
    planned = []
    for run in runs:
        lora = run.config.lora
        key = lora.model_dump_json()
        if key not in chosen:
            chosen[key], _ = rank_for_budget(
                run.config.model.name, lora, budget, trust_remote_code=run.config.model.trust_remote_code
            )
        config = run.config.model_copy(update={"lora": lora.model_copy(update={"r": chosen[key]})})
        planned.append(replace(run, settings={**run.settings, "lora.r": chosen[key]}, config=config))
    return planned


def run_state(run: PlannedRun) -> str:
    """``"done"`` (it wrote its summary), ``"partial"`` (it has something to resume), ``"new"``, or — when its
    directory holds a run trained with other settings (``changes``) — ``"extend"`` (only more steps asked for) or
    ``"changed"``."""
    directory = Path(run.config.output_dir)
    if not (directory / CONFIG_FILE).is_file():
        return "new"
    manifest = Manifest.read(directory)
    if manifest is None or never_started(directory):
        return "new"
    found = changes(run)
    if found:
        return "extend" if all(key in EXTENDING and _more(then, now) for key, then, now in found) else "changed"
    return "done" if (directory / SUMMARY_FILE).is_file() else "partial"


def _more(then, now) -> bool:
    return now is None or (then is not None and now > then)


def changes(run: PlannedRun) -> list[tuple[str, object, object]]:
    """How the planned run differs from the run in its directory: (key, then, now) per difference."""
    return differences(Path(run.config.output_dir), run.config)


def describe_changes(found: list[tuple[str, object, object]], limit: int = 3) -> str:
    """``"train.lr 0.0002 → 0.001, lora.r 8 → 16 (+1 more)"``."""
    shown = ", ".join(
        f"{key} {then!r} → {now!r}" if not key.startswith("data.") or "changed" not in str(now) else f"{key}: {now}"
        for key, then, now in found[:limit]
    )
    return shown + (f" (+{len(found) - limit} more)" if len(found) > limit else "")


def refuse_changed(runs: list[PlannedRun]) -> None:
    """Raise ``ConfigError`` naming the runs whose directories hold runs trained with other settings (and what
    differs), so none is silently reused; say how to train them afresh."""
    changed = [run for run in runs if run_state(run) == "changed"]
    if not changed:
        return
    first = changed[0]
    more = f"; {len(changed) - 1} more runs changed too" if len(changed) > 1 else ""
    raise ConfigError(
        f"{first.config.output_dir} was trained with other settings than this sweep plans "
        f"({describe_changes(changes(first))}){more}; pass --restart-changed to train changed runs "
        "afresh, or give another --out"
    )


def run_sweep(
    runs: list[PlannedRun],
    *,
    progress: Callable[[str], None] = print,
    on_result: Callable[[PlannedRun], None] = lambda run: None,
    restart_changed: bool = False,
) -> None:
    """Train every run that is not done (resuming partial ones, extending ones asked for more steps), saying which
    run is where and how long the rest should take; a run whose loss diverges is reported and skipped;
    ``on_result`` is called after each finished or skipped run (the results table is rewritten then, so an
    interrupted sweep still has its table so far). A run whose directory holds a run trained with other settings
    is trained afresh with ``restart_changed``, else refused (``ConfigError``); call ``refuse_changed`` first to
    refuse before anything trains."""
    seconds: list[float] = []
    for index, run in enumerate(runs, 1):
        state = run_state(run)
        head = f"[{index}/{len(runs)}] {run.name}"
        if state == "done":
            progress(f"{head}: done before, skipped")
            on_result(run)
            continue
        if state == "changed" and not restart_changed:
            raise ConfigError(
                f"{run.config.output_dir} was trained with other settings ("
                f"{describe_changes(changes(run))}); pass --restart-changed to train it afresh"
            )
        left = len(runs) - index + 1
        eta = f"; about {_duration(left * sum(seconds) / len(seconds))} left" if seconds else ""
        doing = {"partial": "resuming", "extend": "extending", "changed": "training afresh"}.get(state, "training")
        if state in ("extend", "changed"):
            doing += f" ({describe_changes(changes(run))})"
        progress(f"{head}: {doing}{eta}")
        started = time.perf_counter()
        existing = Path(run.config.output_dir).exists()
        try:
            summary = train(
                run.config,
                resume=state in ("partial", "extend"),
                overwrite=state == "changed" or (state == "new" and existing),
                progress=False,
                log=lambda line: None,
            )
        except TrainingDiverged as error:  # a setting that does not train is a result too; the others go on
            progress(f"{head}: diverged ({error}); left out of the table, run the sweep again to retry it")
            continue
        seconds.append(time.perf_counter() - started)
        progress(f"{head}: final loss {summary['final_loss']:.4f}{_eval_text(summary)} ({_duration(seconds[-1])})")
        on_result(run)


def _eval_text(summary: dict) -> str:
    evaluation = summary.get("eval") or {}
    text = f", eval loss {evaluation['eval_loss']:.4f}" if evaluation.get("eval_loss") is not None else ""
    if evaluation.get("eval_exact_match") is not None:
        text += f", exact match {100 * evaluation['eval_exact_match']:.1f}%"
    return text


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
