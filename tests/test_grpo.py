"""GRPO as a training objective (``train.objective: grpo``) on a tiny random Llama: rollouts from the serving engine
on the trained model, rewards with TRL's signature, the run's metrics and completions, resume, and learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from loratune.errors import ConfigError
from loratune.train import train, validate_config
from loratune.train.objectives.grpo import COMPLETIONS_FILE, GRPO, group_advantages
from loratune.train.rewards import RewardError
from run_helpers import adapter_tensors, assert_same_tensors, config_dict, train_records, write_jsonl

QUIET = dict(progress=False, log=lambda line: None)
# TRL 1.x's GRPOConfig sets transformers' deprecated gradient_checkpointing itself; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def prompt_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(start, start + n)]


def chat_prompt_rows(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"say {i}"}], "answer": str(i)} for i in range(n)]


def grpo_config(model_dir, train_file, output_dir, **sections):
    """A small GRPO run's validated config: 4 completions of at most 6 tokens per prompt, 2 prompts a micro-batch."""
    sections["train"] = {"objective": "grpo", **sections.get("train", {})}
    sections["grpo"] = {"group_size": 4, "max_new_tokens": 6, **sections.get("grpo", {})}
    return validate_config(config_dict(model_dir, train_file, output_dir, **sections), default_output_dir="unused")


def write_rewards(path: Path, source: str) -> Path:
    path.write_text(source)
    return path


LENGTH_REWARD = '''
def short(prompts, completions, completion_ids, **kwargs):
    """A reward the tiny model can learn: fewer tokens are better."""
    return [-float(len(ids)) for ids in completion_ids]
'''


