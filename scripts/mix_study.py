"""Two trained task adapters mixed into one (docs/experiments.md, "Mixing two trained task adapters").

Per seed: the demo's date adapter (the `full` section's LoRA run at the demo's learning rate) and a numbers-in-words
adapter (the `numbers` sweep, same settings on examples/numbers), each scored alone on both tasks' held-out rows
(exact match), then mixed by `loratune mix` — `cat` (the exact weighted sum of the two updates) at weights 1/1,
0.75/0.75 and 0.5/0.5, and `linear` (PEFT's add_weighted_adapter: cross terms B₁A₂ + B₂A₁ included) at 1/1 and
0.5/0.5 — and each mix scored on both tasks. The base is scored once (it does not depend on the seed).

    python scripts/mix_study.py                  # after `scripts/experiments.sh full numbers`
    python scripts/mix_study.py --dates runs/experiments/demo/lora --numbers runs/experiments/mix/numbers

Writes --csv (default docs/experiments/mix.csv: one row per seed, adapter or mix, and task) and prints the table
(mean ± std over seeds). Each (seed, mix) is skipped when its row is already in the CSV, so a stopped study
continues where it stopped.
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

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"dates": ROOT / "examples/demo/eval.jsonl", "numbers": ROOT / "examples/numbers/eval.jsonl"}
MIXES = [("cat", 1.0), ("cat", 0.75), ("cat", 0.5), ("linear", 1.0), ("linear", 0.5)]
FIELDS = ["seed", "adapter", "task", "exact_match", "eval_loss"]


def score(loratune: str, adapters: list[Path], task: str) -> dict:
    """Exact match and loss of the base with ``adapters`` on ``task``'s held-out rows."""
    command = [loratune, "eval", "--data", str(TASKS[task]), "--max-new-tokens", "16", "--json"]
    command += [part for a in adapters for part in ("--adapter", str(a))]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        sys.exit(f"loratune eval failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout)
    return {"exact_match": result["exact_match"], "eval_loss": result["loss"]}


def mixed(loratune: str, work: Path, seed: int, method: str, weight: float, dates: Path, numbers: Path) -> Path:
    out = work / f"seed{seed}-{method}-{weight:g}"
    if not (out / "adapter_config.json").is_file():
        command = [loratune, "mix", f"{dates}:{weight}", f"{numbers}:{weight}", "--method", method]
        subprocess.run([*command, "--out", str(out), "--overwrite"], check=True, capture_output=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dates", type=Path, default=ROOT / "runs/experiments/demo/lora")
    parser.add_argument("--numbers", type=Path, default=ROOT / "runs/experiments/mix/numbers")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/experiments/mix/mixed")
    parser.add_argument("--csv", type=Path, default=ROOT / "docs/experiments/mix.csv")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--loratune", default=str(Path(sys.executable).with_name("loratune")))
    args = parser.parse_args()
    rows = list(csv.DictReader(args.csv.open())) if args.csv.is_file() else []
    done = {(r["seed"], r["adapter"], r["task"]) for r in rows}

    def record(seed: str, name: str, adapters: list[Path]) -> None:
        for task in TASKS:
            if (seed, name, task) in done:
                continue
            rows.append({"seed": seed, "adapter": name, "task": task, **score(args.loratune, adapters, task)})
            done.add((seed, name, task))
            print(f"  seed {seed} {name:12s} {task:8s} exact match {rows[-1]['exact_match']:.3f}", flush=True)
            write(args.csv, rows)

    record("-", "base", [])
    for seed in range(args.seeds):
        dates = args.dates / f"lr=2e-3,seed={seed}" / "adapter"
        numbers = args.numbers / f"seed={seed}" / "adapter"
        for path in (dates, numbers):
            if not (path / "adapter_config.json").is_file():
                sys.exit(f"no adapter at {path}: run scripts/experiments.sh full numbers first")
        record(str(seed), "dates", [dates])
        record(str(seed), "numbers", [numbers])
        for method, weight in MIXES:
            adapter = mixed(args.loratune, args.work, seed, method, weight, dates, numbers)
            record(str(seed), f"{method} {weight:g}", [adapter])
    report(rows)
    return 0


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".csv.tmp")
    with staged.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    staged.replace(path)


def report(rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["adapter"] for r in rows))
    print("\n| adapter | dates exact match | numbers exact match |\n|---|---|---|")
    for name in names:
        cells = []
        for task in TASKS:
            values = [float(r["exact_match"]) * 100 for r in rows if r["adapter"] == name and r["task"] == task]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}%{spread}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    sys.exit(main())
