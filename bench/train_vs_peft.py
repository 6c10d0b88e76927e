"""Training speed and memory: loratune vs PEFT + transformers, same model, data, dtype, batch and LoRA config.

Each trainer runs in its own process (so peak RSS is its own), alternating, several repetitions. Reported:
median tokens/s over the timed steps (model loading and the first warm-up steps excluded) and peak RSS of
the whole process, and their ratios; and the matmul roofline: the tokens/s this machine would reach if a step
were nothing but its matrix products (every frozen weight's forward and input-gradient product, lm_head
included, attention's batched products, the LoRA factors' products), each timed here at its own shape and
dtype, so "loratune runs at N% of the roofline" is measured, not estimated. Both start from the same adapter weights
(loratune writes its initial
adapter, PEFT loads it trainable) and see the same batches, so their losses must agree.

    python bench/train_vs_peft.py                       # smollm2-135m, bf16, batch 8 x 256, r=8 all-linear
    python bench/train_vs_peft.py --steps 20 --reps 3 --data demo   # variable-length chat data
    python bench/train_vs_peft.py --quantize nf4 --with-lora        # QLoRA vs PEFT + bitsandbytes (and our LoRA)
    python bench/train_vs_peft.py --dora --with-lora                # DoRA vs PEFT's DoRA (and our plain LoRA)
    python bench/train_vs_peft.py --full --with-lora                # full fine-tuning vs transformers' (and LoRA)

With ``--quantize nf4`` both sides train over a 4-bit NF4 base with double quantization and bf16 compute: loratune
through ``model.quantize``, PEFT over transformers' ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
compute bf16)`` (no ``prepare_model_for_kbit_training``: it would turn on gradient checkpointing).
``--dora`` trains DoRA adapters on both sides (``use_dora``). ``--full`` compares full fine-tuning: loratune's
``train.method: full`` (bf16 weights, float32 master weights) against what transformers' ``Trainer(bf16=True)``
does (float32 weights, the forward and backward under ``torch.autocast`` in bf16, AdamW on the float32 weights).
``--with-lora`` adds loratune's plain LoRA run
(unquantized, no DoRA), for what quantization or DoRA costs.
"""

from __future__ import annotations

import argparse
import contextlib
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
DEMO_TRAIN = ROOT / "examples" / "demo" / "train.jsonl"


