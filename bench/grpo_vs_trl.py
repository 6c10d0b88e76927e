"""A GRPO step: loratune vs TRL's ``GRPOTrainer`` + PEFT, same model, prompts, reward, group size, completion length,
batch, LoRA config, starting adapter and dtype.

Each trainer runs in its own process (so peak RSS is its own), alternating, several repetitions. A step is one
generation and one optimizer step (``steps_per_generation`` = ``num_iterations`` = 1, TRL's defaults): ``batch``
prompts × ``group`` completions sampled, scored, then trained on. Reported per trainer: the median wall time of a
step (the first ``warmup`` steps excluded), split into the rollout (generating, scoring and the advantages:
loratune's ``GRPO._generate``, TRL's ``_generate_and_score_completions``) and the rest (forwards, backwards and the
update), completion tokens per second of each, the completions' mean length, and the peak RSS of the process; then
the ratios. loratune generates with its serving engine on the training model; TRL with transformers' ``generate``
on the PEFT model (its default, no vLLM).

The prompts ask for a paragraph on a topic, so nearly every completion runs to ``max_new_tokens`` on both sides and
both do the same work (the mean lengths are printed to check). The reward (``short_words`` below, TRL's signature,
the same function object on both sides) is the share of short words: it varies within a group, so every step has
non-zero advantages and a real backward. ``beta`` 0 and ``loss_type`` dapo (both trainers' defaults).

    python bench/grpo_vs_trl.py                          # fp32, 2 prompts x group 4, 48 new tokens, 4 steps, 2 reps
    python bench/grpo_vs_trl.py --trl-checkpointing      # TRL with its default gradient checkpointing on

TRL's ``GRPOConfig`` defaults to ``bf16=True`` and ``gradient_checkpointing=True``; here TRL runs ``bf16=False`` in
the bench's ``--dtype`` (fp32 by default) and, unless ``--trl-checkpointing``, without checkpointing, like loratune.
On a CPU without native bf16 use fp32 (bf16 matrix products run tens of times slower there).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mib
from dpo_vs_trl import Clock, write_initial_adapter  # the DPO bench's step clock and shared initial adapter

TOPICS = [
    "the ocean",
    "a city at night",
    "learning to cook",
    "the history of bicycles",
    "why people keep gardens",
    "a rainy afternoon",
    "the moon landing",
    "trains in winter",
    "how bread is made",
    "a walk in the mountains",
    "the first day at a new job",
    "old libraries",
    "a thunderstorm",
    "coffee",
    "the life of bees",
    "a harbour at dawn",
]


def short_words(prompts, completions, **kwargs):
    """The share of words of at most five letters in each completion (TRL's reward signature)."""
    rewards = []
    for completion in completions:
        text = completion[0]["content"] if isinstance(completion, list) else completion
        words = text.split()
        rewards.append(sum(len(w.strip(".,;:!?\"'")) <= 5 for w in words) / max(1, len(words)))
    return rewards


def write_prompts(path: Path, rows: int) -> None:
    with path.open("w") as handle:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            handle.write(json.dumps({"prompt": [{"role": "user", "content": f"Write a paragraph about {topic}."}]}))
            handle.write("\n")


def run_loratune(args) -> dict:
    """loratune's ``train()`` with ``train.objective: grpo``; the step and the rollout timed around the recipe's
    ``step`` and the objective's ``_generate``."""
    import yaml

    from loratune.train import load_config, train
    from loratune.train.objectives.grpo import GRPO
    from loratune.train.recipe import Recipe

    steps, rollouts = Clock(), Clock()
    generate, step = GRPO._generate, Recipe.step

    def timed_generate(self, *a, **k):
        rollouts.start()
        generate(self, *a, **k)
        rollouts.stop()

    def timed_step(self, *a, **k):
        steps.start()
        out = step(self, *a, **k)
        steps.stop()
        return out

    GRPO._generate, Recipe.step = timed_generate, timed_step
    run = Path(args.workdir) / "loratune-run"
    config = {
        "model": {"name": args.model, "dtype": args.dtype},
        "data": {"train": args.data_file},
        "train": {
            "objective": "grpo",
            "init_adapter": str(Path(args.workdir) / "initial-adapter"),
            "max_steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-5,
            "scheduler": "constant",
            "log_every": 1,
            "save_every": 10_000,
            "seed": 0,
        },
        "grpo": {
            "group_size": args.group,
            "max_new_tokens": args.max_new_tokens,
            "rewards": [f"{Path(__file__).resolve()}:short_words"],
        },
        "output_dir": str(run),
    }
    config_path = Path(args.workdir) / "grpo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    train(load_config(config_path), overwrite=True, progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "reward" in r]
    return {
        "step_s": steps.wall,
        "rollout_s": rollouts.wall,
        "step_cpu": steps.cpu,
        "rollout_cpu": rollouts.cpu,
        "mean_length": [r["completions/mean_length"] for r in records],
        "reward": [r["reward"] for r in records],
        "peak_rss_mib": peak_rss_mib(),
    }


def run_trl(args) -> dict:
    """TRL's ``GRPOTrainer`` over a PEFT model (transformers' ``generate``); the rollout timed around
    ``_generate_and_score_completions``, the step from ``on_step_begin`` to ``on_step_end``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from loratune.models import resolve_dtype
    from loratune.models.loader import resolve_model_dir

    steps, rollouts, lengths, rewards = Clock(), Clock(), [], []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            rollouts.start()
            out = super()._generate_and_score_completions(inputs)
            rollouts.stop()
            lengths.append(float(out["completion_mask"].sum(1).float().mean()))
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            steps.start()

        def on_step_end(self, *a, **k):
            steps.stop()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    model_dir = resolve_model_dir(args.model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=resolve_dtype(args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in Path(args.data_file).read_text().splitlines()]
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl-run"),
        num_generations=args.group,
        per_device_train_batch_size=args.group * args.batch,  # TRL counts completions
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps,
        learning_rate=1e-5,
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
    trainer = Timed(
        model=model,
        reward_funcs=short_words,
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
    return {
        "step_s": steps.wall,
        "rollout_s": rollouts.wall,
        "step_cpu": steps.cpu,
        "rollout_cpu": rollouts.cpu,
        "mean_length": lengths,
        "reward": rewards,
        "peak_rss_mib": peak_rss_mib(),
    }


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
    """Medians over the timed steps of one run: step, rollout and training seconds, and completion tokens/s."""
    timed = slice(args.warmup, None)
    step = statistics.median(result["step_s"][timed])
    rollout = statistics.median(result["rollout_s"][timed])
    length = statistics.mean(result["mean_length"][timed])
    tokens = length * args.group * args.batch
    return {
        "step": step,
        "step_cpu": statistics.median(result["step_cpu"][timed]),
        "rollout_cpu": statistics.median(result["rollout_cpu"][timed]),
        "rollout": rollout,
        "train": step - rollout,
        "length": length,
        "rollout_tps": tokens / rollout,
        "train_tps": tokens / (step - rollout),
        "rss": result["peak_rss_mib"],
    }


def parent(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="loratune-grpo-bench-"))
    args.workdir = str(workdir)
    args.data_file = str(workdir / "prompts.jsonl")
    write_prompts(Path(args.data_file), rows=64)
    write_initial_adapter(args)
    runs: dict[str, list[dict]] = {"loratune": [], "trl": []}
    for rep in range(args.reps):
        for impl in ("loratune", "trl") if rep % 2 == 0 else ("trl", "loratune"):
            result = run_child(args, impl)
            runs[impl].append(summary(args, result))
            s = runs[impl][-1]
            print(
                f"rep {rep + 1} {impl:8s} step {s['step']:6.1f} s (rollout {s['rollout']:6.1f} s, training "
                f"{s['train']:6.1f} s; CPU {s['step_cpu']:6.1f} s, rollout {s['rollout_cpu']:6.1f} s)  "
                f"mean length {s['length']:5.1f}  peak RSS {s['rss']:6.0f} MiB  "
                f"rewards {', '.join(f'{r:.3f}' for r in result['reward'])}",
                flush=True,
            )
    report(args, runs)


def report(args, runs) -> None:
    def med(impl, key):
        return statistics.median(r[key] for r in runs[impl])

    print()
    print(
        f"model {args.model}, {args.dtype}, {args.batch} prompts x group {args.group}, {args.max_new_tokens} new "
        f"tokens, r={args.r} all-linear, {args.steps} steps ({args.warmup} warm-up excluded), {args.reps} reps, "
        f"medians; TRL gradient checkpointing {'on' if args.trl_checkpointing else 'off'}"
    )
    print(
        "| trainer | step (s) | rollout (s) | training (s) | step CPU (s) | rollout CPU (s) | rollout tok/s "
        "| training tok/s | mean length | peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for impl, name in (("trl", "TRL GRPOTrainer + PEFT"), ("loratune", "loratune")):
        print(
            f"| {name} | {med(impl, 'step'):.1f} | {med(impl, 'rollout'):.1f} | {med(impl, 'train'):.1f} | "
            f"{med(impl, 'step_cpu'):.1f} | {med(impl, 'rollout_cpu'):.1f} | "
            f"{med(impl, 'rollout_tps'):.1f} | {med(impl, 'train_tps'):.1f} | {med(impl, 'length'):.1f} | "
            f"{med(impl, 'rss'):.0f} |"
        )

    def ratio(key):
        return f"{med('trl', key) / med('loratune', key):.2f}x"

    print(
        f"| **TRL / loratune** | **{ratio('step')}** | {ratio('rollout')} | {ratio('train')} | {ratio('step_cpu')} | "
        f"{ratio('rollout_cpu')} | | | | **{med('loratune', 'rss') / med('trl', 'rss'):.2f}x** (loratune / TRL) |"
    )


def _passthrough(args) -> list[str]:
    out = ["--model", args.model, "--dtype", args.dtype, "--batch", str(args.batch), "--group", str(args.group)]
    out += ["--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out += ["--r", str(args.r)]
    return out + (["--trl-checkpointing"] if args.trl_checkpointing else [])


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=2, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (TRL's num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="TRL's max_completion_length")
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
