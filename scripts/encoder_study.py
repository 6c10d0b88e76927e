"""The encoder table (docs/experiments.md, "An encoder: LoRA, full fine-tuning, BitFit and the head alone") with a
learning rate per method, as the LoRA and BitFit papers tune theirs: each method's small grid on seed 0, the rate
that did best on the eval split, then seeds 1 and 2 at it (METHOD/lr=RATE). `scripts/experiments.sh encoder` runs
it:

    python scripts/encoder_study.py choose docs/experiments/encoder/lora-lr/runs   # the rate seed 0 did best with
    python scripts/encoder_study.py report docs/experiments/encoder                # the tables and encoder.csv

Both read only the runs' records (config.yaml, summary.json; scripts/experiment_records.py), so the table can be
checked from the repository alone. "Best" is the higher final accuracy, then the lower eval loss (several
methods reach every held-out row, where the loss still tells them apart), then the lower rate.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
METHODS = {  # the sweeps' names, the table's rows in order
    "full": "full fine-tuning",
    "bitfit": "BitFit (biases + head)",
    "lora": "LoRA r=8, W_q W_v (+ head)",
    "head": "head only",
}
FIELDS = [
    "method",
    "lr",
    "seed",
    "accuracy",
    "eval_loss",
    "final_loss",
    "trainable_params",
    "peak_memory_mb",
    "train_seconds",
]


def read_run(run: Path, method: str) -> dict:
    """One finished run's settings and results from its record."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    return {
        "method": method,
        "lr": config["train"]["lr"],
        "seed": config["train"]["seed"],
        "accuracy": summary["eval"]["eval_accuracy"],
        "eval_loss": summary["eval"]["eval_loss"],
        "final_loss": summary["final_loss"],
        "trainable_params": summary["trainable_params"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "train_seconds": summary["train_seconds"],
    }


def read_runs(records: Path, method: str) -> list[dict]:
    return [read_run(run, method) for run in sorted(records.glob("*/")) if (run / "summary.json").is_file()]


def chosen_rate(grid: list[dict]) -> float:
    """The rate whose seed-0 run did best: the higher accuracy, then the lower eval loss, then the lower rate."""
    return min(grid, key=lambda r: (-r["accuracy"], r["eval_loss"], r["lr"]))["lr"]


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def report(encoder: Path, csv_path: Path) -> int:
    grids = {m: read_runs(encoder / f"{m}-lr/runs", m) for m in METHODS}
    missing = [m for m, grid in grids.items() if not grid]
    if missing:
        sys.exit(f"encoder_study: no grid records for {', '.join(missing)} under {encoder}")
    print("Learning-rate grid, seed 0 (held-out accuracy / eval loss):\n")
    print("| method | rates tried: accuracy / eval loss | chosen |")
    print("|---|---|---|")
    chosen = {}
    for method, grid in grids.items():
        chosen[method] = chosen_rate(grid)
        cells = ", ".join(
            f"{r['lr']:g}: {100 * r['accuracy']:.1f}% / {r['eval_loss']:.3f}"
            for r in sorted(grid, key=lambda r: r["lr"])
        )
        print(f"| {METHODS[method]} | {cells} | {chosen[method]:g} |")

    rows = []
    for method, grid in grids.items():
        rows += [r for r in grid if r["lr"] == chosen[method]]
        rows += read_runs(encoder / method / f"lr={chosen[method]}" / "runs", method)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])))

    print("\nEach method at its chosen rate (mean ± std over seeds):\n")
    print("| method | lr | seeds | trainable params | accuracy (%) | eval loss | peak memory (MB) | train seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for method in METHODS:
        runs = [r for r in rows if r["method"] == method]
        print(
            f"| {METHODS[method]} | {chosen[method]:g} | {len(runs)} | {runs[0]['trainable_params']:,} | "
            f"{mean_std([r['accuracy'] for r in runs], 100)} | {mean_std([r['eval_loss'] for r in runs], digits=3)} | "
            f"{mean_std([r['peak_memory_mb'] for r in runs], digits=0)} | "
            f"{mean_std([r['train_seconds'] for r in runs])} |"
        )
    print(f"\nwrote {csv_path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    choose = commands.add_parser("choose", help="print the rate the grid's seed-0 run did best with")
    choose.add_argument("records", type=Path, help="one method's learning-rate grid records")
    done = commands.add_parser("report", help="the tables and the rows (CSV)")
    done.add_argument("encoder", type=Path, help="docs/experiments/encoder (METHOD-lr/ and METHOD/lr=RATE/ each)")
    done.add_argument("--csv", type=Path, default=ROOT / "docs/experiments/encoder.csv")
    args = parser.parse_args()
    if args.command == "choose":
        grid = read_runs(args.records, args.records.parent.name)
        if not grid:
            sys.exit(f"encoder_study: no finished runs under {args.records}")
        print(chosen_rate(grid))
        return 0
    return report(args.encoder, args.csv)


if __name__ == "__main__":
    sys.exit(main())