def make_fixed_length_data(tokenizer, path: Path, rows: int, length: int) -> None:
    """Text rows of exactly ``length`` tokens (every token a target), cut from the demo task's text."""
    texts = [json.loads(line)["messages"] for line in DEMO_TRAIN.read_text().splitlines()]
    stream: list[int] = []
    for messages in texts:
        stream += tokenizer(" ".join(m["content"] for m in messages) + "\n", add_special_tokens=False)["input_ids"]
        if len(stream) >= rows * length:
            break
    # A text row gets EOS appended when tokenized: leave room for it.
    chunks = [stream[i * (length - 1) : (i + 1) * (length - 1)] for i in range(rows)]
    with path.open("w") as handle:
        for chunk in chunks:
            handle.write(json.dumps({"text": tokenizer.decode(chunk)}) + "\n")


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_roofline(config, batch: int, length: int, r: int, dtype: str) -> tuple[float, float]:
    """(tokens/s, GFLOP per token) of a LoRA step made of nothing but its matrix products, timed at their
    shapes: per frozen linear layer the forward (T × in × out) and input-gradient (T × out × in) products; per
    LoRA layer the four rank-r products of its forward and backward plus its two weight gradients; per
    attention layer the two forward and four backward batched products (every score, as a dense kernel
    computes them); lm_head's forward and input gradient."""
    import torch

    from loratune.models import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    tokens = batch * length
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    linears = [
        (hidden, heads * head_dim),
        (hidden, kv),
        (hidden, kv),
        (heads * head_dim, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    cache: dict[tuple, float] = {}

    def mm(m: int, k: int, n: int, count: int = 1) -> tuple[float, float]:
        if (m, k, n) not in cache:
            a, b = torch.randn(m, k, dtype=torch_dtype), torch.randn(k, n, dtype=torch_dtype)
            cache[(m, k, n)] = _best_seconds(lambda: a @ b)
        return count * cache[(m, k, n)], count * 2.0 * m * k * n

    def bmm(g: int, m: int, k: int, n: int, count: int) -> tuple[float, float]:
        if (g, m, k, n) not in cache:
            a, b = torch.randn(g, m, k, dtype=torch_dtype), torch.randn(g, k, n, dtype=torch_dtype)
            cache[(g, m, k, n)] = _best_seconds(lambda: torch.bmm(a, b))
        return count * cache[(g, m, k, n)], count * 2.0 * g * m * k * n

    parts = []
    for d_in, d_out in linears:
        parts += [mm(tokens, d_in, d_out), mm(tokens, d_out, d_in)]  # frozen forward, input gradient
        # LoRA: x·Aᵀ, ·Bᵀ forward; grad·B, ·A input gradient; grad_B = gradᵀ·xa, grad_A = hᵀ·x
        parts += [
            mm(tokens, d_in, r),
            mm(tokens, r, d_out),
            mm(tokens, d_out, r),
            mm(tokens, r, d_in),
            mm(d_out, tokens, r),
            mm(r, tokens, d_in),
        ]
    g = batch * heads
    parts += [
        bmm(g, length, head_dim, length, 1),
        bmm(g, length, length, head_dim, 1),  # scores, output
        bmm(g, length, head_dim, length, 1),
        bmm(g, length, length, head_dim, 3),
    ]  # their gradients
    layer_seconds = sum(p[0] for p in parts)
    layer_flops = sum(p[1] for p in parts)
    head_seconds, head_flops = (
        sum(x) for x in zip(mm(tokens, hidden, config.vocab_size), mm(tokens, config.vocab_size, hidden))
    )
    seconds = config.num_hidden_layers * layer_seconds + head_seconds
    flops = config.num_hidden_layers * layer_flops + head_flops
    return tokens / seconds, flops / tokens / 1e9


def start_step_memory() -> float | None:
    """Reset this process's peak-RSS mark (Linux) and return its RSS now (MiB): what the model and the trainer's
    set-up hold before the first step. None where the mark cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def step_memory_mib(start: float | None) -> float | None:
    """What the training steps added on top of ``start_step_memory``'s RSS at their peak (MiB): activations,
    gradients, optimizer states and temporaries."""
    if start is None:
        return None
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024 - start


def run_loratune(args) -> dict:
    import yaml

    from loratune.train import load_config, train

    floor = peak_rss_mib()  # the libraries, before the model loads
    run = Path(args.workdir) / "loratune-run"
    config_path = Path(args.workdir) / "config.yaml"
    config = {
        "model": {
            "name": args.model,
            "dtype": args.dtype,
            "quantize": None if args.impl == "loratune-lora" else args.quantize,
        },
        "lora": {
            "r": args.r,
            "lora_alpha": 2 * args.r,
            "lora_dropout": 0.0,
            "target_modules": "all-linear",
            "use_dora": args.dora and args.impl != "loratune-lora",
        },
        "train_method": "full" if args.full and args.impl != "loratune-lora" else "lora",
        "data": {"train": args.data_file, "max_length": args.length, "packing": args.packing},
        "train": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 2e-4,
            "scheduler": "constant",
            "log_every": 1,
            "save_every": 10_000,
            "max_grad_norm": None,
            "seed": 0,
        },
        "output_dir": str(run),
    }
    config["train"]["method"] = config.pop("train_method")
    if not getattr(args, "recompute_experts", True):  # bench/moe_vs_peft.py --no-recompute
        config["train"]["recompute_experts"] = False
    config_path.write_text(yaml.safe_dump(config))
    before_steps = []

    def log(line, *_):  # the trainer says "N steps of ..." right before its first step
        if " steps of " in str(line) and not before_steps:
            before_steps.append(start_step_memory())

    train(load_config(config_path), overwrite=True, progress=False, log=log)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[args.warmup :]),
        "losses": [r["loss"] for r in steps],
        "peak_rss_mib": peak_rss_mib(),
        "floor_rss_mib": floor,
        "step_memory_mib": step_memory_mib(before_steps[0] if before_steps else None),
    }


def run_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loratune.models import resolve_dtype
    from loratune.models.loader import resolve_model_dir

    args.floor_rss_mib = peak_rss_mib()  # the libraries, before the model loads
    model_dir = resolve_model_dir(args.model)
    torch.manual_seed(0)
    quant = {}
    if args.quantize:
        from transformers import BitsAndBytesConfig

        quant = {
            "device_map": "cpu",
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=args.quantize,
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=resolve_dtype(args.dtype),
            ),
        }
    weights_dtype = torch.float32 if args.full else resolve_dtype(args.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=weights_dtype, **quant)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if args.full:
        return _train_plain(args, model, tokenizer, torch.autocast("cpu", dtype=resolve_dtype(args.dtype)))
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            lora_dropout=0.0,
            use_dora=args.dora,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    # Start from loratune's initial adapter: same seed, same init as the loratune run.
    start = Path(args.workdir) / "initial-adapter"
    state = {
        k.replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight")
        .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"): v
        for k, v in _load_safetensors(start / "adapter_model.safetensors").items()
    }
    missing = model.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys[:3]
    return _train_plain(args, model, tokenizer, contextlib.nullcontext())


def _train_plain(args, model, tokenizer, precision) -> dict:
    """The peer's loop: transformers computes the loss, torch's AdamW updates every trainable parameter."""
    import torch

    from loratune.data import batch_order, build_dataset, collate
    from loratune.train.config import TrainSection

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    floor = getattr(args, "floor_rss_mib", None)
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=TrainSection().weight_decay, foreach=True)
    examples, _ = build_dataset(args.data_file, tokenizer, max_length=args.length)
    order = batch_order(len(examples), args.batch, 0, 0, lengths=[len(e) for e in examples])
    speeds, losses = [], []
    before_steps = start_step_memory()
    for step in range(args.steps):
        batch = collate([examples[i] for i in order[step % len(order)]], tokenizer.pad_token_id)
        started = time.perf_counter()
        with precision:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - started))
        losses.append(loss.item())
    return {
        "tokens_per_s": statistics.median(speeds[args.warmup :]),
        "losses": losses,
        "peak_rss_mib": peak_rss_mib(),
        "floor_rss_mib": floor,
        "step_memory_mib": step_memory_mib(before_steps),
    }


def _load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def write_initial_adapter(args) -> None:
    """The adapter both trainers start from: loratune's init under seed 0 (what ``train`` creates)."""
    import torch

    import loratune

    model, _ = loratune.load_model(args.model, dtype=args.dtype)
    torch.manual_seed(0)
    loratune.add_adapter(
        model, loratune.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=args.dora)
    )
    loratune.save_adapter(model, Path(args.workdir) / "initial-adapter")


def child(args) -> None:
    result = run_peft(args) if args.impl == "peft" else run_loratune(args)
    print("RESULT " + json.dumps(result), flush=True)


def parent(args) -> None:
    import loratune
    from loratune.models.loader import resolve_model_dir

    workdir = Path(tempfile.mkdtemp(prefix="loratune-bench-"))
    args.workdir = str(workdir)
    model, tokenizer = loratune.load_model(args.model, dtype="fp32")
    resolve_model_dir(args.model)
    roofline = matmul_roofline(model.config, args.batch, args.length, args.r, args.dtype)
    del model
    if args.data == "fixed":
        data_file = workdir / "fixed.jsonl"
        make_fixed_length_data(tokenizer, data_file, rows=args.batch * (args.steps + 1), length=args.length)
    else:
        data_file = DEMO_TRAIN
    write_initial_adapter(args)
    if args.quantize:
        print_quantized_size(args)
    results: dict[str, list[dict]] = {"loratune": [], "peft": []}
    for rep in range(args.reps):
        for impl in ("loratune", "peft") if rep % 2 == 0 else ("peft", "loratune"):
            result = run_child(args, impl, workdir, data_file)
            results[impl].append(result)
            print(
                f"rep {rep + 1} {impl:8s} {result['tokens_per_s']:8.1f} tok/s  "
                f"peak RSS {result['peak_rss_mib']:7.0f} MiB  "
                f"loss@1 {result['losses'][0]:.4f}  loss@{args.steps} {result['losses'][-1]:.4f}",
                flush=True,
            )
    if args.with_lora and (args.quantize or args.dora or args.full):
        results["loratune-lora"] = [run_child(args, "loratune-lora", workdir, data_file)]
        lora = results["loratune-lora"][0]
        print(f"loratune plain LoRA: {lora['tokens_per_s']:.1f} tok/s, peak RSS {lora['peak_rss_mib']:.0f} MiB")
    report(args, results, roofline)


def run_child(args, impl, workdir, data_file) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--workdir",
        str(workdir),
        "--data-file",
        str(data_file),
        *_passthrough(args),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{impl} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def print_quantized_size(args) -> None:
    """Bytes per parameter of the 4-bit layers as loratune stores them."""
    import loratune
    from loratune.models.quantized import quantized_summary

    model, _ = loratune.load_model(args.model, quantize=args.quantize, dtype=args.dtype)
    s = quantized_summary(model)
    print(
        f"loratune {args.quantize}: {s['layers']} quantized layers, {s['parameters'] / 1e6:.1f}M parameters in "
        f"{s['bytes'] / 2**20:.1f} MiB = {s['bytes_per_parameter']:.4f} bytes/parameter",
        flush=True,
    )


def report(args, results, roofline: tuple[float, float]) -> None:
    def med(impl, key):
        return statistics.median(r[key] for r in results[impl])

    lt, pt = med("loratune", "tokens_per_s"), med("peft", "tokens_per_s")
    lm, pm = med("loratune", "peak_rss_mib"), med("peft", "peak_rss_mib")
    l_loss, p_loss = results["loratune"][0]["losses"], results["peft"][0]["losses"]
    rel = [abs(a - b) / abs(b) for a, b in zip(l_loss, p_loss)]
    print()
    print(
        f"model {args.model}{' ' + args.quantize + ' base' if args.quantize else ''}, {args.dtype}, "
        f"batch {args.batch} x {args.length} ({args.data} data), "
        f"{'full fine-tuning' if args.full else f'r={args.r} all-linear'}{' DoRA' if args.dora else ''}, "
        f"{args.steps} steps ({args.warmup} warm-up excluded), {args.reps} reps, medians"
    )
    print("| trainer | tokens/s | peak RSS (MiB) |")
    print("|---|---|---|")
    print(f"| {'transformers (full, bf16 autocast)' if args.full else 'PEFT + transformers'} | {pt:.0f} | {pm:.0f} |")
    print(f"| loratune | {lt:.0f} | {lm:.0f} |")
    print(f"| ratio loratune / {'transformers' if args.full else 'PEFT'} | {lt / pt:.2f}x | {lm / pm:.2f}x |")
    if "loratune-lora" in results:
        lora = results["loratune-lora"][0]
        print(f"| loratune plain LoRA, unquantized base | {lora['tokens_per_s']:.0f} | {lora['peak_rss_mib']:.0f} |")
        if args.dora:
            print(
                f"DoRA's cost over plain LoRA in loratune: {lora['tokens_per_s'] / lt:.2f}x the time per token, "
                f"{lm / lora['peak_rss_mib']:.2f}x the memory"
            )
    ceiling, gflop = roofline
    print(
        f"matmul roofline ({gflop:.2f} GFLOP per token, each product timed at its shape): {ceiling:.0f} tokens/s; "
        f"loratune at {100 * lt / ceiling:.0f}% of it, PEFT at {100 * pt / ceiling:.0f}%"
    )
    print(f"loss agreement: step 1 {100 * rel[0]:.3f}% , step {len(rel)} {100 * rel[-1]:.3f}% relative difference")


def _passthrough(args) -> list[str]:
    return [
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
        "--data",
        args.data,
        *(["--packing"] if args.packing else []),
        *(["--quantize", args.quantize] if args.quantize else []),
        *(["--dora"] if args.dora else []),
        *(["--full"] if args.full else []),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256, help="sequence length (fixed data) / max_length")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps excluded from the speed median")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--data",
        choices=("fixed", "demo"),
        default="fixed",
        help="fixed: batch x length text rows; demo: the variable-length demo chat data",
    )
    parser.add_argument("--packing", action="store_true", help="loratune packs rows (demo data)")
    parser.add_argument(
        "--quantize",
        choices=("nf4", "fp4"),
        default=None,
        help="QLoRA: train over a 4-bit base on both sides (bitsandbytes for PEFT)",
    )
    parser.add_argument("--dora", action="store_true", help="train DoRA adapters (use_dora) on both sides")
    parser.add_argument(
        "--full", action="store_true", help="full fine-tuning on both sides (the peer: transformers with bf16 autocast)"
    )
    parser.add_argument(
        "--with-lora",
        action="store_true",
        help="with --quantize or --dora: also run loratune's plain LoRA once, for comparison",
    )
    parser.add_argument("--child", choices=("loratune", "peft", "loratune-lora"), dest="impl", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.impl else parent(args)


if __name__ == "__main__":
    main()
