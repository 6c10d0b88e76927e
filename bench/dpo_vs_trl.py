"""A DPO step: loratune vs TRL's ``DPOTrainer`` + PEFT, same model, preference pairs, batch, lengths, LoRA config,
starting adapter, optimizer and dtype.

Each trainer runs in its own process (so peak RSS is its own), alternating, several repetitions. Reported per trainer:
the median wall time and CPU time of an optimizer step (the first ``warmup`` steps excluded; a step is the
reference's no-grad forward, the policy's forward and backward over chosen and rejected, and the update), tokens per
second, the peak RSS of the process, and the ratios. Both use the base model with the adapter disabled as the
reference (TRL's behaviour with a PEFT model; loratune's ``dpo.reference: base``).

The pairs are standard text rows cut from the demo task's text to fixed token lengths (``--prompt-tokens``, and
``--completion-tokens`` for chosen and rejected each, EOS added), so every batch is unpadded on both sides. The data
set holds exactly one batch, so each step of both trainers sees the same pairs and their losses must agree step by
step (printed: both start at ln 2, a fresh adapter being the reference).

    python bench/dpo_vs_trl.py                          # fp32, 4 pairs of 32 + 64 tokens, 4 steps, 2 reps
    python bench/dpo_vs_trl.py --trl-checkpointing      # TRL with its default gradient checkpointing on

TRL's ``DPOConfig`` defaults to ``bf16=True`` and ``gradient_checkpointing=True``; here TRL runs ``bf16=False`` in the
bench's ``--dtype`` (fp32 by default) and, unless ``--trl-checkpointing``, without checkpointing, like loratune.
"""

from __future__ import annotations

import json
import math
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


def write_pairs(tokenizer, path: Path, rows: int, prompt_tokens: int, completion_tokens: int) -> None:
    """``rows`` standard preference rows whose prompt, chosen and rejected are cut from the demo text at exactly
    ``prompt_tokens`` / ``completion_tokens`` tokens."""
    stream: list[int] = []
    need = rows * (prompt_tokens + 2 * completion_tokens)
    for line in DEMO_TRAIN.read_text().splitlines():
        messages = json.loads(line)["messages"]
        stream += tokenizer(" ".join(m["content"] for m in messages) + "\n", add_special_tokens=False)["input_ids"]
        if len(stream) >= need:
            break
    position = 0

    def cut(n: int) -> str:
        nonlocal position
        position += n
        return tokenizer.decode(stream[position - n : position])

    with path.open("w") as handle:
        for _ in range(rows):
            row = {"prompt": cut(prompt_tokens), "chosen": cut(completion_tokens), "rejected": cut(completion_tokens)}
            handle.write(json.dumps(row) + "\n")


