"""Intrinsic-dimension training's projection, the compiled kernel against PyTorch's operations, side by side.

1. The projection alone: P·θ and its gradient Pᵀ·g for MiniLM's D (every parameter of the built-in
   all-MiniLM-L6-v2 classifier but its head: 22.7M) at several d, each path's median time (the kernel:
   `csrc/fastfood_body.h`; PyTorch: the same transform as Kronecker products of 32 × 32 Sylvester matrices,
   gathers and products, `train.projection.hadamard`), and the ratio.
2. A training step: MiniLM on batch 32 × 64 tokens of sentence pairs, every parameter projected (SAID, d =
   1,000), forward, backward and the optimizer, with each path for the projection (the model's own operations
   the same in both).

    python bench/intrinsic_projection.py              # about a minute on 2 cores
    python bench/intrinsic_projection.py --dims 500,5000 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from loratune.kernels import use_isa
from loratune.train.projection import FastfoodProjection

MINILM_D = 22_713_216  # all-MiniLM-L6-v2's parameters (a tied tensor once), its classifier head apart


def median_ms(run, repeats: int) -> float:
    run()  # warm: first-touch of the output pages, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def timed(P: FastfoodProjection, theta: torch.Tensor, g: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(P·θ, Pᵀ·g) in ms: the forward alone, and forward with backward less the forward."""
    forward = median_ms(lambda: P(theta.detach()), repeats)
    both = median_ms(lambda: torch.autograd.grad(P(theta), theta, g), repeats)
    return forward, both - forward


def projection(dims: list[int], repeats: int) -> None:
    print(f"## P·θ and Pᵀ·g, D = {MINILM_D:,} (median of {repeats}, ms)\n")
    print("| d | kernel P·θ | kernel Pᵀ·g | PyTorch P·θ | PyTorch Pᵀ·g | PyTorch / kernel (both) |")
    print("|---|---|---|---|---|---|")
    for d in dims:
        P = FastfoodProjection(d, MINILM_D, seed=0)
        theta = torch.randn(d, requires_grad=True)
        g = torch.randn(MINILM_D)
        row = [*timed(P, theta, g, repeats)]
        with use_isa("none"):
            row += timed(P, theta, g, repeats)
        print(
            f"| {d:,} | {row[0]:.0f} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} | "
            f"{(row[2] + row[3]) / (row[0] + row[1]):.1f}× |"
        )


def training_step(repeats: int) -> None:
    from loratune.data.classification import label_space, read_classification
    from loratune.models import load_classifier
    from loratune.train.trained import TrainedIntrinsic

    space = label_space(read_classification(Path(__file__).resolve().parent.parent / "examples/pairs/train.jsonl"))
    model, tokenizer = load_classifier("minilm-l6", space, "fp32", "cpu")
    trained = TrainedIntrinsic(model, 1000, 0, True, "all", head=["classifier"])
    optimizer = torch.optim.AdamW(trained.parameters(), lr=0.1)
    model.train()
    first = ["set a timer for ten minutes and tell me when the pasta is done"] * 32
    second = ["start a 10 minute timer, let me know when the pasta is ready"] * 32
    batch = tokenizer(first, second, return_tensors="pt", padding="max_length", max_length=64)
    labels = torch.zeros(32, dtype=torch.long)

    def step():
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()

    print(f"\n## A training step: MiniLM, batch 32 × 64, every parameter projected, d = 1,000 (median of {repeats})\n")
    kernel = median_ms(step, repeats)
    projection = trained.weights.projection
    projection._kernel_takes = lambda x: False  # the projection alone in PyTorch: the model's kernels unchanged
    plain = median_ms(step, repeats)
    print("| path | step | PyTorch / kernel |\n|---|---|---|")
    print(f"| kernel | {kernel:.0f} ms | {plain / kernel:.2f}× |\n| PyTorch operations | {plain:.0f} ms | 1.00× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="1000,2000,20000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("projection", "step"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.only in (None, "projection"):
        projection([int(d) for d in args.dims.split(",")], args.repeats)
    if args.only in (None, "step"):
        training_step(args.repeats)


if __name__ == "__main__":
    main()
