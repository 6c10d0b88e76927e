"""An adapter's strength as a dial: exact match and forgetting at strengths from 0 (the base) to 2 (twice the
trained change), each point one `loratune eval --adapter DIR:STRENGTH` (exact match on the data file, forgetting
on the built-in retain set), for one adapter per seed; written as a CSV (one row per seed and strength), a plot
(mean and spread over the seeds) and a table (mean ± standard deviation).

    python scripts/strength_curve.py RUN_SEED0/adapter RUN_SEED1/adapter RUN_SEED2/adapter \
        --data examples/demo/eval.jsonl --csv docs/experiments/strength.csv --plot docs/images/strength.png
    python scripts/strength_curve.py --csv docs/experiments/strength.csv --plot docs/images/strength.png  # replot

An adapter's seed is its run's `train.seed` (the config.yaml beside it). The CSV is rewritten after every point
and the points it already holds are not evaluated again: a stopped run continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
COLUMNS = ("seed", "strength", "exact_match", "loss", "forgetting", "n")


def evaluate(adapter: Path, strength: float, args) -> dict:
    """`loratune eval`'s JSON for ``adapter`` at ``strength`` (exact match on ``args.data``, forgetting)."""
    command = [sys.executable, "-m", "loratune", "eval", "--adapter", f"{adapter}:{strength}", "--data", str(args.data)]
    command += ["--retain", "builtin", "--json", "--dtype", args.dtype]
    if args.max_examples:
        command += ["--max-examples", str(args.max_examples)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        raise SystemExit(f"loratune eval failed at strength {strength}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def seed_of(adapter: Path) -> int:
    """The seed of the run that trained ``adapter`` (its config.yaml's train.seed)."""
    config = adapter.parent / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"{adapter}: no config.yaml beside it to read its seed from; pass a run's adapter directory")
    return int(yaml.safe_load(config.read_text())["train"]["seed"])


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_csv(rows: list[dict], columns: tuple, path: Path) -> None:
    """The rows as a CSV with ``columns``, written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def write_rows(rows: list[dict], path: Path) -> None:
    """The rows, ordered by seed then strength, written as the CSV."""
    write_csv(sorted(rows, key=lambda r: (int(r["seed"]), float(r["strength"]))), COLUMNS, path)


def summary(rows: list[dict]) -> list[dict]:
    """Per strength: exact match and forgetting as mean and standard deviation over the seeds."""
    out = []
    for strength in sorted({float(r["strength"]) for r in rows}):
        at = [r for r in rows if float(r["strength"]) == strength]
        entry = {"strength": strength, "n": at[0]["n"]}
        for key in ("exact_match", "forgetting"):
            values = [float(r[key]) for r in at]
            entry[key] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def table(rows: list[dict]) -> str:
    """The markdown table docs/experiments.md shows: one column per strength, mean ± std over the seeds."""
    points = summary(rows)
    seeds = len({r["seed"] for r in rows})
    lines = ["| strength | " + " | ".join(f"{p['strength']:g}" for p in points) + " |"]
    lines.append("|---" * (1 + len(points)) + "|")
    match = [f"{100 * p['exact_match']:.1f} ± {100 * p['exact_match_std']:.1f}" for p in points]
    lines.append(f"| exact match, % ({points[0]['n']} rows, {seeds} seeds) | " + " | ".join(match) + " |")
    forgetting = [f"{p['forgetting']:.2f} ± {p['forgetting_std']:.2f}" for p in points]
    lines.append("| forgetting | " + " | ".join(forgetting) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Exact match (left axis) and forgetting (right) against the strength: each seed's points, the mean as a line,
    ± one standard deviation as a band; a PNG at ``path``."""
    points = summary(rows)
    strengths = [p["strength"] for p in points]
    figure, left = plt.subplots(figsize=(6, 3.5))
    right = left.twinx()
    for axis, key, scale, style, colour in (
        (left, "exact_match", 100, "o-", "tab:blue"),
        (right, "forgetting", 1, "s--", "tab:red"),
    ):
        mean = [scale * p[key] for p in points]
        spread = [scale * p[f"{key}_std"] for p in points]
        axis.plot(strengths, mean, style, color=colour)
        low, high = [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)]
        axis.fill_between(strengths, low, high, color=colour, alpha=0.15, linewidth=0)
        each = [(float(r["strength"]), scale * float(r[key])) for r in rows]
        axis.scatter(*zip(*each), s=6, color=colour, alpha=0.4)
    seeds = len({r["seed"] for r in rows})
    left.set_xlabel("adapter strength (1 = as trained)")
    left.set_ylabel(f"exact match, % ({points[0]['n']} rows)", color="tab:blue")
    right.set_ylabel("forgetting (retain-set loss rise)", color="tab:red")
    left.set_title(f"an adapter's strength: task against forgetting ({seeds} seeds)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    temporary.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", type=Path, nargs="*", help="one adapter directory per seed (none: replot --csv)")
    parser.add_argument("--data", type=Path, help="rows with reference answers (exact match)")
    parser.add_argument("--csv", type=Path, required=True, help="the numbers, written (or read, to replot)")
    parser.add_argument("--plot", type=Path, required=True, help="the figure (PNG)")
    parser.add_argument("--strengths", default=",".join(map(str, STRENGTHS)))
    parser.add_argument("--max-examples", type=int, default=0, help="evaluate the first N rows (default: all)")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    rows = read_rows(args.csv)
    if args.adapters and args.data is None:
        parser.error("--data is needed to evaluate an adapter")
    for adapter in args.adapters:
        seed = seed_of(adapter)
        for strength in (float(s) for s in args.strengths.split(",")):
            if any(int(r["seed"]) == seed and float(r["strength"]) == strength for r in rows):
                continue
            result = evaluate(adapter, strength, args)
            rows.append({"seed": seed, "strength": strength, **{k: result[k] for k in COLUMNS[2:]}})
            write_rows(rows, args.csv)
            match, forgetting = result["exact_match"], result["forgetting"]
            print(
                f"seed {seed}, strength {strength:.2f}: exact match {match:.3f}, forgetting {forgetting:.3f}",
                flush=True,
            )
    if not rows:
        raise SystemExit(f"{args.csv}: no rows to plot; pass the adapters to evaluate")
    plot(rows, args.plot)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
