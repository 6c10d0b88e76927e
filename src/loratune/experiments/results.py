"""A sweep's results: one row per run (``results.csv``), and per combination of grid values the mean ± std over
seeds (``results.md``, the way the LoRA paper reports), plus a plot of the main metric (``results.png``)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loratune.analysis.plots import save_figure
from loratune.experiments.grid import PlannedRun, run_name
from loratune.outputs import write_text_atomic
from loratune.train.run_dir import CONFIG_FILE, SUMMARY_FILE

COLUMNS = (
    "method",
    "r",
    "target_modules",
    "trainable_params",
    "adapter_mb",
    "train_seconds",
    "tokens_per_s",
    "peak_memory_mb",
    "final_loss",
    "eval_loss",
    "eval_exact_match",
    "retain_loss_base",
    "retain_loss",
    "forgetting",
)
FILES = ("results.csv", "results.md", "results.png")
# a classifier's quality metrics, as training logs them (a language model's is eval_exact_match, in COLUMNS)
CLASSIFIER_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_mcc", "eval_pearson", "eval_spearman")


def run_row(run: PlannedRun) -> dict[str, Any] | None:
    """The results row of a finished run (its grid values, then ``COLUMNS``), or None when it has not finished."""
    summary_file = Path(run.config.output_dir) / SUMMARY_FILE
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    evaluation = summary.get("eval") or {}
    lora_run = summary.get("method", "lora") == "lora"  # r and target_modules describe a LoRA run only
    lora = _trained_lora(run)
    row = {"run": run.name, **{key: _cell(value) for key, value in run.settings.items()}}
    row.update(
        {
            "method": summary.get("method", "lora"),
            "r": lora.get("r") if lora_run else None,
            "target_modules": _cell(lora.get("target_modules")) if lora_run else None,
            "trainable_params": summary.get("trainable_params"),
            "adapter_mb": round(summary["adapter_bytes"] / 2**20, 3) if summary.get("adapter_bytes") else None,
            "train_seconds": summary.get("train_seconds"),
            "tokens_per_s": summary.get("tokens_per_s"),
            "peak_memory_mb": summary.get("peak_memory_mb"),
            "final_loss": summary.get("final_loss"),
            "eval_loss": evaluation.get("eval_loss"),
            "eval_exact_match": evaluation.get("eval_exact_match"),
            **{name: evaluation[name] for name in CLASSIFIER_METRICS if evaluation.get(name) is not None},
            "retain_loss_base": summary.get("retain_loss_base"),
            "retain_loss": summary.get("retain_loss"),
            "forgetting": summary.get("forgetting"),
        }
    )
    return row


def _trained_lora(run: PlannedRun) -> dict[str, Any]:
    """The LoRA settings the run trained with, as its own ``config.yaml`` records them (a task may fill in what
    the sweep's config left unset: a classifier's query and value projections), else the sweep's."""
    written = Path(run.config.output_dir) / CONFIG_FILE
    if written.is_file():
        lora = (yaml.safe_load(written.read_text()) or {}).get("lora")
        if isinstance(lora, dict):
            return lora
    return run.config.lora.model_dump()


def _cell(value: Any) -> Any:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else value


