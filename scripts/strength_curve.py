"""An adapter's strength as a dial: exact match and forgetting at strengths from 0 (the base) to 2 (twice the
trained change), each point one `loratune eval --adapter DIR:STRENGTH` (exact match on the data file, forgetting
on the built-in retain set), written as a CSV and a plot.

    python scripts/strength_curve.py runs/demo/adapter --data examples/demo/eval.jsonl \
        --csv docs/experiments/strength.csv --plot docs/images/strength.png
    python scripts/strength_curve.py --csv docs/experiments/strength.csv --plot docs/images/strength.png  # replot
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


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


def plot(rows: list[dict], path: Path) -> None:
    """Exact match (left axis) and forgetting (right) against the strength, as a PNG at ``path``."""
    figure, left = plt.subplots(figsize=(6, 3.5))
    strengths = [float(r["strength"]) for r in rows]
    left.plot(strengths, [100 * float(r["exact_match"]) for r in rows], "o-", color="tab:blue")
    left.set_xlabel("adapter strength (1 = as trained)")
    left.set_ylabel(f"exact match, % ({rows[0]['n']} rows)", color="tab:blue")
    right = left.twinx()
    right.plot(strengths, [float(r["forgetting"]) for r in rows], "s--", color="tab:red")
    right.set_ylabel("forgetting (retain-set loss rise)", color="tab:red")
    left.set_title("an adapter's strength: task against forgetting")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, nargs="?", help="the adapter directory (none: replot --csv)")
    parser.add_argument("--data", type=Path, help="rows with reference answers (exact match)")
    parser.add_argument("--csv", type=Path, required=True, help="the numbers, written (or read, to replot)")
    parser.add_argument("--plot", type=Path, required=True, help="the figure (PNG)")
    parser.add_argument("--strengths", default=",".join(map(str, STRENGTHS)))
    parser.add_argument("--max-examples", type=int, default=0, help="evaluate the first N rows (default: all)")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    if args.adapter is None:
        with args.csv.open() as handle:
            plot(list(csv.DictReader(handle)), args.plot)
        return 0
    if args.data is None:
        parser.error("--data is needed to evaluate an adapter")
    rows = []
    for strength in (float(s) for s in args.strengths.split(",")):
        result = evaluate(args.adapter, strength, args)
        rows.append({"strength": strength, **{k: result[k] for k in ("exact_match", "loss", "forgetting", "n")}})
        match, forgetting = result["exact_match"], result["forgetting"]
        print(f"strength {strength:.2f}: exact match {match:.3f}, forgetting {forgetting:.3f}", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
