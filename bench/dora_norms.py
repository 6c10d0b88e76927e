"""DoRA's row norms ‖W0 + s·B·A‖_c: loratune's way (W0's row norms once, then W0·Aᵀ and the r × r Gram matrix
A·Aᵀ per step) against forming the dense out × in sum per step (what PEFT does), at the shapes of smollm2-135m's
projections and of a 7B model's, in bf16 (the training dtype) and float32. Reported: time per call (best of
several), the extra memory each allocates, and the largest relative difference between the two.

    python bench/dora_norms.py
"""

from __future__ import annotations

import time

import torch

from loratune.layers.dora import row_norms, squared_row_norms

SHAPES = {  # (out, in) of the distinct projection shapes
    "smollm2-135m q/o (576 × 576)": (576, 576),
    "smollm2-135m k/v (192 × 576)": (192, 576),
    "smollm2-135m gate/up (1536 × 576)": (1536, 576),
    "smollm2-135m down (576 × 1536)": (576, 1536),
    "7B q (4096 × 4096)": (4096, 4096),
    "7B gate (11008 × 4096)": (11008, 4096),
}
R, SCALE = 8, 2.0


def best_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def dense_norms(weight, A, B, scale):
    return torch.linalg.norm(weight + scale * (B.to(weight.dtype) @ A.to(weight.dtype)), dim=1)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, r = {R}")
    print(
        "| shape | dtype | dense W0 + s·B·A | loratune | speed-up | dense extra memory | loratune extra memory "
        "| max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, (out, inp) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            weight = (torch.randn(out, inp) / inp**0.5).to(dtype)
            A, B = torch.randn(R, inp) / inp**0.5, torch.randn(out, R) * 0.01
            squares = squared_row_norms(weight)  # once per weight, not per step
            dense_t = best_seconds(lambda w=weight, a=A, b=B: dense_norms(w, a, b, SCALE))
            ours_t = best_seconds(lambda w=weight, a=A, b=B, q=squares: row_norms(w, a, b, SCALE, q))
            exact = dense_norms(weight.double(), A.double(), B.double(), SCALE)
            ours_err = ((row_norms(weight, A, B, SCALE, squares).double() - exact).abs() / exact).max().item()
            dense_err = ((dense_norms(weight, A, B, SCALE).double() - exact).abs() / exact).max().item()
            size = torch.finfo(dtype).bits // 8
            dense_mb = 2 * out * inp * size / 2**20  # B·A and the sum, out × in each
            ours_mb = (out * R * 2 * 4 + R * R * 4) / 2**20  # W0·Aᵀ, B·(A·Aᵀ) in float32, the Gram matrix
            print(
                f"| {label} | {str(dtype).removeprefix('torch.')} | {1e3 * dense_t:.2f} ms | {1e3 * ours_t:.2f} ms | "
                f"{dense_t / ours_t:.1f}x | {dense_mb:.1f} MiB | {ours_mb:.2f} MiB | "
                f"ours {ours_err:.1e}, dense {dense_err:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
