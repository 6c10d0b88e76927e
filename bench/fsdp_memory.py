"""Per-process peak memory of a 2-process run on a larger random Llama: DDP (every process holds the whole base)
against FSDP2 (each block sharded as it is read), in bf16 and over a 4-bit (nf4) base. Each process has one
thread; the peak is each process's peak RSS over the whole run, loading included (``summary.json``'s
``peak_memory_mb_per_process``).

    python bench/fsdp_memory.py                       # ~0.6B parameters (16 layers of 1536), 2 steps each
    python bench/fsdp_memory.py --layers 24 --hidden 2048 --intermediate 5632

The model is written once into --workdir with bench/make_random_llama.py (its tokenizer: smollm2-135m's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def make_model(args) -> Path:
    out = args.workdir / f"llama-{args.layers}x{args.hidden}"
    if not (out / "config.json").is_file():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "make_random_llama.py"),
                str(out),
                "--layers",
                str(args.layers),
                "--hidden",
                str(args.hidden),
                "--intermediate",
                str(args.intermediate),
                "--heads",
                str(args.heads),
                "--kv-heads",
                str(args.heads),
            ],
            check=True,
        )
    return out


def run(model: Path, args, distributed: str, quantize: str | None) -> dict:
    name = f"{distributed}-{quantize or 'bf16'}"
    out = args.workdir / f"run-{name}"
    config = {
        "model": {"name": str(model), "dtype": "bf16", "quantize": quantize},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "data": {"train": str(ROOT / "examples" / "demo" / "train.jsonl"), "max_length": args.length},
        "train": {
            "max_steps": args.steps,
            "batch_size": 1,
            "lr": 2e-4,
            "log_every": 1,
            "save_every": 10_000,
            "seed": 0,
            "distributed": distributed,
        },
        "output_dir": str(out),
    }
    path = args.workdir / f"config-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}  # --nproc 2: one each
    result = subprocess.run(
        [sys.executable, "-m", "loratune", "train", str(path), "--nproc", "2", "--no-progress", "--overwrite"],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    held = re.search(
        r"each holds ([0-9.]+) of the weights' ([0-9.]+) MiB.*peak memory so far ([0-9., ]+) MiB", result.stdout
    )
    return {
        "run": name,
        "peaks": summary["peak_memory_mb_per_process"],
        "held": float(held[1]) if held else None,
        "weights": float(held[2]) if held else None,
        "loading": held[3] if held else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loratune-fsdp-memory"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(args)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    print(f"model: {model} ({weights:,.0f} MiB of bf16 weights); 2 processes, one thread each")
    results = {}
    for quantize in (None, "nf4"):
        for distributed in ("ddp", "fsdp"):
            result = run(model, args, distributed, quantize)
            results[result["run"]] = result
            held = (
                f"; holds {result['held']:,.0f} of {result['weights']:,.0f} MiB, peak after loading "
                f"{result['loading']} MiB"
                if result["held"]
                else ""
            )
            print(
                f"{result['run']:>10}: peak per process {', '.join(f'{p:,.0f}' for p in result['peaks'])} MiB{held}",
                flush=True,
            )
    for quantize in ("bf16", "nf4"):
        ddp, fsdp = (max(results[f"{d}-{quantize}"]["peaks"]) for d in ("ddp", "fsdp"))
        print(f"{quantize}: FSDP2 / DDP peak per process {fsdp / ddp:.2f}×")


if __name__ == "__main__":
    main()
