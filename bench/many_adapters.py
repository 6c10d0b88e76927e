"""Many adapters on one base, side by side with PEFT: mixed-adapter batches and hot loading.

1. Mixed batch: 8 rows over 4 adapters (2 rows each) against the same 8 rows all on one adapter, for a
   forward pass over a prompt (prefill, ``--seq`` tokens) and for greedy generation (``--new-tokens``, every
   row runs to the end), with loratune and with PEFT (``adapter_names=`` in both). The ratio that matters:
   mixed throughput / single-adapter throughput, and loratune's mixed throughput / PEFT's.
2. Hot load: seconds to load one typical adapter (r=8, all linear layers) from disk into a live model and
   to delete it again, loratune's ``load_adapter`` / ``delete_adapter`` against PEFT's ``load_adapter`` /
   ``delete_adapter`` on the same files (page cache warm for both).

Runs alternate between the two libraries; medians over ``--reps``.

    python bench/many_adapters.py              # smollm2-135m, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

import loratune

ADAPTERS = ["a0", "a1", "a2", "a3"]


def make_adapters(model_name: str, dtype: str, root: Path) -> dict[str, Path]:
    """Four r=8 all-linear adapters with different non-zero B, saved under ``root``."""
    model, _ = loratune.load_model(model_name, dtype=dtype)
    paths = {}
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        loratune.add_adapter(model, loratune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), name)
        with torch.no_grad():
            for _, layer in loratune.adapters.lora_layers(model):
                layer.lora_B[name].normal_(std=0.01)
        paths[name] = root / name
        loratune.save_adapter(model, paths[name], name)
    return paths


def timed_alternating(fns: dict, reps: int) -> dict:
    """Median seconds of each ``fns[key]()`` over ``reps`` rounds, one run of each per round (after one warm-up
    each), so that a change in the machine's speed during the run touches every variant alike."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128, help="prompt length of the forward (prefill) test")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--load-reps", type=int, default=20)
    args = parser.parse_args()
    from peft import PeftModel

    paths = make_adapters(args.model, args.dtype, Path(tempfile.mkdtemp(prefix="loratune-many-")))
    ours, tokenizer = loratune.load_model(args.model, dtype=args.dtype)
    for name in ADAPTERS:
        loratune.load_adapter(ours, paths[name], name)
    peft_base, _ = loratune.load_model(args.model, dtype=args.dtype)
    theirs = PeftModel.from_pretrained(peft_base, str(paths[ADAPTERS[0]]), adapter_name=ADAPTERS[0]).eval()
    for name in ADAPTERS[1:]:
        theirs.load_adapter(str(paths[name]), adapter_name=name)

    loratune.set_active(ours, ADAPTERS[0])  # single: the plain path with one active adapter, as without mixing
    theirs.set_adapter(ADAPTERS[0])
    mixed = [ADAPTERS[i % len(ADAPTERS)] for i in range(args.rows)]
    single = None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, tokenizer.vocab_size, (args.rows, args.seq), generator=generator)
    prompt = ids[:, :16]
    new = args.new_tokens

    def forward(model, names):
        with torch.no_grad():
            model(input_ids=ids, adapter_names=names)

    def generate(model, names):
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                adapter_names=names,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    def generate_ours(names):
        routing = loratune.mixed_batch(ours, names) if names else contextlib.nullcontext()
        with torch.no_grad(), routing:  # transformers' generate refuses unknown kwargs
            ours.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )

    print(
        f"model {args.model}, {args.dtype}, {args.rows} rows over {len(ADAPTERS)} adapters (r=8, all linear), "
        f"medians of {args.reps}; tokens/s (higher is better)"
    )
    print(
        "| test | loratune single | loratune mixed | mixed / single | PEFT single | PEFT mixed | "
        "mixed / single | loratune mixed / PEFT mixed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    tests = {
        f"forward {args.rows}×{args.seq}": (
            lambda names: forward(ours, names),
            lambda names: forward(theirs, names),
            args.rows * args.seq,
        ),
        f"generate {args.rows}×{new}": (generate_ours, lambda names: generate(theirs, names), args.rows * new),
    }
    for label, (run_ours, run_theirs, tokens) in tests.items():
        variants = {
            "ours single": lambda run=run_ours: run(single),
            "theirs single": lambda run=run_theirs: run(single),
            "ours mixed": lambda run=run_ours: run(mixed),
            "theirs mixed": lambda run=run_theirs: run(mixed),
        }
        rate = {key: tokens / seconds for key, seconds in timed_alternating(variants, args.reps).items()}
        print(
            f"| {label} | {rate['ours single']:.0f} | {rate['ours mixed']:.0f} | "
            f"{rate['ours mixed'] / rate['ours single']:.2f}× | {rate['theirs single']:.0f} | "
            f"{rate['theirs mixed']:.0f} | {rate['theirs mixed'] / rate['theirs single']:.2f}× | "
            f"{rate['ours mixed'] / rate['theirs mixed']:.2f}× |",
            flush=True,
        )

    extra = paths[ADAPTERS[1]]

    def load_ours():
        loratune.load_adapter(ours, extra, "hot")
        loratune.delete_adapter(ours, "hot")

    def load_theirs():
        theirs.load_adapter(str(extra), adapter_name="hot")
        theirs.delete_adapter("hot")

    load = timed_alternating({"ours": load_ours, "theirs": load_theirs}, args.load_reps)
    print(
        f"\nhot load + delete of one adapter (r=8, all linear, median of {args.load_reps}): "
        f"loratune {1000 * load['ours']:.1f} ms, PEFT {1000 * load['theirs']:.1f} ms, "
        f"ratio {load['ours'] / load['theirs']:.2f}×"
    )


if __name__ == "__main__":
    main()
