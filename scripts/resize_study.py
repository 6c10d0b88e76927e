"""The README's "Choosing a rank" figures at three seeds. Per seed: the demo adapter trained at r = 64 (all linear
layers, lora_alpha 128), cut down afterwards by `loratune resize --rank 8` and by `--energy 0.9`, against the one
trained at r = 8 (lora_alpha 16); each scored by one `loratune eval` on the demo's held-out set (exact match, eval
loss) and measured on disk. And the spectrum of each trained adapter (`loratune rank --json`): per module, the
smallest rank keeping 50% and 90% of its update's energy; and per module the subspace similarity φ(1, 1) between
the seed's r = 8 and r = 64 adapters (`loratune compare --json`).

    python scripts/resize_study.py --r64 R64_SEED{0,1,2}/adapter --r8 R8_SEED{0,1,2}/adapter --work DIR \
        --data examples/demo/eval.jsonl --csv docs/experiments/demo/resize.csv \
        --ranks-csv docs/experiments/demo/resize_ranks.csv --phi-csv docs/experiments/demo/resize_phi.csv
    python scripts/resize_study.py --csv docs/experiments/demo/resize.csv \
        --ranks-csv docs/experiments/demo/resize_ranks.csv --phi-csv docs/experiments/demo/resize_phi.csv  # again

An adapter's seed is its run's `train.seed` (the config.yaml beside it). The CSVs are rewritten (temporary name,
then rename) after every adapter, and what they already hold is not measured again: a stopped run continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from encoder_study import mean_std
from strength_curve import read_rows, seed_of, write_csv

KINDS = {  # the table's rows, in order: what each adapter is
    "r64": "trained at r = 64",
    "r64-rank8": "`resize --rank 8` of it",
    "r64-energy0.9": "`resize --energy 0.9` of it",
    "r8": "trained at r = 8",
}
COLUMNS = ("seed", "adapter", "size_mib", "min_rank", "max_rank", "exact_match", "eval_loss", "n")
RANK_COLUMNS = ("seed", "adapter", "module", "r", "rank_at_0.5", "rank_at_0.9")
PHI_COLUMNS = ("seed", "module", "phi_1_1")


def loratune(*arguments: str) -> str:
    """Run one loratune command; its stdout (the last line of which is JSON for --json commands)."""
    done = subprocess.run(
        [sys.executable, "-m", "loratune", *arguments], capture_output=True, text=True, env=os.environ
    )
    if done.returncode != 0:
        raise SystemExit(f"loratune {arguments[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def adapter_ranks(adapter: Path) -> list[int]:
    """Each module's rank in ``adapter``: the rows of its lora_A factors (read from the file's header)."""
    with safe_open(adapter / "adapter_model.safetensors", "pt") as tensors:
        return [tensors.get_slice(key).get_shape()[0] for key in tensors.keys() if "lora_A" in key]


def measure(adapter: Path, seed: int, kind: str, args) -> dict:
    """``adapter``'s row: size on disk, its modules' ranks, exact match and loss on ``args.data``."""
    result = json.loads(
        loratune("eval", "--adapter", str(adapter), "--data", str(args.data), "--json").splitlines()[-1]
    )
    ranks = adapter_ranks(adapter)
    size = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
    return {
        "seed": seed,
        "adapter": kind,
        "size_mib": f"{size:.2f}",
        "min_rank": min(ranks),
        "max_rank": max(ranks),
        "exact_match": result["exact_match"],
        "eval_loss": result["loss"],
        "n": result["n"],
    }


def spectrum(adapter: Path, seed: int, kind: str) -> list[dict]:
    """Per module of ``adapter``: its rank and the smallest ranks keeping 50% and 90% of its energy."""
    modules = json.loads(loratune("rank", str(adapter), "--energy", "0.5,0.9", "--json").splitlines()[-1])["modules"]
    return [
        {
            "seed": seed,
            "adapter": kind,
            "module": m["name"],
            "r": m["r"],
            **{f"rank_at_{t}": m["rank_at"][t] for t in ("0.5", "0.9")},
        }
        for m in modules
    ]


def similarity(r8: Path, r64: Path, seed: int) -> list[dict]:
    """Per module: φ(1, 1) between the top input directions of ``r8``'s and ``r64``'s updates."""
    modules = json.loads(loratune("compare", str(r8), str(r64), "--json").splitlines()[-1])["modules"]
    return [{"seed": seed, "module": m["name"], "phi_1_1": m["phi_top"]} for m in modules]


def phi_line(rows: list[dict]) -> str:
    """φ(1, 1) between each seed's r = 8 and r = 64 adapters: the mean over modules per seed, and the largest."""
    seeds = sorted({int(r["seed"]) for r in rows})
    means = [statistics.fmean(float(r["phi_1_1"]) for r in rows if int(r["seed"]) == seed) for seed in seeds]
    top = max(rows, key=lambda r: float(r["phi_1_1"]))
    each = " / ".join(f"{m:.3f}" for m in means)
    return (
        f"φ(1, 1), r = 8 against r = 64 of the same seed, mean over {len(rows) // len(seeds)} modules: {each} "
        f"(seeds {', '.join(map(str, seeds))}); largest {float(top['phi_1_1']):.2f} "
        f"({top['module']}, seed {top['seed']})"
    )


