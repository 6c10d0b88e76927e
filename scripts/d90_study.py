"""d90 by the intrinsic-dimension paper's definition (docs/experiments.md, "A sentence-pair classifier: d90 by the
paper's definition"): the smallest d whose intrinsic run reaches 90% of full fine-tuning's score — a classifier's
accuracy, a language model's exact match — each d at the learning rate that did best on seed 0, then three seeds.
`scripts/experiments.sh d90pairs` (and `d90demo`, the demo task) runs it:

    python scripts/d90_study.py choose docs/experiments/pairs/d90-lr/runs   # "dim lr" per d: seed 0's best rate
    python scripts/d90_study.py report docs/experiments/pairs               # tables, d90.csv, docs/images plot

Both read only the runs' records (config.yaml, summary.json, metrics.jsonl; scripts/experiment_records.py), so
the report can be checked from the repository alone. The score is read two ways, as the reference's: at the end
of training, and the best of the evaluations every run makes (full fine-tuning overfits the sentence-pair set, so
its best comes early; a run that evaluates only at its end has one reading). The crossing is interpolated
linearly in log d between the grid's two points around it; a d90 the grid does not reach is reported as
"> max d", one its smallest d already reaches as "≤ min d".
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("eval_accuracy", "eval_exact_match")  # a classifier's accuracy, a language model's exact match
FIELDS = ["dim", "lr", "seed", "accuracy_end", "accuracy_best", "best_step", "eval_loss", "train_seconds"]


def read_run(run: Path) -> dict:
    """One finished run's settings and accuracies from its record."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    metric = next(name for name in METRICS if summary["eval"].get(name) is not None)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if f'"{metric}"' in line]
    best = max((e for e in evals if e["step"] > 0), key=lambda e: e[metric], default={"step": summary["steps"]})
    return {
        "dim": (config.get("intrinsic") or {}).get("dim") if config["train"]["method"] == "intrinsic" else None,
        "lr": config["train"]["lr"],
        "seed": config["train"]["seed"],
        "accuracy_end": summary["eval"][metric],
        "accuracy_best": best.get(metric, summary["eval"][metric]),
        "best_step": best["step"],
        "eval_loss": summary["eval"]["eval_loss"],
        "train_seconds": summary["train_seconds"],
    }


def read_runs(records: Path) -> list[dict]:
    return [read_run(run) for run in sorted(records.glob("*/")) if (run / "summary.json").is_file()]


def chosen_rates(grid: list[dict]) -> dict[int, float]:
    """Per d, the learning rate whose seed-0 run ended with the highest accuracy (the lower rate on a tie)."""
    best: dict[int, dict] = {}
    for row in sorted(grid, key=lambda r: r["lr"]):
        if row["dim"] not in best or row["accuracy_end"] > best[row["dim"]]["accuracy_end"]:
            best[row["dim"]] = row
    return {dim: row["lr"] for dim, row in sorted(best.items())}


def crossing(dims: list[int], means: list[float], bar: float) -> str:
    """d90 read from means over the grid (ascending dims): the smallest d at or above ``bar``, with the crossing
    interpolated in log d from the point below it."""
    for i, (dim, mean) in enumerate(zip(dims, means)):
        if mean >= bar:
            if i == 0:
                return f"≤ {dim:,}"
            lo, hi = dims[i - 1], dim
            t = (bar - means[i - 1]) / (mean - means[i - 1])
            return f"{dim:,} (interpolated {10 ** (math.log10(lo) + t * math.log10(hi / lo)):,.0f})"
    return f"> {dims[-1]:,}" if dims else "no runs"


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}%"


