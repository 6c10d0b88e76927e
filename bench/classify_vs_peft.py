"""Classifier training speed and memory: loratune vs PEFT + transformers on an encoder, same model, data, dtype,
batch and LoRA config (r=8 on the attention's query and value, the new head trained in full: PEFT's SEQ_CLS).

Each trainer runs in its own process (so peak RSS is its own), alternating, several repetitions; reported are the
median tokens/s over the timed steps (model loading and warm-up steps excluded), peak RSS, and their ratios.
Rows are exactly ``--length`` tokens (no padding), eight intent labels.

    python bench/classify_vs_peft.py                     # minilm-l6, batch 32 x 128, bf16 where supported
    python bench/classify_vs_peft.py --dtype fp32 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent
INTENTS = ROOT / "examples" / "classify" / "train.jsonl"


def make_data(tokenizer, path: Path, rows: int, length: int) -> None:
    """Rows of exactly ``length`` tokens with the [CLS]/[SEP] pair: intent sentences strung together, the
    label of the first."""
    sentences = [json.loads(line) for line in INTENTS.read_text().splitlines()]
    out, i = [], 0
    for _ in range(rows):
        label, words = sentences[i % len(sentences)]["label"], []
        while len(tokenizer(" ".join(words))["input_ids"]) < length:
            words += sentences[i % len(sentences)]["text"].split()
            i += 1
        out.append({"text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(row) + "\n" for row in out))


def run_loratune(args) -> dict:
    import yaml

    from loratune.train import load_config, train

    run = Path(args.workdir) / "loratune-run"
    config = {
        "task": "seq_cls",
        "model": {"name": args.model, "dtype": args.dtype},
        "lora": {"r": args.r, "lora_alpha": 2 * args.r, "lora_dropout": 0.0},
        "data": {"train": args.data_file, "max_length": args.length},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-3,
            "scheduler": "constant",
            "log_every": 1,
            "save_every": 10_000,
            "max_grad_norm": None,
            "seed": 0,
        },
        "output_dir": str(run),
    }
    path = Path(args.workdir) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    train(load_config(path), overwrite=True, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[args.warmup :]),
        "losses": [r["loss"] for r in steps],
        "peak_rss_mib": peak_rss_mib(),
    }


def run_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loratune.data.classification import label_space, read_classification
    from loratune.models import resolve_dtype
    from loratune.models.loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    examples = read_classification(args.data_file)
    space = label_space(examples)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=space.num_labels, dtype=resolve_dtype(args.dtype)
    )
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="SEQ_CLS", r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=["query", "value"]
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    labels = torch.tensor([space.encode(e) for e in examples])
    encoded = tokenizer(
        [e.text for e in examples], truncation=True, max_length=args.length, padding=True, return_tensors="pt"
    )
    generator = torch.Generator().manual_seed(0)
    speeds, losses = [], []
    for _ in range(args.steps):
        rows = torch.randperm(len(examples), generator=generator)[: args.batch]
        batch = {k: v[rows] for k, v in encoded.items()}
        started = time.perf_counter()
        loss = model(**batch, labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - started))
        losses.append(loss.item())
    return {"tokens_per_s": statistics.median(speeds[args.warmup :]), "losses": losses, "peak_rss_mib": peak_rss_mib()}


def run_child(args, impl: str, workdir: Path, data_file: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--workdir",
        str(workdir),
        "--data-file",
        str(data_file),
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--r",
        str(args.r),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if out.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", choices=("loratune", "peft"))
    parser.add_argument("--workdir")
    parser.add_argument("--data-file")
    args = parser.parse_args()
    if args.child:
        result = run_loratune(args) if args.child == "loratune" else run_peft(args)
        print(json.dumps(result))
        return
    from loratune.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data_file = workdir / "train.jsonl"
        make_data(load_tokenizer(args.model), data_file, args.batch * (args.steps + 1), args.length)
        results: dict[str, list[dict]] = {"loratune": [], "peft": []}
        for rep in range(args.reps):
            for impl in ("loratune", "peft"):
                result = run_child(args, impl, workdir, data_file)
                results[impl].append(result)
                print(
                    f"rep {rep + 1} {impl:8s} {result['tokens_per_s']:8.1f} tok/s  peak RSS "
                    f"{result['peak_rss_mib']:7.0f} MiB  first losses {[round(x, 3) for x in result['losses'][:3]]}"
                )
    med = {
        impl: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "peak_rss_mib")}
        for impl, rs in results.items()
    }
    lt, pt = med["loratune"]["tokens_per_s"], med["peft"]["tokens_per_s"]
    lm, pm = med["loratune"]["peak_rss_mib"], med["peft"]["peak_rss_mib"]
    print(f"\n{args.model}, {args.dtype}, batch {args.batch} x {args.length}, r={args.r} on query+value, head in full")
    print("| trainer | tokens/s | peak RSS (MiB) |\n|---|---|---|")
    print(f"| loratune | {lt:.0f} | {lm:.0f} |\n| PEFT + transformers | {pt:.0f} | {pm:.0f} |")
    print(f"speed {lt / pt:.2f}x, memory {lm / pm:.2f}x")


if __name__ == "__main__":
    main()