def test_a_grpo_run_samples_scores_and_logs_trl_metric_names(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(8))
    rewards = write_rewards(tmp_path / "rewards.py", LENGTH_REWARD)
    config = grpo_config(
        tiny_llama_dir,
        data,
        tmp_path / "run",
        train={"max_steps": 3, "log_every": 1},
        grpo={"rewards": [f"{rewards}:short", "exact_match"], "reward_weights": [0.5, 1.0], "beta": 0.04},
    )
    summary = train(config, **QUIET)
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        for name in (
            "reward",
            "reward_std",
            "rewards/short/mean",
            "rewards/short/std",
            "rewards/exact_match/mean",
            "frac_reward_zero_std",
            "completions/mean_length",
            "completions/clipped_ratio",
            "clip_ratio/region_mean",
            "kl",
            "rollout/tokens_per_s",
            "tokens_per_s",
        ):
            assert name in record and math.isfinite(record[name]), name
        assert 1 <= record["completions/mean_length"] <= 6
        # the reward is the weighted sum of the functions' means (no None here)
        assert record["reward"] == pytest.approx(
            0.5 * record["rewards/short/mean"] + record["rewards/exact_match/mean"], abs=1e-5
        )
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the base
    samples = [json.loads(line) for line in (tmp_path / "run" / COMPLETIONS_FILE).read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 8 + [2] * 8 + [3] * 8  # 2 prompts × 4 completions a step
    assert set(samples[0]) >= {"prompt", "completion", "rewards", "reward", "advantage"}
    assert samples[0]["rewards"]["short"] <= -1
    assert summary["steps"] == 3


@pytest.mark.parametrize(
    "model, lora",
    [({"quantize": "nf4", "dtype": "fp32"}, {}), ({}, {"use_dora": True})],
    ids=["qlora-nf4", "dora"],
)
def test_grpo_trains_over_a_4bit_base_and_with_dora(tiny_llama_dir, tmp_path, model, lora):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(4))
    # rewards that differ within every group, so that every step has advantages to learn from
    rewards = write_rewards(
        tmp_path / "rewards.py",
        "def spread(prompts, completions, **kw):\n    return [float(i % 4) for i in range(len(completions))]\n",
    )
    config = grpo_config(
        tiny_llama_dir,
        data,
        tmp_path / "run",
        model=model,
        lora=lora,
        train={"max_steps": 2, "log_every": 1, "lr": 1e-2},
        grpo={"rewards": [f"{rewards}:spread"], "beta": 0.04},
    )
    train(config, **QUIET)
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in records)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the fresh adapter (DoRA's too) is the base
    assert records[1]["kl"] > 0  # and the first step moved it
    tensors = adapter_tensors(tmp_path / "run")
    assert any("lora_magnitude_vector" in key for key in tensors) == bool(lora)


def test_overwrite_replaces_a_grpo_run_with_its_completions_log(tiny_llama_dir, tmp_path):
    """completions.jsonl is in the run's record of what loratune wrote, so --overwrite may replace the run."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(4))
    config = grpo_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 1, "log_every": 1})
    train(config, **QUIET)
    assert (tmp_path / "run" / COMPLETIONS_FILE).is_file()
    train(config, overwrite=True, **QUIET)
    samples = (tmp_path / "run" / COMPLETIONS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in samples] == [1] * 8  # the new run's, not appended to the old


def test_conversational_prompts_hand_message_lists_to_the_rewards(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", chat_prompt_rows(4))
    rewards = write_rewards(
        tmp_path / "rewards.py",
        """
def shapes(prompts, completions, answer, **kwargs):
    assert prompts[0][-1]["role"] == "user" and completions[0][0]["role"] == "assistant", (prompts[0], completions[0])
    assert len(answer) == len(completions)
    return [float(len(c[0]["content"]) > 0) for c in completions]
""",
    )
    config = grpo_config(
        tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 1}, grpo={"rewards": [f"{rewards}:shapes"]}
    )
    train(config, **QUIET)
    assert "rewards/shapes/mean" in train_records(tmp_path / "run")[0]


FIRST_TOKEN_EVEN = '''
def even_start(prompts, completions, completion_ids, **kwargs):
    """A reward a tiny model learns in a few steps: the completion's first token has an even id."""
    return [float(ids[0] % 2 == 0) for ids in completion_ids]
'''


def test_the_reward_rises_on_held_out_prompts(make_tiny_llama_dir, tmp_path):
    # a wider init than the default 0.02: the tiny model's logits then depend enough on its hidden states for an
    # adapter to move them (at 0.02 every token is about as likely as every other, whatever it learns)
    model_dir = make_tiny_llama_dir(initializer_range=0.3)
    train_file = write_jsonl(tmp_path / "train.jsonl", prompt_rows(16))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", prompt_rows(16, start=100))
    rewards = write_rewards(tmp_path / "rewards.py", FIRST_TOKEN_EVEN)
    config = grpo_config(
        model_dir,
        train_file,
        tmp_path / "run",
        lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        data={"eval": str(eval_file)},
        train={"max_steps": 30, "batch_size": 4, "lr": 0.05, "eval_every": 30, "log_every": 10},
        grpo={"group_size": 8, "max_new_tokens": 2, "rewards": [f"{rewards}:even_start"], "loss_type": "grpo"},
    )
    summary = train(config, **QUIET)
    evaluations = [r for r in train_records_and_evals(tmp_path / "run") if "eval_reward" in r]
    assert evaluations[0]["step"] == 0 and evaluations[-1]["step"] == 30
    assert evaluations[0]["eval_reward"] <= 0.75  # the base's greedy first tokens: about half are even
    assert summary["eval"]["eval_reward"] >= 0.9
    assert summary["eval"]["eval_rewards/even_start"] == summary["eval"]["eval_reward"]


def train_records_and_evals(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def test_a_resumed_run_samples_and_ends_bit_identical_to_an_uninterrupted_one(tiny_llama_dir, tmp_path, monkeypatch):
    """One generation serves 4 steps (steps_per_generation 2 × num_iterations 2), so the crash lands inside a
    generation: the checkpoint must keep its unused micro-batches, and the rollouts after the resume must sample
    what the uninterrupted run sampled."""
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(8))
    rewards = write_rewards(tmp_path / "rewards.py", LENGTH_REWARD)
    settings = dict(
        lora={"lora_dropout": 0.1},
        train={"max_steps": 7, "batch_size": 1, "save_every": 1, "lr": 1e-2, "seed": 3},
        grpo={"rewards": [f"{rewards}:short"], "steps_per_generation": 2, "num_iterations": 2, "beta": 0.1},
    )
    train(grpo_config(tiny_llama_dir, data, tmp_path / "straight", **settings), **QUIET)

    interrupted = grpo_config(tiny_llama_dir, data, tmp_path / "interrupted", **settings)
    calls = {"n": 0}
    real = GRPO.loss_sum

    def crash_in_step_3(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(self, model, batch)

    monkeypatch.setattr(GRPO, "loss_sum", crash_in_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(interrupted, **QUIET)
    monkeypatch.undo()
    assert (tmp_path / "interrupted" / "checkpoints" / "step-2" / "objective.safetensors").is_file()
    train(interrupted, resume=True, **QUIET)

    assert_same_tensors(adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "interrupted"))
    resumed, straight = train_records(tmp_path / "interrupted"), train_records(tmp_path / "straight")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    for name in ("loss", "reward", "kl", "clip_ratio/region_mean", "grad_norm"):
        assert [r[name] for r in resumed] == [r[name] for r in straight], name
    completions = [(tmp_path / run / COMPLETIONS_FILE).read_text() for run in ("straight", "interrupted")]
    assert completions[0] == completions[1]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "def bad(prompts, completions, answer, **kw):\n    return [1.0 / (int(a) - 3) for a in answer]\n",
            r"reward function 'bad' \(.*rewards\.py:1\) failed on row .*p\.jsonl:3: ZeroDivisionError",
        ),
        (
            "def bad(prompts, completions, **kw):\n    return [1.0]\n",
            r"reward function 'bad' \(.*rewards\.py:1\) returned 1 rewards for 16 completions \(rows .*p\.jsonl:\d",
        ),
        (
            "def bad(prompts, completions, **kw):\n    return ['high'] * len(completions)\n",
            r"reward function 'bad' \(.*\) returned 'high' for row .*p\.jsonl:\d; a reward is a number or None",
        ),
    ],
)
def test_a_failing_reward_function_is_one_error_naming_it_and_the_row(tiny_llama_dir, tmp_path, source, message):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(8))  # row 3 has answer 3
    rewards = write_rewards(tmp_path / "rewards.py", source)
    config = grpo_config(
        tiny_llama_dir,
        data,
        tmp_path / "run",
        train={"batch_size": 8, "max_steps": 1, "seed": 1},
        grpo={"rewards": [f"{rewards}:bad"], "group_size": 2},
    )
    with pytest.raises(RewardError, match=message) as error:
        train(config, **QUIET)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        (["nope"], "unknown reward 'nope'"),
        (["missing.py:f"], "file 'missing.py' not found"),
        (["regex:(unclosed"], "not a valid regular expression"),
    ],
)
def test_rewards_that_cannot_load_are_config_errors(tiny_llama_dir, tmp_path, rewards, message):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(2))
    with pytest.raises(ConfigError, match=message):
        train(grpo_config(tiny_llama_dir, data, tmp_path / "run", grpo={"rewards": rewards}), **QUIET)


def test_built_in_rewards_and_none(tiny_llama_dir, tmp_path):
    from loratune.train.rewards import exact_match, json_valid, regex_reward

    assert exact_match(["q"] * 2, [" 4 ", "5"], answer=["4", "4"]) == [1.0, 0.0]
    conversational = [[{"role": "assistant", "content": '{"a": 1}'}], [{"role": "assistant", "content": "{"}]]
    assert json_valid([[], []], conversational) == [1.0, 0.0]
    assert regex_reward(r"\d{4}-\d{2}-\d{2}")(["q"] * 2, ["2024-01-31\n", "31/01/2024"]) == [1.0, 0.0]


def test_group_size_and_other_grpo_options_are_checked(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", prompt_rows(2))
    with pytest.raises(ConfigError, match="the grpo section applies to train.objective: grpo"):
        validate_config(config_dict(tiny_llama_dir, data, tmp_path / "r", grpo={"beta": 0.1}), default_output_dir="x")
    with pytest.raises(ConfigError, match="reward_weights has 2 weights for 1 rewards"):
        grpo_config(tiny_llama_dir, data, tmp_path / "r", grpo={"reward_weights": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="data.packing does not apply to GRPO's prompts"):
        train(grpo_config(tiny_llama_dir, data, tmp_path / "r", data={"packing": True}), **QUIET)


def test_advantages_equal_trls_own_computation(tmp_path, tiny_tokenizer):
    """TRL's GRPOTrainer computes the advantages from its reward functions' outputs (None included); ours from the
    same outputs equal them, for each scale_rewards."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from conftest import build_tiny_llama
    from loratune.train.objectives.grpo import combined_rewards

    first = [1.0, 0.0, None, 2.0, 0.5, 0.5, 0.5, 0.5, None, 1.0, 3.0, -1.0]
    second = [0.0, 1.0, 1.0, None, 0.0, 0.0, 0.0, 0.0, None, 0.0, 1.0, 2.0]

    def f(completions, **kwargs):
        return list(first)

    def g(completions, **kwargs):
        return list(second)

    weights = [1.0, 0.5]
    for scale in ("group", "batch", "none"):
        args = GRPOConfig(
            output_dir=str(tmp_path / scale),
            report_to="none",
            use_cpu=True,
            num_generations=4,
            per_device_train_batch_size=12,
            max_completion_length=3,
            scale_rewards=scale,
            reward_weights=weights,
            bf16=False,
        )
        trainer = GRPOTrainer(
            model=build_tiny_llama(len(tiny_tokenizer), seed=0),
            reward_funcs=[f, g],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "Q"}] * 12),
            processing_class=tiny_tokenizer,
        )
        inputs = [{"prompt": p} for p in ("The", "The", "The", "The", "What", "What", "What", "What")] + [
            {"prompt": "1 +"}
        ] * 4
        theirs = trainer._generate_and_score_completions(inputs)["advantages"]
        per_function = torch.tensor(
            [[math.nan if v is None else v for v in column] for column in (first, second)], dtype=torch.float32
        ).T
        ours, _ = group_advantages(combined_rewards(per_function, torch.tensor(weights)), 4, scale)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)
