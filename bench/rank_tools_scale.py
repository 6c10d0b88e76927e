"""The rank tools on 7B-shaped weights: ``loratune rank --tuned`` and ``loratune extract`` read a full
fine-tune block by block; this measures their extra memory against the largest single weight matrix, and
their time per matrix.

It writes a Llama-2-7B-shaped base (hidden 4096, intermediate 11008, vocabulary of the built-in model) with
``--layers`` decoder layers (default 2; the per-matrix figures do not depend on the layer count), and a
"tuned" copy in which every matrix moved by a rank-``--true-rank`` update plus small noise, like a real
fine-tune; norms moved too. Then it runs each command in its own process, polling its resident memory, and a
process that only imports the same modules, for the baseline.

    python bench/rank_tools_scale.py /work/scratch-rank [--layers 2] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


def make_models(out: Path, layers: int, true_rank: int) -> tuple[Path, Path]:
    base, tuned = out / "base", out / "tuned"
    if not (base / "config.json").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "make_random_llama.py"), str(base), "--layers", str(layers)],
            check=True,
        )
    if (tuned / "config.json").is_file():
        return base, tuned
    tuned.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for key, w in tensors.items():
            if w.ndim == 2:  # ΔW = U·Vᵀ (rank true_rank) + noise, at 1% of the weights' scale
                u = torch.randn(w.shape[0], true_rank, generator=gen) * 2e-3
                v = torch.randn(true_rank, w.shape[1], generator=gen)
                tensors[key] = (w.float() + u @ v + 2e-5 * torch.randn(w.shape, generator=gen)).to(w.dtype)
            else:
                tensors[key] = (w.float() * 1.01).to(w.dtype)
        save_file(tensors, str(tuned / shard.name), metadata={"format": "pt"})
        del tensors
    for other in base.iterdir():
        if other.suffix != ".safetensors":
            (tuned / other.name).write_bytes(other.read_bytes())
    return base, tuned


def run_watched(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, stdout) of ``cmd``, polling /proc every 20 ms."""
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())},
    )
    peak = [0.0]

    def poll():
        while process.poll() is None:
            try:
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except OSError:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=poll)
    watcher.start()
    out, _ = process.communicate()
    watcher.join()
    if process.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return peak[0], time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--true-rank", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="extract --rank")
    parser.add_argument("--max-rank", type=int, default=64, help="rank --tuned --max-rank")
    args = parser.parse_args()
    base, tuned = make_models(args.workdir, args.layers, args.true_rank)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    import math

    from safetensors import safe_open

    largest, count = 0, 0
    for key, name in index["weight_map"].items():
        with safe_open(str(base / name), "pt") as handle:
            shape = handle.get_slice(key).get_shape()
        if len(shape) == 2:
            largest, count = max(largest, math.prod(shape) * 2), count + 1
    largest_mib = largest / 2**20
    loratune = [sys.executable, "-m", "loratune.cli.main"]
    baseline, _, _ = run_watched(
        [
            sys.executable,
            "-c",
            "import loratune.cli.main, loratune.cli.rank_tools, "
            "loratune.analysis, loratune.models.structure, transformers, torch",
        ]
    )
    print(f"{count} weight matrices, the largest {largest_mib:.0f} MiB (bf16); baseline process {baseline:.0f} MiB")
    rows = []
    for label, cmd in (
        (
            f"rank --tuned --max-rank {args.max_rank}",
            [
                *loratune,
                "rank",
                "--model",
                str(base),
                "--tuned",
                str(tuned),
                "--max-rank",
                str(args.max_rank),
                "--json",
            ],
        ),
        (
            f"extract --rank {args.rank}",
            [
                *loratune,
                "extract",
                "--model",
                str(base),
                "--tuned",
                str(tuned),
                "--rank",
                str(args.rank),
                "--out",
                str(args.workdir / "extracted"),
                "--overwrite",
                "--json",
            ],
        ),
    ):
        peak, seconds, out = run_watched(cmd)
        extra = peak - baseline
        methods = {m.get("method") for m in json.loads(out)["modules"]}
        rows.append((label, peak, extra, extra / largest_mib, seconds, seconds / count, methods))
        print(
            f"{label}: peak {peak:.0f} MiB, extra {extra:.0f} MiB = {extra / largest_mib:.2f}x the largest matrix, "
            f"{seconds:.0f} s ({seconds / count:.1f} s per matrix, SVD {', '.join(sorted(methods))})",
            flush=True,
        )
    print()
    print("| command | peak RSS (MiB) | extra over imports (MiB) | × largest matrix | seconds | s per matrix |")
    print("|---|---|---|---|---|---|")
    for label, peak, extra, ratio, seconds, per, _ in rows:
        print(f"| `{label}` | {peak:.0f} | {extra:.0f} | {ratio:.2f}× | {seconds:.0f} | {per:.1f} |")


if __name__ == "__main__":
    main()
