"""Training throughput at 1 and N processes (torchrun; DDP, and FSDP2 over the frozen base), each process with the
same number of threads, so the comparison is fair: the demo fine-tune on the built-in model, the same global batch.

    python bench/ddp_scaling.py                       # 1 vs 2 processes, one thread each, 12 steps of 8 x 128
    python bench/ddp_scaling.py --nproc 4 --threads 2 --steps 20

Reported: tokens/s of the run (global tokens over rank 0's step time, the median step) and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def run(nproc: int, threads: int, args, workdir: Path, distributed: str = "auto") -> float:
    out = workdir / f"run-{nproc}-{distributed}"
    config = {
        "model": {"name": args.model, "dtype": args.dtype},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"train": str(ROOT / "examples" / "demo" / "train.jsonl"), "max_length": args.length},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch // nproc,
            "lr": 2e-4,
            "log_every": 1,
            "save_every": 10_000,
            "seed": 0,
            "distributed": distributed,
        },
        "output_dir": str(out),
    }
    path = workdir / f"config-{nproc}-{distributed}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads * nproc), "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "loratune", "train", str(path), "--no-progress", "--overwrite"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]  # --nproc gives each process OMP_NUM_THREADS / nproc threads
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records if "loss" in r and r["step"] > 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--batch", type=int, default=8, help="global micro-batch")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.threads, args, Path(tmp))
        many = run(args.nproc, args.threads, args, Path(tmp))
        sharded = run(args.nproc, args.threads, args, Path(tmp), "fsdp")
    print(
        f"{args.model}, {args.dtype}, global batch {args.batch} x {args.length} (demo rows), {args.threads} thread(s) "
        f"per process"
    )
    print(
        f"| processes | tokens/s |\n|---|---|\n| 1 | {one:.0f} |\n| {args.nproc}, DDP | {many:.0f} |\n"
        f"| {args.nproc}, FSDP2 | {sharded:.0f} |"
    )
    print(f"speed-up {many / one:.2f}x (DDP), {sharded / one:.2f}x (FSDP2) on {args.nproc} processes")


if __name__ == "__main__":
    main()
