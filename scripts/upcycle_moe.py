"""Build a mixture-of-experts model from the built-in smollm2-135m by sparse upcycling, check that it computes
what the dense model computes, and (``--compare-demo``) train LoRA on its experts on the demo task beside dense
LoRA on smollm2 itself.

Every block's MLP becomes E identical experts behind a random Mixtral router (``loratune.models.upcycle``); the
saved model is an ordinary transformers Mixtral directory any ``loratune`` verb takes as ``--model``.

    python scripts/upcycle_moe.py --out runs/smollm2-moe                    # 4 experts, top-2: build and check
    python scripts/upcycle_moe.py --out runs/smollm2-moe --compare-demo     # + dense vs expert LoRA, exact match
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import loratune
from loratune.data import read_examples
from loratune.inference.evaluate import score_exact_match
from loratune.models.upcycle import upcycle_to_mixtral
from loratune.train import load_config, train

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo" / "config.yaml"
CHECK_TEXT = [
    "Rewrite the date 3 March 2021 as YYYY-MM-DD.",
    "The quick brown fox jumps over the lazy dog, and then it naps under the old oak tree for an hour.",
]


def build(out: Path, experts: int, top_k: int, seed: int) -> float:
    """Write the upcycled model (fp32, so that it equals the dense one) and its tokenizer to ``out``; return the
    largest logit difference to the dense model on ``CHECK_TEXT``."""
    dense, tokenizer = loratune.load_model("smollm2-135m", dtype="fp32")
    moe = upcycle_to_mixtral(dense, experts, top_k, seed=seed)
    batch = tokenizer(CHECK_TEXT, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = dense(**batch).logits, moe(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return float((got[mask] - expected[mask]).abs().max())


def exact_match(model_name: str, adapter: Path, config) -> float:
    model, tokenizer = loratune.load_model(model_name, dtype=config.model.dtype)
    loratune.load_adapter(model, adapter)
    examples, _ = read_examples(config.data.eval)
    em, _, _ = score_exact_match(model, tokenizer, examples, max_new_tokens=16, batch_size=config.train.eval_batch_size)
    return em


def compare_demo(out: Path, overrides: list[str]) -> None:
    """Train the demo's LoRA on dense smollm2 and on the upcycled model's attention and experts (same config,
    ``all-linear``), and print each one's exact match on the demo's held-out set."""
    results = {}
    for label, model_name in (("dense smollm2-135m", "smollm2-135m"), (f"upcycled MoE ({out})", str(out))):
        run_dir = ROOT / "runs" / ("upcycle-dense" if model_name == "smollm2-135m" else "upcycle-moe")
        config = load_config(DEMO, [f"model.name={model_name}", f"output_dir={run_dir}", *overrides])
        started = time.perf_counter()
        summary = train(config, overwrite=True)
        em = exact_match(model_name, run_dir / "adapter", config)
        results[label] = (em, summary, time.perf_counter() - started)
    print("\n| model | exact match | trainable params | tokens/s | minutes |")
    print("|---|---|---|---|---|")
    for label, (em, summary, seconds) in results.items():
        print(
            f"| {label} | {100 * em:.1f}% | {summary['trainable_params']:,} | {summary['tokens_per_s']:,.0f} "
            f"| {seconds / 60:.1f} |"
        )
    (dense, _, _), (moe, _, _) = results.values()
    print(f"expert LoRA {100 * (moe - dense):+.1f} points against dense LoRA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "smollm2-moe", help="where to write the model")
    parser.add_argument("--experts", type=int, default=4, help="experts per block (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random router")
    parser.add_argument("--compare-demo", action="store_true", help="train dense and expert LoRA on the demo task")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="demo config override"
    )
    args = parser.parse_args()
    difference = build(args.out, args.experts, args.top_k, args.seed)
    print(
        f"wrote {args.out}: smollm2-135m upcycled to {args.experts} experts (top-{args.top_k}); logits equal the "
        f"dense model's (largest difference {difference:.2e}, rtol 1e-5)"
    )
    if args.compare_demo:
        compare_demo(args.out, args.overrides)


if __name__ == "__main__":
    main()