def report(
    pairs: Path, csv_path: Path, plot: Path, reference_lr: float | None, lora_lr: float | None, title: str
) -> int:
    full = [r for r in read_runs(pairs / "full/runs") if reference_lr is None or r["lr"] == reference_lr]
    lora = [r for r in read_runs(pairs / "lora/runs") if lora_lr is None or r["lr"] == lora_lr]
    grid = read_runs(pairs / "d90-lr/runs")
    if not full or not grid:
        sys.exit(f"d90_study: no full fine-tuning records under {pairs / 'full/runs'} or no grid under {pairs}")
    rates = chosen_rates(grid)
    print("Learning-rate grid, seed 0 (accuracy at the end / best evaluation):\n")
    lrs = sorted({row["lr"] for row in grid})
    print("| d | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |")
    print("|---|" + "---|" * (len(lrs) + 1))
    for dim in sorted(rates):
        cells = []
        for lr in lrs:
            row = next((r for r in grid if r["dim"] == dim and r["lr"] == lr), None)
            cells.append(f"{100 * row['accuracy_end']:.1f} / {100 * row['accuracy_best']:.1f}%" if row else "—")
        print(f"| {dim:,} | " + " | ".join(cells) + f" | {rates[dim]:g} |")

    rows = []
    for dim, lr in rates.items():
        rows += [r for r in grid if r["dim"] == dim and r["lr"] == lr]
        rows += [r for r in read_runs(pairs / f"d90/dim={dim}/runs") if r["lr"] == lr]
    rows.sort(key=lambda r: (r["dim"], r["seed"]))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    readings = {}
    print("\nEach d at its chosen rate (mean ± std over seeds):\n")
    print("| d | lr | seeds | accuracy at the end | best evaluation | train time |")
    print("|---|---|---|---|---|---|")
    for dim in sorted(rates):
        runs = [r for r in rows if r["dim"] == dim]
        print(
            f"| {dim:,} | {rates[dim]:g} | {len(runs)} | {mean_std([r['accuracy_end'] for r in runs])} | "
            f"{mean_std([r['accuracy_best'] for r in runs])} | "
            f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} s |"
        )
    for reading in ("accuracy_end", "accuracy_best"):
        reference = statistics.fmean(r[reading] for r in full)
        dims = sorted(rates)
        means = [statistics.fmean(r[reading] for r in rows if r["dim"] == dim) for dim in dims]
        readings[reading] = (reference, dims, means)
        name = "at the end" if reading == "accuracy_end" else "at the best evaluation"
        print(
            f"\nd90 {name}: full fine-tuning {100 * reference:.1f}% ({len(full)} seeds), 90% of it "
            f"{90 * reference:.1f}% → d90 {crossing(dims, means, 0.9 * reference)}"
        )
    draw(readings, lora, rows, plot, title)
    print(f"\nwrote {csv_path} and {plot}")
    return 0


def draw(readings: dict, lora: list[dict], rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (reading, (reference, dims, means)) in zip(axes, readings.items()):
        spreads = [statistics.stdev([r[reading] for r in rows if r["dim"] == dim]) for dim in dims]
        ax.errorbar(
            dims,
            [100 * m for m in means],
            yerr=[100 * s for s in spreads],
            marker="o",
            capsize=3,
            label="intrinsic (SAID), mean ± std",
        )
        ax.axhline(100 * reference, color="black", label="full fine-tuning")
        ax.axhline(90 * reference, color="black", linestyle="--", label="90% of full fine-tuning")
        if lora:
            ax.axhline(
                100 * statistics.fmean(r[reading] for r in lora),
                color="tab:green",
                linestyle=":",
                label="LoRA r=8",
            )
        ax.set_xscale("log")
        ax.set_xticks(dims, [f"{dim:,}" for dim in dims], rotation=45, ha="right")
        ax.minorticks_off()
        ax.set_xlabel("d (θ and SAID's λ, one per target tensor)")
        ax.set_title("at the end of training" if reading == "accuracy_end" else "at the best evaluation")
    axes[0].set_ylabel("held-out accuracy or exact match (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    choose = commands.add_parser("choose", help='print "dim lr" for each d of the grid: seed 0\'s best rate')
    choose.add_argument("records", type=Path, help="the learning-rate grid's run records")
    done = commands.add_parser("report", help="the tables, the rows (CSV) and the plot")
    done.add_argument("pairs", type=Path, help="a task's records: docs/experiments/pairs (full/, lora/, d90-lr/, d90/)")
    done.add_argument("--csv", type=Path, default=ROOT / "docs/experiments/pairs/d90.csv")
    done.add_argument("--plot", type=Path, default=ROOT / "docs/images/d90_pairs.png")
    done.add_argument("--reference-lr", type=float, help="only the full fine-tuning runs at this rate (default: all)")
    done.add_argument("--lora-lr", type=float, help="only the LoRA runs at this rate (default: all)")
    done.add_argument("--title", default="d90 on the sentence-pair task (MiniLM, 22.7M parameters projected)")
    args = parser.parse_args()
    if args.command == "choose":
        for dim, lr in chosen_rates(read_runs(args.records)).items():
            print(dim, lr)
        return 0
    return report(args.pairs, args.csv, args.plot, args.reference_lr, args.lora_lr, args.title)


if __name__ == "__main__":
    sys.exit(main())