def write_sorted(rows: list[dict], columns: tuple, path: Path) -> None:
    """The rows, ordered by their first three columns (the seed as a number), written as the CSV."""

    def key(row: dict) -> tuple:
        return tuple(f"{int(row[c]):04d}" if c == "seed" else str(row[c]) for c in columns[:3])

    write_csv(sorted(rows, key=key), columns, path)


def span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def results_table(rows: list[dict]) -> str:
    """The README's table: each kind of adapter's size, ranks, exact match and eval loss (mean ± std over seeds)."""
    seeds = len({r["seed"] for r in rows})
    lines = [f"| adapter | size | ranks | exact match, % ({seeds} seeds) | eval loss |", "|---|---|---|---|---|"]
    for kind, label in KINDS.items():
        at = [r for r in rows if r["adapter"] == kind]
        if not at:
            continue
        size = statistics.fmean(float(r["size_mib"]) for r in at)
        ranks = span([int(r["min_rank"]) for r in at] + [int(r["max_rank"]) for r in at])
        match = mean_std([float(r["exact_match"]) for r in at], 100)
        loss = mean_std([float(r["eval_loss"]) for r in at], digits=4)
        lines.append(f"| {label} | {size:.1f} MiB | {ranks} | {match} | {loss} |")
    return "\n".join(lines)


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def ranks_table(rows: list[dict]) -> str:
    """Per module type of the trained adapters: the median over modules (each seed's, then their range over
    seeds) and the largest over modules and seeds of the smallest rank keeping 50% and 90% of the energy."""
    lines = [
        "| adapter | module | rank for 50%: median (seeds' range), max | rank for 90%: median (seeds' range), max |",
        "|---|---|---|---|",
    ]
    for kind in ("r64", "r8"):
        at = [r for r in rows if r["adapter"] == kind]
        for mtype in sorted({module_type(r["module"]) for r in at}):
            typed = [r for r in at if module_type(r["module"]) == mtype]
            cells = []
            for key in ("rank_at_0.5", "rank_at_0.9"):
                medians = [
                    statistics.median(int(r[key]) for r in typed if r["seed"] == seed)
                    for seed in sorted({r["seed"] for r in typed})
                ]
                cells.append(f"{span([round(m) for m in medians])}, {max(int(r[key]) for r in typed)}")
            lines.append(f"| r = {kind[1:]} | {mtype} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r64", type=Path, nargs="*", default=[], help="the r = 64 adapters, one per seed")
    parser.add_argument("--r8", type=Path, nargs="*", default=[], help="the r = 8 adapters, one per seed")
    parser.add_argument("--work", type=Path, help="where the resized adapters go")
    parser.add_argument("--data", type=Path, help="rows with reference answers (exact match)")
    parser.add_argument("--csv", type=Path, required=True, help="the adapters' results, written (or read)")
    parser.add_argument("--ranks-csv", type=Path, required=True, help="the spectra, written (or read)")
    parser.add_argument("--phi-csv", type=Path, required=True, help="φ(1, 1) per module, written (or read)")
    args = parser.parse_args()
    if (args.r64 or args.r8) and (args.work is None or args.data is None):
        parser.error("--work and --data are needed to measure adapters")
    rows, ranks, phi = read_rows(args.csv), read_rows(args.ranks_csv), read_rows(args.phi_csv)

    def done(seed: int, kind: str, table: list[dict]) -> bool:
        return any(int(r["seed"]) == seed and r["adapter"] == kind for r in table)

    def add(adapter: Path, seed: int, kind: str) -> None:
        if not done(seed, kind, rows):
            rows.append(measure(adapter, seed, kind, args))
            write_sorted(rows, COLUMNS, args.csv)
            print(f"seed {seed}, {kind}: exact match {float(rows[-1]['exact_match']):.3f}", flush=True)

    for kind, adapters in (("r64", args.r64), ("r8", args.r8)):
        for adapter in adapters:
            seed = seed_of(adapter)
            if not done(seed, kind, ranks):
                ranks.extend(spectrum(adapter, seed, kind))
                write_sorted(ranks, RANK_COLUMNS, args.ranks_csv)
            add(adapter, seed, kind)
            if kind != "r64":
                continue
            for name, option in (("r64-rank8", ["--rank", "8"]), ("r64-energy0.9", ["--energy", "0.9"])):
                out = args.work / f"seed={seed}" / name
                if not done(seed, name, rows):
                    loratune("resize", str(adapter), *option, "--out", str(out), "--overwrite")
                add(out, seed, name)
    for r8, r64 in zip(args.r8, args.r64):
        seed = seed_of(r8)
        if seed_of(r64) != seed:
            raise SystemExit(f"{r8} and {r64} are of different seeds; pass --r8 and --r64 in the same seed order")
        if not any(int(r["seed"]) == seed for r in phi):
            phi.extend(similarity(r8, r64, seed))
            write_sorted(phi, PHI_COLUMNS, args.phi_csv)
    if not rows:
        raise SystemExit(f"{args.csv}: no rows; pass the adapters to measure")
    print(results_table(rows))
    print()
    print(ranks_table(ranks))
    if phi:
        print()
        print(phi_line(phi))
    return 0


if __name__ == "__main__":
    sys.exit(main())
