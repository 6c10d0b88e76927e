"""Attention for training, one block: loratune's (``train.attention``: the CPU flash forward, the backward from
the compiled scores kernel and batched products) vs PyTorch's SDPA (the CPU flash kernel forward and backward),
side by side in one process, alternating, at smollm2-135m's shapes.

    python bench/attention_backward.py [--batch 8] [--length 256] [--heads 9] [--kv-heads 3] [--head-dim 64]
                                       [--dtype bf16] [--reps 30]

Prints the median forward and forward+backward time of each and their ratio, and which kernel path ran
(AMX tiles, AVX512-BF16 pair products or float32 FMAs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()

    from loratune.kernels import isa
    from loratune.train.attention import AttentionFunction

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    b, h, kv, n, d = args.batch, args.heads, args.kv_heads, args.length, args.head_dim
    # the layout transformers hands attention: [batch, length, heads, head_dim] seen as [batch, heads, length, d]
    q = torch.randn(b, n, h, d, generator=generator).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, n, kv, d, generator=generator).to(dtype).transpose(1, 2).requires_grad_()
    v = torch.randn(b, n, kv, d, generator=generator).to(dtype).transpose(1, 2).requires_grad_()
    grad = torch.randn(b, n, h, d, generator=generator).to(dtype).transpose(1, 2)
    scale = d**-0.5

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def ours():
        return AttentionFunction.apply(q, k, v, None, True, scale)

    def timed(fn, backward: bool) -> float:
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        out = fn()
        if backward:
            out.backward(grad)
        return time.perf_counter() - start

    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(3):  # warm-up
        for fn in (sdpa, ours):
            timed(fn, True)
    for _ in range(args.reps):
        for name, fn in (("sdpa", sdpa), ("loratune", ours)):
            for backward in (False, True):
                times.setdefault((name, backward), []).append(timed(fn, backward))
    median = {key: statistics.median(value) * 1e3 for key, value in times.items()}
    variant = isa()
    path = (
        "AMX tiles"
        if variant == "amx" and dtype == torch.bfloat16 and d % 32 == 0 and h // kv * n % 16 == 0
        else "AVX512-BF16 pair products"
        if variant in ("avx512bf16", "amx") and dtype == torch.bfloat16 and d % 2 == 0
        else "float32 FMAs"
    )
    print(
        f"attention, causal, {args.dtype}, batch {b} x {n}, {h} query / {kv} key-value heads of {d}; "
        f"{torch.get_num_threads()} threads; kernel: {variant}, products: {path}; medians of {args.reps}"
    )
    print("| | forward (ms) | forward + backward (ms) | backward alone (ms) |")
    print("|---|---|---|---|")
    for name, label in (("sdpa", "PyTorch SDPA (CPU flash)"), ("loratune", "loratune")):
        f, fb = median[(name, False)], median[(name, True)]
        print(f"| {label} | {f:.1f} | {fb:.1f} | {fb - f:.1f} |")
    ratio = lambda key: median[("sdpa", key)] / median[("loratune", key)]  # noqa: E731
    backward_ratio = (median[("sdpa", True)] - median[("sdpa", False)]) / (
        median[("loratune", True)] - median[("loratune", False)]
    )
    print(f"| **speed-up** | {ratio(False):.2f}× | {ratio(True):.2f}× | {backward_ratio:.2f}× |")


if __name__ == "__main__":
    main()