def write_initial_adapter(args) -> Path:
    """The adapter both trainers start from: loratune's r=8 all-linear init under seed 0."""
    import torch

    import loratune

    model, _ = loratune.load_model(args.model, dtype=args.dtype)
    torch.manual_seed(0)
    loratune.add_adapter(model, loratune.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear"))
    return loratune.save_adapter(model, Path(args.workdir) / "initial-adapter")


class Clock:
    """Wall and CPU seconds of each step."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)


def run_loratune(args) -> dict:
    """loratune's ``train()`` with ``train.objective: dpo``; each step timed around the recipe's ``step``."""
    import yaml

    from loratune.train import load_config, train
    from loratune.train.recipe import Recipe

    clock, step = Clock(), Recipe.step

    def timed_step(self, *a, **k):
        clock.start()
        out = step(self, *a, **k)
        clock.stop()
        return out

    Recipe.step = timed_step
    run = Path(args.workdir) / "loratune-run"
    config = {
        "model": {"name": args.model, "dtype": args.dtype},
        "data": {"train": args.data_file, "max_length": args.prompt_tokens + args.completion_tokens + 8},
        "train": {
            "objective": "dpo",
            "init_adapter": str(Path(args.workdir) / "initial-adapter"),
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 5e-5,
            "scheduler": "constant",
            "log_every": 1,
            "save_every": 10_000,
            "seed": 0,
        },
        "dpo": {"beta": 0.1, "loss_type": "sigmoid"},
        "output_dir": str(run),
    }
    config_path = Path(args.workdir) / "dpo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    train(load_config(config_path), overwrite=True, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return {"wall": clock.wall, "cpu": clock.cpu, "losses": losses, "peak_rss_mib": peak_rss_mib()}


def run_trl(args) -> dict:
    """TRL's ``DPOTrainer`` over a PEFT model; each step timed from ``on_step_begin`` to ``on_step_end``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from loratune.models import resolve_dtype
    from loratune.models.loader import resolve_model_dir

    clock, losses = Clock(), []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.stop()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    model_dir = resolve_model_dir(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=resolve_dtype(args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in Path(args.data_file).read_text().splitlines()]
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl-run"),
        beta=0.1,
        loss_type=["sigmoid"],
        per_device_train_batch_size=args.batch,
        max_length=args.prompt_tokens + args.completion_tokens + 8,
        max_steps=args.steps,
        learning_rate=5e-5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        bf16=False,  # TRL's default bf16=True would autocast; both sides run in --dtype
        gradient_checkpointing=args.trl_checkpointing,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[StepClock()],
    )
    start = load_file(Path(args.workdir) / "initial-adapter" / "adapter_model.safetensors")
    state = {k.replace(".weight", ".default.weight"): v for k, v in start.items()}
    result = trainer.model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    trainer.train()
    return {"wall": clock.wall, "cpu": clock.cpu, "losses": losses, "peak_rss_mib": peak_rss_mib()}


def run_child(args, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--workdir", args.workdir, "--data-file", args.data_file]
    cmd += _passthrough(args)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{impl} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def summary(args, result: dict) -> dict:
    timed = slice(args.warmup, None)
    tokens = args.batch * 2 * (args.prompt_tokens + args.completion_tokens + 1)
    wall = statistics.median(result["wall"][timed])
    return {
        "wall": wall,
        "cpu": statistics.median(result["cpu"][timed]),
        "tps": tokens / wall,
        "rss": result["peak_rss_mib"],
        "losses": result["losses"],
    }


def parent(args) -> None:
    from transformers import AutoTokenizer

    from loratune.models.loader import resolve_model_dir

    workdir = Path(tempfile.mkdtemp(prefix="loratune-dpo-bench-"))
    args.workdir = str(workdir)
    args.data_file = str(workdir / "pairs.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(args.model)))
    write_pairs(tokenizer, Path(args.data_file), args.batch, args.prompt_tokens, args.completion_tokens)
    write_initial_adapter(args)
    runs: dict[str, list[dict]] = {"loratune": [], "trl": []}
    for rep in range(args.reps):
        for impl in ("loratune", "trl") if rep % 2 == 0 else ("trl", "loratune"):
            runs[impl].append(summary(args, run_child(args, impl)))
            s = runs[impl][-1]
            print(
                f"rep {rep + 1} {impl:8s} step {s['wall']:6.1f} s wall, {s['cpu']:6.1f} s CPU  "
                f"{s['tps']:6.1f} tok/s  peak RSS {s['rss']:6.0f} MiB  "
                f"losses {', '.join(f'{x:.4f}' for x in s['losses'])}",
                flush=True,
            )
    report(args, runs)


def report(args, runs) -> None:
    def med(impl, key):
        return statistics.median(r[key] for r in runs[impl])

    print()
    print(
        f"model {args.model}, {args.dtype}, {args.batch} pairs of {args.prompt_tokens} + {args.completion_tokens} "
        f"tokens (+ EOS), sigmoid, beta 0.1, reference = base (adapter off), r={args.r} all-linear, {args.steps} "
        f"steps ({args.warmup} warm-up excluded), {args.reps} reps, medians; TRL gradient checkpointing "
        f"{'on' if args.trl_checkpointing else 'off'}"
    )
    print("| trainer | step wall (s) | step CPU (s) | tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for impl, name in (("trl", "TRL DPOTrainer + PEFT"), ("loratune", "loratune")):
        print(
            f"| {name} | {med(impl, 'wall'):.1f} | {med(impl, 'cpu'):.1f} | {med(impl, 'tps'):.1f} | "
            f"{med(impl, 'rss'):.0f} |"
        )
    wall, cpu = med("trl", "wall") / med("loratune", "wall"), med("trl", "cpu") / med("loratune", "cpu")
    memory = med("loratune", "rss") / med("trl", "rss")
    print(f"| **TRL / loratune** | **{wall:.2f}x** | {cpu:.2f}x | | **{memory:.2f}x** (loratune / TRL) |")
    ours, theirs = runs["loratune"][0]["losses"], runs["trl"][0]["losses"]
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    print(
        f"losses: loratune {', '.join(f'{x:.4f}' for x in ours)}; TRL {', '.join(f'{x:.4f}' for x in theirs)}; "
        f"largest difference {max(gaps):.2e} (ln 2 = {math.log(2):.4f})"
    )


def _passthrough(args) -> list[str]:
    out = ["--model", args.model, "--dtype", args.dtype, "--batch", str(args.batch)]
    out += ["--prompt-tokens", str(args.prompt_tokens), "--completion-tokens", str(args.completion_tokens)]
    out += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--r", str(args.r)]
    return out + (["--trl-checkpointing"] if args.trl_checkpointing else [])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--completion-tokens", type=int, default=64, help="of chosen and of rejected, before EOS")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="first steps excluded from the medians")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--trl-checkpointing", action="store_true", help="TRL with gradient checkpointing (its default)"
    )
    parser.add_argument("--child", choices=("loratune", "trl"), dest="impl", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        result = run_trl(args) if args.impl == "trl" else run_loratune(args)
        print("RESULT " + json.dumps(result), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
