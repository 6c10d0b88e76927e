"""int8-compressed adapters: bytes on disk and what the compression changes in the model's output.

Stores one adapter three ways — float32 (as trained), bfloat16 (what a PEFT user does to halve a download:
cast and ``save_pretrained``) and loratune's int8 (per-row absmax scales) — and compares each with float32:
file size, logits on the demo eval conversations (teacher-forced, float32 model), and how often the
argmax token changes. PEFT cannot load int8; its bf16 copy is loaded with ``PeftModel`` as the peer.

    python bench/int8_adapter.py --adapter runs/demo/adapter      # the adapter `make demo` trains
    python bench/int8_adapter.py                                   # a random r=8 all-linear adapter instead
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import loratune
from common import random_adapter
from loratune.adapters import INT8_WEIGHTS_NAME, WEIGHTS_NAME, read_adapter, write_adapter


def batch(tokenizer, data: Path, n: int) -> dict:
    rows = [json.loads(line) for line in data.read_text().splitlines()[:n]]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    return tokenizer(texts, return_tensors="pt", padding=True)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs).logits
    return out[inputs["attention_mask"].bool()]  # real tokens only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default=None, help="adapter directory (default: a random r=8 adapter)")
    parser.add_argument("--data", default="examples/demo/eval.jsonl")
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()
    import peft

    work = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    source = Path(args.adapter) if args.adapter else random_adapter(args.model, work / "random")
    config, tensors = read_adapter(source)
    fp32 = write_adapter(work / "fp32", config, {k: t.float() for k, t in tensors.items()})
    bf16 = write_adapter(work / "bf16", config, {k: t.to(torch.bfloat16) for k, t in tensors.items()})
    int8 = loratune.compress_adapter(fp32, work / "int8")
    sizes = {
        "fp32": (fp32 / WEIGHTS_NAME).stat().st_size,
        "bf16": (bf16 / WEIGHTS_NAME).stat().st_size,
        "int8": (int8 / INT8_WEIGHTS_NAME).stat().st_size,
    }

    base, tokenizer = loratune.load_model(args.model, dtype="fp32", device="cpu")
    inputs = batch(tokenizer, Path(args.data), args.rows)
    reference = logits(base, inputs)
    outputs = {}
    for label, directory in (("fp32", fp32), ("bf16", bf16), ("int8", int8)):
        model, _ = loratune.load_model(args.model, dtype="fp32", device="cpu")
        loratune.load_adapter(model, directory)
        outputs[label] = logits(model, inputs)
    peer = peft.PeftModel.from_pretrained(loratune.load_model(args.model, dtype="fp32", device="cpu")[0], str(bf16))
    outputs["bf16 (PEFT)"] = logits(peer.eval(), inputs)

    exact = outputs["fp32"]
    effect = (exact - reference).norm()
    print(f"adapter: {source} ({config.r=}, {len(tensors)} tensors); {reference.shape[0]} tokens from {args.rows} rows")
    print(f"adapter effect on logits: max |fp32 - base| = {(exact - reference).abs().max():.4f}")
    print(
        "| storage | file bytes | vs fp32 | vs bf16 | max abs logit diff vs fp32 | rel. diff / adapter effect "
        "| argmax changed |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, out in outputs.items():
        size = sizes[label.split()[0]]
        diff = out - exact
        changed = (out.argmax(-1) != exact.argmax(-1)).float().mean()
        print(
            f"| {label} | {size:,} | {size / sizes['fp32']:.3f} | {size / sizes['bf16']:.3f} | "
            f"{diff.abs().max():.2e} | {diff.norm() / effect:.2e} | {100 * changed:.2f}% |"
        )


if __name__ == "__main__":
    main()
