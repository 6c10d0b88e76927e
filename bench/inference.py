"""Inference cost of an adapter: seconds per generated token, relative to the bare base model.

Variants, all greedy with a KV cache through the same decoding loop: the base model; the base with an
unmerged loratune adapter (r=8, all linear layers); the same adapter merged into the weights; and PEFT's
unmerged adapter (the same weights loaded with ``PeftModel``). Every row generates exactly
``--new-tokens`` tokens (no early stop). Runs alternate, medians over ``--reps``.

    python bench/inference.py                  # smollm2-135m, bf16, batch 1 and 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import loratune
from common import random_adapter
from loratune.inference.decode import generate_greedy


def variants(model_name: str, dtype: str, adapter: Path):
    base, tokenizer = loratune.load_model(model_name, dtype=dtype)
    unmerged, _ = loratune.load_model(model_name, dtype=dtype)
    loratune.load_adapter(unmerged, adapter)
    merged, _ = loratune.load_model(model_name, dtype=dtype)
    loratune.load_adapter(merged, adapter)
    loratune.merge(merged)
    from peft import PeftModel

    peft_base, _ = loratune.load_model(model_name, dtype=dtype)
    peft = PeftModel.from_pretrained(peft_base, str(adapter)).eval()
    return tokenizer, {"base": base, "loratune unmerged": unmerged, "loratune merged": merged, "PEFT unmerged": peft}


def seconds_per_token(model, tokenizer, prompts, new_tokens: int, batch: int) -> float:
    start = time.perf_counter()
    generate_greedy(model, tokenizer, prompts, new_tokens, batch_size=batch, stop_ids=set())
    return (time.perf_counter() - start) / (new_tokens * len(prompts) / batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    adapter = Path(tempfile.mkdtemp(prefix="loratune-infer-")) / "adapter"
    random_adapter(args.model, adapter, dtype=args.dtype)
    tokenizer, models = variants(args.model, args.dtype, adapter)
    text = "Summarise the plot of a novel about a lighthouse keeper who finds a message in a bottle."
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    print(
        f"model {args.model}, {args.dtype}, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
        f"{args.reps} reps (medians), ms per generated token (per row-batch step)"
    )
    print("| batch | " + " | ".join(models) + " | unmerged / base | merged / base | PEFT unmerged / base |")
    print("|---" * (len(models) + 4) + "|")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [prompt] * batch
        for model in models.values():  # warm-up: first-call kernel setup
            seconds_per_token(model, tokenizer, prompts, 4, batch)
        times = {name: [] for name in models}
        for _ in range(args.reps):
            for name, model in models.items():
                times[name].append(seconds_per_token(model, tokenizer, prompts, args.new_tokens, batch))
        med = {name: statistics.median(values) for name, values in times.items()}
        base = med["base"]
        cells = " | ".join(f"{1000 * med[name]:.1f}" for name in models)
        print(
            f"| {batch} | {cells} | {med['loratune unmerged'] / base:.2f}x | {med['loratune merged'] / base:.2f}x | "
            f"{med['PEFT unmerged'] / base:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
