"""QLoRA at scale: load a ~7B Llama-architecture checkpoint in NF4 and run a few training steps, measuring the
peak RSS of the whole process (load included) and seconds per step; the same for PEFT + transformers +
bitsandbytes loading the same checkpoint (or how it fails).

Each side runs in its own process; a watchdog polls its resident memory and stops it above ``--rss-limit-gb``
(so a peer that would hold the bf16 model cannot push the machine into swapping or the OOM killer).

    python bench/make_random_llama.py /work/scratch-7b          # random weights, shards of <= 2 GB
    python bench/qlora_scale.py /work/scratch-7b --steps 3

A mixture-of-experts checkpoint (``make_random_llama.py --experts N``) loads with its experts in 4 bits as they
stream in; ``--targets all-linear`` trains them. Reported besides: the 4-bit model's size (quantized weights plus
the modules kept in the model dtype) and the process's peak RSS against it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_gib() -> float:
    return peak_rss_mib() / 1024


def batch(tokenizer_vocab: int, length: int, step: int):
    import torch

    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(10, tokenizer_vocab - 1, (1, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_loratune(args) -> dict:
    """Load through ``load_model(quantize="nf4")``, add LoRA on ``--targets``, train with the trainer's patched ops
    and recomputation."""
    import torch

    import loratune
    from loratune.layers.experts import recompute_in_backward
    from loratune.models.quantized import quantized_summary
    from loratune.train.fused_ops import patch_for_training, recompute_norm_outputs

    floor = peak_rss_gib()
    started = time.perf_counter()
    model, tokenizer = loratune.load_model(args.model, quantize="nf4", dtype=args.dtype)
    load_s, load_rss = time.perf_counter() - started, peak_rss_gib()
    summary = quantized_summary(model)
    kept = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype != torch.uint8)
    summary["model_bytes"] = summary["bytes"] + kept  # the 4-bit model: quantized weights + what stays in dtype
    summary["floor_gib"] = floor
    torch.manual_seed(0)
    loratune.add_adapter(model, loratune.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets(args)))
    patch_for_training(model)
    enable_checkpointing(args, model)
    model.train()

    def trainer_forward():  # what the trainer runs its forward under
        stack = contextlib.ExitStack()
        stack.enter_context(recompute_norm_outputs())
        stack.enter_context(recompute_in_backward(not args.gradient_checkpointing))
        return stack

    return train_steps(args, model, len(tokenizer), load_s, load_rss, summary, trainer_forward)


def run_peft(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    started = time.perf_counter()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
    )
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=dtype, device_map="cpu")
    load_s, load_rss = time.perf_counter() - started, peak_rss_gib()
    torch.manual_seed(0)
    moe = args.targets == "all-linear" and any(p.dim() == 3 for p in model.parameters())  # fused experts
    config = LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        target_modules=targets(args),
        target_parameters=["experts.gate_up_proj", "experts.down_proj"] if moe else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    enable_checkpointing(args, model)
    model.train()
    return train_steps(args, model, model.config.vocab_size, load_s, load_rss, None)


def targets(args) -> str | list[str]:
    return "all-linear" if args.targets == "all-linear" else args.targets.split(",")


def enable_checkpointing(args, model) -> None:
    """Activation checkpointing for both sides alike (``--gradient-checkpointing``), as loratune's trainer does."""
    if not args.gradient_checkpointing:
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_steps(args, model, vocab, load_s, load_rss, summary, forward_context=contextlib.nullcontext) -> dict:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    step_s, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        with forward_context():
            loss = model(**batch(vocab, args.length, step)).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - started)
        losses.append(loss.item())
        print(
            f"step {step + 1}: {step_s[-1]:.1f} s, loss {losses[-1]:.3f}, peak RSS {peak_rss_gib():.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    return {
        "load_s": load_s,
        "load_peak_rss_gib": load_rss,
        "step_s": step_s,
        "losses": losses,
        "peak_rss_gib": peak_rss_gib(),
        "trainable": sum(p.numel() for p in params),
        "quantized": summary,
    }


def watch(cmd: list[str], limit_gib: float) -> tuple[dict | None, str, float]:
    """Run ``cmd``; return (its RESULT, a note, the highest RSS seen). Kills it above ``limit_gib``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        highest, note = 0.0, ""
        while proc.poll() is None:
            try:
                fields = Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()
                highest = max(highest, int(fields[0]) / 2**20)
            except (OSError, IndexError):
                pass
            if highest > limit_gib:
                proc.kill()
                note = f"stopped by the watchdog at {highest:.1f} GiB RSS (limit {limit_gib} GiB)"
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    sys.stderr.write(stderr[-2000:])
    line = next((text for text in stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None and not note:
        note = f"failed (exit {proc.returncode}): {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
    return (json.loads(line[len("RESULT ") :]) if line else None), note, highest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory (safetensors shards)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated modules, or all-linear")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="compute dtype")
    parser.add_argument("--rss-limit-gb", type=float, default=16.0, help="watchdog limit for each process (GiB)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each block's activations in backward (both sides)",
    )
    parser.add_argument("--only", choices=("loratune", "peft"), default=None)
    parser.add_argument("--child", choices=("loratune", "peft"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_loratune(args) if args.child == "loratune" else run_peft(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    passthrough = [
        args.model,
        "--steps",
        str(args.steps),
        "--length",
        str(args.length),
        "--r",
        str(args.r),
        "--targets",
        args.targets,
        "--dtype",
        args.dtype,
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
    ]
    for impl in [args.only] if args.only else ["loratune", "peft"]:
        result, note, _highest = watch([sys.executable, __file__, "--child", impl, *passthrough], args.rss_limit_gb)
        if result is None:
            print(f"{impl}: {note}", flush=True)
            continue
        steps = result["step_s"]
        after_first = steps[1:] or steps
        q = result["quantized"]
        size = f", {q['bytes'] / 2**30:.2f} GiB in 4 bits ({q['bytes_per_parameter']:.4f} B/param)" if q else ""
        if q:
            model_gib = q["model_bytes"] / 2**30
            size += (
                f"; the 4-bit model {model_gib:.2f} GiB, load peak {result['load_peak_rss_gib'] / model_gib:.2f}x it "
                f"({(result['load_peak_rss_gib'] - q['floor_gib']) / model_gib:.2f}x above the libraries' "
                f"{q['floor_gib']:.2f} GiB)"
            )
        print(
            f"{impl}: load {result['load_s']:.0f} s (peak RSS {result['load_peak_rss_gib']:.2f} GiB){size}; "
            f"steps {', '.join(f'{s:.1f}' for s in steps)} s (median after the first "
            f"{sorted(after_first)[len(after_first) // 2]:.1f} s/step); peak RSS of the process "
            f"{result['peak_rss_gib']:.2f} GiB; losses {', '.join(f'{loss:.3f}' for loss in result['losses'])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
