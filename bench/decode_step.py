"""Decoding on a CPU, loratune's kernels against PyTorch's own operations, side by side in one script.

1. The products: every weight of smollm2-135m (30 blocks' seven projections and the output head, random values
   of the same shapes) multiplied by a few rows, as one decoding step does: the few-row kernel
   (`kernels.rows`; more rows than it takes for decoding, in spans, as `serve --batch-invariant` runs them)
   against `F.linear` (BLAS), per number of rows and dtype, with the rate each reads the weights.
2. The engine: one sequence (`--sequences`: several at once) of 64 greedy tokens through the serving engine on
   smollm2-135m (`--dtype`: fp32 or bf16) with a random r=8 all-linear adapter, the median time per decoding
   step with the kernels and each block as kernel calls (`inference.block_step`), with the kernels inside
   transformers' modules (`LORATUNE_BLOCK_STEP=0`: `inference.lean`, the LoRA layers' one-call output) and
   without kernels (`LORATUNE_NO_KERNEL=1`: PyTorch's operations), each in its own process.
3. The prefill: the engine's time to the first token for one long prompt (`--prompt-tokens`) and for 16 prompts
   of 64 tokens arriving at once (`--dtype`), by default and batch-invariant (`serve --batch-invariant`), each
   in its own process.

    python bench/decode_step.py                  # all three (the engine's parts: about two minutes on 2 cores)
    python bench/decode_step.py --only products
    python bench/decode_step.py --only products --rows 42 --offset-bytes 40   # weights as a mapped file puts them
    python bench/decode_step.py --only prefill --dtype bf16                    # time to the first token
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
HEAD = (49152, 576)


def placed(tensors: list[torch.Tensor], offset_bytes: int) -> list[torch.Tensor]:
    """Copies of ``tensors`` laid one after another in one buffer starting ``offset_bytes`` past a 64-byte
    boundary, as a checkpoint file mapped into memory and used in place lays them out."""
    element = tensors[0].element_size()
    total = sum(t.numel() for t in tensors)
    buffer = torch.empty(total + (64 + offset_bytes) // element, dtype=tensors[0].dtype)
    at = (-buffer.data_ptr() % 64 + offset_bytes) // element
    out = []
    for t in tensors:
        out.append(buffer[at : at + t.numel()].view(t.shape).copy_(t))
        at += t.numel()
    return out


def products(rows_list: list[int], repeats: int, offset_bytes: int = 0) -> None:
    from loratune.kernels import rows

    print(f"weights {offset_bytes} bytes past a 64-byte boundary")
    print("| dtype | rows | kernel (ms) | F.linear (ms) | F.linear / kernel | kernel reads |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        weights = [(torch.randn(o, i) * 0.02).to(dtype) for _ in range(30) for o, i in SHAPES]
        weights.append((torch.randn(*HEAD) * 0.02).to(dtype))
        weights = placed(weights, offset_bytes)
        size = sum(w.numel() * w.element_size() for w in weights)
        for n in rows_list:
            inputs = {i: torch.randn(n, i).to(dtype) for i in (576, 1536)}

            def kernel(weights=weights, inputs=inputs):
                with rows.decoding(), rows.batch_invariant():  # (more rows than few: in spans, as --batch-invariant)
                    for w in weights:
                        rows.product(inputs[w.shape[1]], w)

            def blas(weights=weights, inputs=inputs):
                for w in weights:
                    F.linear(inputs[w.shape[1]], w)

            times = {}
            for name, run in (("kernel", kernel), ("blas", blas)):
                run()
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    samples.append(time.perf_counter() - start)
                times[name] = min(samples)
            rate, name = size / times["kernel"] / 1e9, str(dtype).removeprefix("torch.")
            print(
                f"| {name} | {n} | {times['kernel'] * 1e3:.1f} | {times['blas'] * 1e3:.1f} "
                f"| **{times['blas'] / times['kernel']:.2f}×** | {rate:.1f} GB/s |"
            )


def engine_child(adapter: str, tokens: int, repeats: int, sequences: int, dtype: str) -> None:
    import loratune
    from loratune.inference.engine import Engine
    from loratune.inference.sequence import SamplingParams, Sequence
    from loratune.serve.adapters import AdapterPool

    model, tokenizer = loratune.load_model("smollm2-135m", dtype=dtype, device="cpu")
    steps: list[float] = []
    engine = Engine(model, on_step=lambda rows, adapters, seconds: steps.append(seconds))
    AdapterPool(model, engine, max_loaded=2).add_at_start("a", adapter)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give three tips for staying healthy."}], add_generation_prompt=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)

    def sequence(n: int) -> Sequence:
        return Sequence(prompt, {"a": 1.0}, SamplingParams(max_tokens=n), tokenizer, frozenset(), lambda event: None)

    engine.run([sequence(8) for _ in range(sequences)])
    medians = []
    for _ in range(repeats):
        steps.clear()
        engine.run([sequence(tokens) for _ in range(sequences)])
        medians.append(statistics.median(steps))
    print(f"RESULT {min(medians) * 1e3:.2f} {statistics.median(medians) * 1e3:.2f}")


def prefill_child(dtype: str, prompt_tokens: int, repeats: int, batch_invariant: bool) -> None:
    import loratune
    from loratune.inference.engine import Engine
    from loratune.inference.sequence import SamplingParams, Sequence

    model, tokenizer = loratune.load_model("smollm2-135m", dtype=dtype, device="cpu")
    engine = Engine(model, batch_invariant=batch_invariant)

    def first_token_seconds(prompts: list[list[int]]) -> float:
        seqs = [Sequence(p, {}, SamplingParams(max_tokens=1), tokenizer, frozenset(), lambda e: None) for p in prompts]
        start = time.perf_counter()
        engine.run(seqs)
        return time.perf_counter() - start

    def prompt(n: int, shift: int) -> list[int]:  # ordinary tokens of the vocabulary, n of them
        return [1000 + (7 * i + 131 * shift) % 20000 for i in range(n)]

    cases = {f"one prompt of {prompt_tokens} tokens": [prompt(prompt_tokens, 0)]}
    cases["16 prompts of 64 tokens at once"] = [prompt(64, k) for k in range(16)]
    for label, prompts in cases.items():
        first_token_seconds(prompts)
        samples = sorted(first_token_seconds(prompts) for _ in range(repeats))
        print(f"RESULT {label}: {statistics.median(samples) * 1e3:.0f}")


def prefill(dtype: str, prompt_tokens: int, repeats: int) -> None:
    results: dict[str, list[str]] = {}
    for extra in ([], ["--batch-invariant"]):
        command = [sys.executable, __file__, "--child", "prefill", "--dtype", dtype]
        command += ["--prompt-tokens", str(prompt_tokens), "--repeats", str(repeats), *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [x.removeprefix("RESULT ") for x in done.stdout.splitlines() if x.startswith("RESULT")]
        if not lines:
            raise SystemExit(f"prefill: the child failed:\n{done.stderr[-2000:]}")
        for line in lines:
            label, median = line.split(": ")
            results.setdefault(label, []).append(median)
    print(f"\nsmollm2-135m {dtype}, the engine's prefill and first token (no adapter), median of {repeats}:")
    print("| prompts | default (ms) | batch-invariant (ms) | batch-invariant / default |")
    print("|---|---|---|---|")
    for label, (default, invariant) in results.items():
        print(f"| {label} | {default} | {invariant} | {int(invariant) / int(default):.2f}× |")


def engine(tokens: int, repeats: int, sequences: int, dtype: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import random_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter("smollm2-135m", Path(tmp) / "a")
        results = {}
        for label, extra in (
            ("kernels, blocks as kernel calls", {}),
            ("kernels, transformers' modules", {"LORATUNE_BLOCK_STEP": "0"}),
            ("PyTorch operations", {"LORATUNE_NO_KERNEL": "1"}),
        ):
            command = [sys.executable, __file__, "--child", str(adapter), "--tokens", str(tokens)]
            command += ["--sequences", str(sequences), "--dtype", dtype]
            done = subprocess.run(
                [*command, "--repeats", str(repeats)], env={**os.environ, **extra}, capture_output=True, text=True
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
            if line is None:
                raise SystemExit(f"{label}: the child failed:\n{done.stderr[-2000:]}")
            results[label] = [float(v) for v in line.split()[1:]]
    print(
        f"\nsmollm2-135m {dtype}, {sequences} sequence(s) at once, {tokens} greedy tokens, r=8 all-linear adapter, "
        f"{repeats} repeats:"
    )
    print("| decoding with | step, best repeat (ms) | step, median repeat (ms) |")
    print("|---|---|---|")
    for label, (best, median) in results.items():
        print(f"| {label} | {best:.1f} | {median:.1f} |")
    best = results["kernels, blocks as kernel calls"][0]
    for label in ("kernels, transformers' modules", "PyTorch operations"):
        print(f"| **{label} / blocks as kernel calls** | **{results[label][0] / best:.2f}×** | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["products", "engine", "prefill"])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=1, help="sequences decoded together by the engine")
    parser.add_argument(
        "--offset-bytes",
        type=int,
        default=0,
        help="products: the weights this many bytes past a 64-byte boundary (8-byte steps; a checkpoint used in "
        "place from its file is where the file puts it)",
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the engine's model dtype")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="prefill: the long prompt's length")
    parser.add_argument("--batch-invariant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "prefill":
        prefill_child(args.dtype, args.prompt_tokens, args.repeats, args.batch_invariant)
        return
    if args.child:
        engine_child(args.child, args.tokens, args.repeats, args.sequences, args.dtype)
        return
    print(f"threads {torch.get_num_threads()}")
    if args.only in (None, "products"):
        products(args.rows, args.repeats, args.offset_bytes)
    if args.only in (None, "engine"):
        engine(args.tokens, args.repeats, args.sequences, args.dtype)
    if args.only in (None, "prefill"):
        prefill(args.dtype, args.prompt_tokens, args.repeats)


if __name__ == "__main__":
    main()
