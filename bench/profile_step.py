"""Where a loratune training step's time goes: ``torch.profiler`` over the step ``train`` runs.

smollm2-135m, bf16, batch 8 × 256 (every token a target), r=8 on all linear layers, AdamW; the same pieces
``loratune.train`` uses (``patch_for_training``, ``causal_lm_loss_sum``). Prints the step time, the share
spent in matrix products (and attention) versus everything else, and the top non-matmul operators by
self time, each with the bytes it moves (inputs + output, from the recorded shapes) and how far it runs
from this machine's memory bandwidth (measured here with a large copy).

    python bench/profile_step.py [--steps 3] [--batch 8] [--length 256] [--dtype bf16] [--quantize nf4] [--top 15]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict

import torch

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::mm_out"}
ATTENTION_OPS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_efficient_attention_backward",
    "AttentionFunctionBackward",
}  # loratune's backward: its own time, the products are matmuls


def copy_bandwidth_gbs(megabytes: int = 512) -> float:
    """Read + write bandwidth of one large copy, GB/s (the best of five)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def build(args):
    import loratune
    from loratune.train.attention import patch_attention
    from loratune.train.fused_ops import patch_for_training

    model, tokenizer = loratune.load_model(args.model, dtype=args.dtype, quantize=args.quantize)
    torch.manual_seed(0)
    loratune.add_adapter(model, loratune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    patch_for_training(model)
    patch_attention(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, foreach=True)
    ids = torch.randint(
        100, tokenizer.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, optimizer, params, batch


def step(model, optimizer, params, batch) -> float:
    from loratune.inference.loss import causal_lm_loss_sum
    from loratune.train.fused_ops import recompute_norm_outputs

    with recompute_norm_outputs():
        loss_sum, count = causal_lm_loss_sum(model, batch)
    (loss_sum / count).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum) / count


def element_bytes(shapes) -> int:
    """Bytes of the tensors in a recorded shape list, counted as bf16 (the activations' dtype here)."""
    return sum(
        2 * math.prod(shape)
        for shape in shapes
        if isinstance(shape, (list, tuple)) and shape and all(isinstance(n, int) for n in shape)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--quantize", choices=("nf4", "fp4"), default=None, help="train over a 4-bit base (QLoRA)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    bandwidth = copy_bandwidth_gbs()
    model, optimizer, params, batch = build(args)
    for _ in range(2):  # warm-up: allocator, first-call paths
        step(model, optimizer, params, batch)
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step(model, optimizer, params, batch)
    wall = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.length

    by_op: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    moved: dict[str, float] = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        by_op[event.key] += event.self_cpu_time_total / 1e6 / args.steps
        calls[event.key] += event.count // args.steps
        moved[event.key] += 2 * element_bytes(event.input_shapes) * event.count / args.steps  # in + out
    total = sum(by_op.values())
    matmul = sum(t for op, t in by_op.items() if op in MATMUL_OPS)
    attention = sum(t for op, t in by_op.items() if op in ATTENTION_OPS)
    print(
        f"{args.model}{' ' + args.quantize + ' base' if args.quantize else ''}, {args.dtype}, "
        f"batch {args.batch} x {args.length}, r=8 all linear; {args.steps} profiled steps"
    )
    print(f"step {wall:.2f} s wall ({tokens / wall:.0f} tokens/s under the profiler); operator self time {total:.2f} s")
    print(
        f"matrix products {matmul:.2f} s ({100 * matmul / total:.0f}%), attention {attention:.2f} s "
        f"({100 * attention / total:.0f}%), everything else {total - matmul - attention:.2f} s "
        f"({100 * (total - matmul - attention) / total:.0f}%)"
    )
    print(f"memory bandwidth (one large copy): {bandwidth:.1f} GB/s\n")
    print("| operator | calls/step | self s/step | share | bytes moved/step | at bandwidth | × from bandwidth |")
    print("|---|---|---|---|---|---|---|")
    others = sorted(((t, op) for op, t in by_op.items() if op not in MATMUL_OPS | ATTENTION_OPS), reverse=True)
    for seconds, op in others[: args.top]:
        ideal = moved[op] / (bandwidth * 1e9)
        ratio = f"{seconds / ideal:.1f}×" if ideal > 0 else "-"
        print(
            f"| {op} | {calls[op]} | {seconds:.3f} | {100 * seconds / total:.1f}% | {moved[op] / 1e9:.2f} GB | "
            f"{ideal:.3f} s | {ratio} |"
        )


if __name__ == "__main__":
    main()