def write_results(runs: list[PlannedRun], out: Path) -> list[dict[str, Any]]:
    """Write ``results.csv``, ``results.md`` and ``results.png`` into ``out`` for the finished ``runs``; return
    the rows. Each file is written to a temporary name and renamed."""
    rows = [row for row in map(run_row, runs) if row is not None]
    keys = list(dict.fromkeys(key for run in runs for key in run.settings))
    metrics = [name for name in CLASSIFIER_METRICS if any(row.get(name) is not None for row in rows)]
    header = ["run", *keys, *COLUMNS, *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    groups = _groups(rows, [k for k in keys if k != "train.seed"])
    write_text_atomic(out / "results.md", _markdown(groups, [k for k in keys if k != "train.seed"], len(runs), metrics))
    _plot(groups, out / "results.png")
    return rows


def _groups(rows: list[dict], keys: list[str]) -> list[tuple[dict, list[dict]]]:
    grouped: dict[str, tuple[dict, list[dict]]] = {}
    for row in rows:
        values = {key: row.get(key) for key in keys}
        grouped.setdefault(json.dumps(values, sort_keys=True, default=str), (values, []))[1].append(row)
    return list(grouped.values())


def _stat(rows: list[dict], column: str, digits: int) -> str:
    values = [r[column] for r in rows if isinstance(r.get(column), (int, float)) and math.isfinite(r[column])]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _markdown(groups, keys: list[str], planned: int, metrics: list[str] = ()) -> str:
    scores = [(name, 3) for name in metrics] or [("eval_exact_match", 3)]
    shown = [
        ("trainable_params", 0),
        ("adapter_mb", 2),
        ("train_seconds", 1),
        ("tokens_per_s", 0),
        ("peak_memory_mb", 0),
        ("final_loss", 4),
        ("eval_loss", 4),
        *scores,
        ("forgetting", 4),
    ]
    # method and r, unless a grid already shows them (train.method, lora.r: the budget's choice)
    fixed = [name for name, key in (("method", "train.method"), ("r", "lora.r")) if key not in keys]
    seeds = max((len(rows) for _, rows in groups), default=0)
    lines = [
        f"{sum(len(rows) for _, rows in groups)} of {planned} runs finished"
        + (f"; mean ± std over up to {seeds} seeds" if seeds > 1 else ""),
        "",
        "| " + " | ".join([*keys, *fixed, "runs", *(name for name, _ in shown)]) + " |",
        "|" + "---|" * (len(keys) + len(fixed) + 1 + len(shown)),
    ]
    for values, rows in groups:
        cells = [str(values[key]) for key in keys] + [str(rows[0][name] or "–") for name in fixed] + [str(len(rows))]
        cells += [_stat(rows, name, digits) for name, digits in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(groups, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "eval_loss" if any(r.get("eval_loss") is not None for _, rows in groups for r in rows) else "final_loss"
    labels, means, errors = [], [], []
    for values, rows in groups:
        numbers = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
        if not numbers:
            continue
        labels.append(run_name(values) if values else "run")
        means.append(statistics.fmean(numbers))
        errors.append(statistics.stdev(numbers) if len(numbers) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"sweep: {metric.replace('_', ' ')} per configuration (mean ± std over seeds)")
    save_figure(fig, path)


# what d90 measures, by the first of these the reference run has: a language model's exact match, a classifier's
# accuracy (the papers' MRPC figure)
D90_METRICS = ("eval_exact_match", "eval_accuracy")


def d90_metric(reference: dict[str, Any]) -> str | None:
    """The metric of ``D90_METRICS`` the reference run's summary has, or None."""
    evaluation = reference.get("eval") or {}
    return next((name for name in D90_METRICS if evaluation.get(name) is not None), None)


def d90(
    rows: list[dict[str, Any]], reference: dict[str, Any], settings: Sequence[str] = ()
) -> tuple[int | None, float, str, dict[str, Any]]:
    """(d90, the reference's value, the metric, the settings it was reached with): the smallest
    ``intrinsic.dim`` whose runs reach, on average over seeds, 90% of the reference run's metric (``reference``:
    its summary.json) — exact match, or a classifier's accuracy, which is what "90% of the performance" means for
    a score where higher is better. ``settings``: the sweep's other grid keys (a learning rate, say): each dim
    counts with its best combination of them (the mean over seeds of each combination), as the paper chooses a
    learning rate per d. None (and no settings) when no dim reaches it. Raises ``ConfigError`` when the reference
    or the runs have neither metric."""
    from loratune.errors import ConfigError

    metric = d90_metric(reference)
    if metric is None:
        raise ConfigError(
            "--reference: d90 needs the reference run's eval_exact_match (evaluation data with "
            "references and train.exact_match: true) or a classifier's eval_accuracy"
        )
    value = reference["eval"][metric]
    others = [key for key in settings if key not in ("intrinsic.dim", "train.seed")]
    by_dim: dict[int, dict[str, list[float]]] = {}
    for row in rows:
        if row.get(metric) is None or "intrinsic.dim" not in row:
            continue
        combination = json.dumps({key: row.get(key) for key in others}, sort_keys=True, default=str)
        by_dim.setdefault(int(row["intrinsic.dim"]), {}).setdefault(combination, []).append(float(row[metric]))
    if not by_dim:
        raise ConfigError(f"--reference: d90 needs runs over --grid intrinsic.dim=... with {metric}")
    for dim, combinations in sorted(by_dim.items()):
        mean, combination = max((statistics.fmean(scores), c) for c, scores in combinations.items())
        if mean >= 0.9 * value:
            return dim, value, metric, json.loads(combination)
    return None, value, metric, {}
