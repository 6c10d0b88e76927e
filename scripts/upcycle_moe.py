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


def build(out: Path, experts: int, top_k: int, seed: int) -> tuple[float, float, float]:
    """Write the upcycled model (fp32) and its tokenizer to ``out``. Returns the largest logit difference to the
    dense model on ``CHECK_TEXT`` computed in float64 (checked within 1e-5 of the largest logit: the two compute
    the same function), the same in fp32, and the dense model's own fp32 difference between the texts run
    together and one by one (what fp32 rounding alone moves a logit by when only the shapes of products change)."""
    dense, tokenizer = loratune.load_model("smollm2-135m", dtype="fp32")
    batch = tokenizer(CHECK_TEXT, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()

    def logits(model, dtype=None):
        with torch.no_grad():
            return model(**batch).logits[mask].to(dtype or torch.float64)

    moe = upcycle_to_mixtral(dense, experts, top_k, seed=seed)
    fp32 = float((logits(moe) - logits(dense)).abs().max())
    alone = []
    for i in range(len(CHECK_TEXT)):
        ids = tokenizer(CHECK_TEXT[i], return_tensors="pt")
        with torch.no_grad():
            alone.append(dense(**ids).logits[0].double())
    noise = float((torch.cat(alone) - logits(dense)).abs().max())
    exact_dense, exact_moe = dense.double(), moe.double()
    implementation = exact_moe.config._experts_implementation
    exact_moe.config._experts_implementation = "eager"  # PyTorch's grouped product has no float64
    expected, got = logits(exact_dense), logits(exact_moe)
    exact_moe.config._experts_implementation = implementation
    # Mixtral's router normalises its weights in float32 whatever the model's dtype (they sum to 1 within 2⁻²⁴),
    # and smollm2's largest activations are in the thousands: so the check is relative to the logits' scale.
    scale = float(expected.abs().max())
    if float((got - expected).abs().max()) > 1e-5 * scale:
        raise SystemExit(f"the upcycled model does not compute what the dense one does: {(got - expected).abs().max()}")
    exact_moe.float().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return float((got - expected).abs().max()), fp32, noise


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
    exact, fp32, noise = build(args.out, args.experts, args.top_k, args.seed)
    print(
        f"wrote {args.out}: smollm2-135m upcycled to {args.experts} experts (top-{args.top_k}). Largest logit "
        f"difference to the dense model: {exact:.1e} in float64 (within 1e-5 of the largest logit), {fp32:.1e} in "
        f"fp32, where the dense model itself moves by {noise:.1e} between batched and one-by-one runs"
    )
    if args.compare_demo:
        compare_demo(args.out, args.overrides)


if __name__ == "__main__":
    main()
