"""``loratune sweep``: run a planned grid of ordinary training runs one after another, continue an interrupted
sweep (a finished run is skipped, a half-done one resumes from its newest checkpoint), and collect their
results into one table (see ``experiments.results``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from loratune.experiments.budget import rank_for_budget
from loratune.experiments.grid import PlannedRun
from loratune.files import read_manifest
from loratune.train import TrainingDiverged, train
from loratune.train.run_dir import SUMMARY_FILE, never_started


def apply_budget(runs: list[PlannedRun], budget: int) -> list[PlannedRun]:
    """Each run with ``lora.r`` set to the rank closest to ``budget`` trainable parameters for its targets
    (recorded in its settings as ``lora.r``); the count is computed once per distinct adapter config."""
    chosen: dict[str, int] = {}
    planned = []
    for run in runs:
        lora = run.config.lora
        key = lora.model_dump_json()
        if key not in chosen:
            chosen[key], _ = rank_for_budget(run.config.model.name, lora,
                                             budget, trust_remote_code=run.config.model.trust_remote_code)
        config = run.config.model_copy(update={"lora": lora.model_copy(update={"r": chosen[key]})})
        planned.append(replace(run, settings={**run.settings, "lora.r": chosen[key]}, config=config))
    return planned


def run_state(run: PlannedRun) -> str:
    """``"done"`` (it wrote its summary), ``"partial"`` (it has something to resume) or ``"new"``."""
    directory = Path(run.config.output_dir)
    if (directory / SUMMARY_FILE).is_file():
        return "done"
    if directory.is_dir() and read_manifest(directory) is not None and not never_started(directory):
        return "partial"
    return "new"


def run_sweep(runs: list[PlannedRun], *, progress: Callable[[str], None] = print,
              on_result: Callable[[PlannedRun], None] = lambda run: None) -> None:
    """Train every run that is not done (resuming partial ones), saying which run is where and how long the
    rest should take; a run whose loss diverges is reported and skipped; ``on_result`` is called after each finished or skipped run (the results table is
    rewritten then, so an interrupted sweep still has its table so far)."""
    seconds: list[float] = []
    for index, run in enumerate(runs, 1):
        state = run_state(run)
        head = f"[{index}/{len(runs)}] {run.name}"
        if state == "done":
            progress(f"{head}: done before, skipped")
            on_result(run)
            continue
        left = len(runs) - index + 1
        eta = f"; about {_duration(left * sum(seconds) / len(seconds))} left" if seconds else ""
        progress(f"{head}: {'resuming' if state == 'partial' else 'training'}{eta}")
        started = time.perf_counter()
        try:
            summary = train(run.config, resume=state == "partial", overwrite=state == "new" and Path(
                run.config.output_dir).exists(), progress=False, log=lambda line: None)
        except TrainingDiverged as error:  # a setting that does not train is a result too; the others go on
            progress(f"{head}: diverged ({error}); left out of the table, run the sweep again to retry it")
            continue
        seconds.append(time.perf_counter() - started)
        progress(f"{head}: final loss {summary['final_loss']:.4f}{_eval_text(summary)} "
                 f"({_duration(seconds[-1])})")
        on_result(run)


def _eval_text(summary: dict) -> str:
    evaluation = summary.get("eval") or {}
    text = f", eval loss {evaluation['eval_loss']:.4f}" if evaluation.get("eval_loss") is not None else ""
    if evaluation.get("eval_exact_match") is not None:
        text += f", exact match {100 * evaluation['eval_exact_match']:.1f}%"
    return text


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
