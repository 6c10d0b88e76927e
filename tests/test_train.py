"""Tests for loratune.train: config loading and validation, the learning-rate schedule, the training loop
(run directory contract, resume, determinism, gradient accumulation, divergence, packing).

Every run trains a tiny random Llama (``tiny_llama_dir``) in float32 on CPU for a few steps (about a second).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import loratune.train.objectives.sft as trainer_module
from loratune.adapters import LoraConfig
from loratune.errors import ConfigError, ModelNotFoundError
from loratune.outputs import write_text_atomic
from loratune.train import TrainingDiverged, load_config, prepare_data, train, validate_config
from loratune.train.config import DataSection, ModelSection, TrainSection, parse_override
from loratune.train.run_dir import finish_run_dir, run_directory, write_run_config
from loratune.train.schedule import learning_rate
from run_helpers import (
    adapter_tensors,
    addition_rows,
    assert_same_tensors,
    config_dict,
    metrics,
    prompt_completion_rows,
    train_records,
    write_config,
    write_jsonl,
)

QUIET = dict(progress=False, log=lambda line: None)


def make_config(model_dir, train_file, output_dir, **sections):
    return validate_config(config_dict(model_dir, train_file, output_dir, **sections), default_output_dir="unused")


def run(config, **kwargs):
    return train(config, **QUIET, **kwargs)


class CallCounter:
    """Wraps ``causal_lm_loss_sum``: ``on_call(n, loss_sum, count)`` may replace the result of call n (1-based)."""

    def __init__(self, on_call):
        self.real = trainer_module.causal_lm_loss_sum
        self.calls = 0
        self.on_call = on_call

    def __call__(self, model, batch, *args, **kwargs):
        self.calls += 1
        loss_sum, count = self.real(model, batch, *args, **kwargs)
        return self.on_call(self.calls, loss_sum, count)


# --- the run directory ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory):
    """One complete run with evaluation and best-checkpoint tracking: (config, run_dir, data_file, summary)."""
    root = tmp_path_factory.mktemp("finished-run")
    data = write_jsonl(root / "train.jsonl", addition_rows(12))
    config = make_config(
        tiny_llama_dir,
        data,
        root / "run",
        data={"eval_split": 0.25},
        train={
            "max_steps": 6,
            "save_every": 2,
            "keep_checkpoints": 2,
            "eval_every": 3,
            "best_metric": "eval_loss",
            "log_every": 1,
        },
    )
    summary = run(config)
    return config, root / "run", data, summary


def test_run_writes_adapter_in_peft_format_with_tokenizer_and_chat_template(finished_run, tiny_llama_dir):
    from transformers import AutoTokenizer

    _, run_dir, _, _ = finished_run
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(tiny_llama_dir)
    tensors = adapter_tensors(run_dir)
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert any(k.endswith(".lora_A.weight") for k in tensors) and any(k.endswith(".lora_B.weight") for k in tensors)
    saved = AutoTokenizer.from_pretrained(str(adapter))
    original = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert saved.chat_template == original.chat_template and saved.chat_template
    assert saved.get_vocab() == original.get_vocab()


def test_run_keeps_only_the_newest_checkpoints_and_no_temporary_files(finished_run):
    _, run_dir, _, _ = finished_run
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-4", "step-6"]  # keep_checkpoints: 2 of step-2, step-4, step-6
    for checkpoint in (run_dir / "checkpoints").iterdir():
        assert (checkpoint / "trainer_state.json").is_file()
        assert any(f.suffix == ".safetensors" for f in checkpoint.iterdir())
        assert not any(f.suffix in (".pt", ".bin", ".pkl") for f in checkpoint.iterdir())
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers


def test_metrics_log_every_step_once_and_every_evaluation(finished_run):
    _, run_dir, _, _ = finished_run
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert {"step", "loss", "lr", "tokens_per_s"} <= record.keys()
        assert math.isfinite(record["loss"]) and record["tokens_per_s"] > 0 and record["lr"] > 0
    evals = [r for r in metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for record in evals:
        assert math.isfinite(record["eval_loss"])
        assert 0.0 <= record["eval_exact_match"] <= 1.0  # chat data has references


def test_config_yaml_is_fully_resolved_with_versions_and_data_hash(finished_run):
    import transformers

    config, run_dir, data, _ = finished_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(saved["model"]) == set(ModelSection.model_fields)
    assert set(saved["lora"]) == set(LoraConfig.model_fields)
    assert set(saved["data"]) == set(DataSection.model_fields)
    assert set(saved["train"]) == set(TrainSection.model_fields)
    assert saved["train"]["scheduler"] == "cosine" and saved["train"]["warmup_steps"] == 0  # defaults spelled out
    assert saved["lora"]["lora_dropout"] == 0.0 and saved["data"]["packing"] is False
    assert Path(saved["data"]["train"]).is_absolute()
    assert saved["meta"]["versions"]["torch"] == torch.__version__
    assert saved["meta"]["versions"]["transformers"] == transformers.__version__
    assert saved["meta"]["data_sha256"]["train"] == hashlib.sha256(data.read_bytes()).hexdigest()
    reloaded = load_config(run_dir / "config.yaml")  # the saved config is itself a valid config
    assert reloaded.model_copy(update={"meta": None}) == config


def test_run_writes_loss_plot_and_summary(finished_run):
    _, run_dir, _, summary = finished_run
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    written = json.loads((run_dir / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["steps"] == 6
    assert written["final_loss"] == train_records(run_dir)[-1]["loss"]
    assert written["adapter_bytes"] == (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert written["trainable_params"] > 0


def test_best_adapter_is_kept_by_best_metric(finished_run):
    _, run_dir, _, summary = finished_run
    assert (run_dir / "best" / "adapter_config.json").is_file()
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()
    evals = [r for r in metrics(run_dir) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["best"] == best["eval_loss"] and summary["best_step"] == best["step"]


def test_no_best_directory_without_evaluation(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", prompt_completion_rows(4))
    run(make_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 1}))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "best").exists()


# --- resume, determinism ---------------------------------------------------------------------------------


def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(12))
    settings = dict(
        lora={"lora_dropout": 0.1},  # dropout masks come from the RNG: restoring it matters
        train={
            "max_steps": 6,
            "batch_size": 2,
            "grad_accum": 2,
            "save_every": 2,
            "keep_checkpoints": 5,
            "lr": 1e-2,
            "seed": 3,
        },
    )
    straight = make_config(tiny_llama_dir, data, tmp_path / "straight", **settings)
    run(straight)

    interrupted = make_config(tiny_llama_dir, data, tmp_path / "interrupted", **settings)

    def crash_in_step_6(call, loss_sum, count):
        if call == 11:  # two micro-batches per step: call 11 is the first of step 6, after step 5 was logged
            raise RuntimeError("simulated crash")
        return loss_sum, count

    monkeypatch.setattr(trainer_module, "causal_lm_loss_sum", CallCounter(crash_in_step_6))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(interrupted)
    monkeypatch.undo()
    run_dir = tmp_path / "interrupted"
    assert not (run_dir / "adapter").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4, 5]

    run(interrupted, resume=True)  # continues from step-4: step 5 is trained (and logged) again

    assert_same_tensors(adapter_tensors(tmp_path / "straight"), adapter_tensors(run_dir))
    resumed = train_records(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # no duplicated steps
    assert [r["loss"] for r in resumed] == [r["loss"] for r in train_records(tmp_path / "straight")]


def test_same_seed_gives_the_same_adapter_and_another_seed_a_different_one(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(8))
    adapters = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(
            make_config(
                tiny_llama_dir, data, tmp_path / name, lora={"lora_dropout": 0.1}, train={"max_steps": 2, "seed": seed}
            )
        )
        adapters[name] = adapter_tensors(tmp_path / name)
    assert_same_tensors(adapters["a"], adapters["b"])
    assert any(not torch.equal(adapters["a"][k], adapters["c"][k]) for k in adapters["a"])


def test_epochs_set_the_number_of_steps_without_max_steps(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(8))
    summary = run(
        make_config(
            tiny_llama_dir,
            data,
            tmp_path / "run",
            train={"max_steps": None, "epochs": 1.5, "batch_size": 2, "grad_accum": 2},
        )
    )
    assert summary["steps"] == 3  # 4 micro-batches per epoch, 6 in 1.5 epochs, 2 per step
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2, 3]
    assert train_records(tmp_path / "run")[-1]["epoch"] == pytest.approx(1.5)


# --- the loss and gradient accumulation ------------------------------------------------------------------


def base_mean_target_loss(model_dir, config) -> float:
    """Mean next-token loss of the plain base model over all target tokens of the run's training data:
    what step 1 of any run over all of them must log (B = 0, so the adapted model equals the base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in prepare_data(config, tokenizer).train:
            ids = torch.tensor([example.input_ids])
            labels = torch.tensor(example.labels[1:])
            logits = model(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def four_example_data(tmp_path_factory):
    # Answers of 1 to 4 digits: batched by length, the two micro-batches of 2 have different target counts.
    return write_jsonl(tmp_path_factory.mktemp("four") / "train.jsonl", addition_rows(4))


@pytest.fixture(scope="module")
def one_step_runs(tiny_llama_dir, four_example_data, tmp_path_factory):
    """One optimizer step over the same four examples as 4×1, 2×2 (accumulated), packed and with gradient
    checkpointing: run dirs."""
    root = tmp_path_factory.mktemp("one-step")
    runs = {}
    settings = (
        ("4x1", 4, 1, False, False),
        ("2x2", 2, 2, False, False),
        ("packed", 4, 1, True, False),
        ("checkpointed", 4, 1, False, True),
    )
    for name, batch_size, grad_accum, packing, checkpointing in settings:
        config = make_config(
            tiny_llama_dir,
            four_example_data,
            root / name,
            data={"packing": packing, "eval_split": 0},
            train={
                "max_steps": 1,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "max_grad_norm": None,
                "gradient_checkpointing": checkpointing,
            },
        )
        run(config)
        runs[name] = (config, root / name)
    return runs


def test_step_loss_is_the_mean_over_target_tokens(one_step_runs, tiny_llama_dir):
    config, run_dir = one_step_runs["4x1"]
    expected = base_mean_target_loss(tiny_llama_dir, config)
    assert train_records(run_dir)[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_gradient_accumulation_normalises_by_target_tokens_of_the_whole_step(one_step_runs):
    _, single = one_step_runs["4x1"]
    _, accumulated = one_step_runs["2x2"]
    one, two = train_records(single)[0], train_records(accumulated)[0]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    # The gradient norm (before clipping) would differ if micro-batches were averaged as equals.
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    a, b = adapter_tensors(single), adapter_tensors(accumulated)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_packed_run_logs_the_same_step_loss_as_unpacked(one_step_runs):
    _, packed = one_step_runs["packed"]
    _, unpacked = one_step_runs["4x1"]
    assert (packed / "adapter" / "adapter_model.safetensors").is_file()
    assert train_records(packed)[0]["loss"] == pytest.approx(train_records(unpacked)[0]["loss"], rel=1e-5)
    assert train_records(packed)[0]["grad_norm"] == pytest.approx(train_records(unpacked)[0]["grad_norm"], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_step(one_step_runs):
    _, plain = one_step_runs["4x1"]
    _, checkpointed = one_step_runs["checkpointed"]
    assert train_records(checkpointed)[0]["loss"] == pytest.approx(train_records(plain)[0]["loss"], rel=1e-6)
    a, b = adapter_tensors(plain), adapter_tensors(checkpointed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


# --- divergence ------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(8))
    config = make_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 4, "save_every": 2})

    def nan_at_step_3(call, loss_sum, count):
        return (loss_sum * float("nan"), count) if call == 3 else (loss_sum, count)

    monkeypatch.setattr(trainer_module, "causal_lm_loss_sum", CallCounter(nan_at_step_3))
    with pytest.raises(TrainingDiverged) as caught:
        run(config)
    message = str(caught.value)
    kept = tmp_path / "run" / "checkpoints" / "step-2"
    assert "step 3" in message and str(kept) in message
    assert (kept / "trainer_state.json").is_file()
    assert not (tmp_path / "run" / "adapter").exists()


def test_non_finite_loss_before_any_checkpoint_says_so(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(4))
    config = make_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 2})
    monkeypatch.setattr(
        trainer_module, "causal_lm_loss_sum", CallCounter(lambda call, loss, count: (loss * float("inf"), count))
    )
    with pytest.raises(TrainingDiverged, match=r"step 1\b.*no checkpoint"):
        run(config)
    assert not (tmp_path / "run" / "adapter").exists()


class NanGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN gradient backward: what an overflow in backward looks like."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradient_stops_before_the_update_and_checkpoints_stay_finite(tiny_llama_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(8))
    config = make_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 4, "save_every": 2})

    def nan_gradient_at_step_2(call, loss_sum, count):
        return (NanGradient.apply(loss_sum), count) if call == 2 else (loss_sum, count)

    monkeypatch.setattr(trainer_module, "causal_lm_loss_sum", CallCounter(nan_gradient_at_step_2))
    with pytest.raises(TrainingDiverged, match=r"step 2\b"):
        run(config)
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):
        state = load_file(checkpoint / "adapter_state.safetensors")
        assert all(torch.isfinite(t).all() for t in state.values()), f"{checkpoint.name} holds NaN weights"


# --- the output directory --------------------------------------------------------------------------------


def prepare_run_dir(path, **options):
    """Where a run at ``path`` would write (the directory's guard taken and released again)."""
    with run_directory(path, **options) as dirs:
        return dirs


def test_existing_non_empty_output_dir_is_refused_naming_both_flags(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as caught:
        prepare_run_dir(run_dir, resume=False, overwrite=False)
    message = str(caught.value)
    assert str(run_dir) in message and "--resume" in message and "--overwrite" in message
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_empty_existing_output_dir_is_used(tmp_path):
    (tmp_path / "run").mkdir()
    prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    assert (tmp_path / "run").is_dir()


def test_overwrite_builds_the_new_run_beside_the_old_one_until_it_completes(tmp_path):
    run_dir = tmp_path / "run"
    with run_directory(run_dir, resume=False, overwrite=False) as first:
        assert first.work == run_dir
        (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
        write_text_atomic(run_dir / "checkpoints" / "step-2" / "trainer_state.json", "{}")
        write_text_atomic(run_dir / "config.yaml", "old: run\n")
    second = prepare_run_dir(run_dir, resume=False, overwrite=True)
    assert second.final == run_dir and second.work != run_dir and second.work.parent == tmp_path
    assert (run_dir / "config.yaml").read_text() == "old: run\n"  # whole until the new run completes
    (second.work / "config.yaml").write_text("new: run\n")
    finish_run_dir(second)
    assert (run_dir / "config.yaml").read_text() == "new: run\n" and not (run_dir / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="--resume.*--overwrite|--overwrite.*--resume"):
        prepare_run_dir(tmp_path / "run", resume=True, overwrite=True)


def test_resume_of_a_directory_without_a_run_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="config.yaml") as caught:
        prepare_run_dir(tmp_path / "run", resume=True, overwrite=False)
    assert str(tmp_path / "run") in str(caught.value)


def test_resume_after_the_training_data_changed_is_refused(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(4))
    config = make_config(tiny_llama_dir, data, tmp_path / "run")
    (tmp_path / "run").mkdir()
    write_run_config(tmp_path / "run", config)  # what a started run leaves behind
    write_jsonl(data, addition_rows(4, start=10))
    with pytest.raises(ConfigError, match=r"data\.train") as caught:
        run(config, resume=True)
    assert str(data) in str(caught.value)


def test_a_run_that_fails_before_training_does_not_block_the_retry(tiny_llama_dir, tmp_path):
    # A typo in the model name: the user fixes the config and runs the same command again.
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(4))
    with pytest.raises(ModelNotFoundError):
        run(make_config(tmp_path / "no-such-model", data, tmp_path / "run"))
    run(make_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 1}))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# --- config errors ---------------------------------------------------------------------------------------


def minimal(**extra) -> dict:
    return {"data": {"train": "train.jsonl"}, **extra}


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(data, default_output_dir="runs/x")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_it_and_the_closest_valid_key():
    message = config_error(minimal(train={"batchsize": 4}))
    assert "'train.batchsize'" in message and "'train.batch_size'" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    message = config_error(minimal(train={"frobnicate": 1e-4}))
    assert "'train.frobnicate'" in message
    assert "lr" in message.replace(",", " ").split()


def test_unknown_top_level_key_and_section():
    assert "'outptu_dir'" in config_error(minimal(outptu_dir="x")) and "output_dir" in config_error(
        minimal(outptu_dir="x")
    )
    assert "'tarin'" in config_error(minimal(tarin={}))


@pytest.mark.parametrize("section, typo, meant", [("lora", "rank", "r"), ("train", "learning_rate", "lr")])
def test_common_synonym_suggests_the_real_key(section, typo, meant):
    # difflib alone suggests 'lora.rank_pattern' for 'lora.rank' (a dict of per-module ranks: wrong advice)
    # and nothing for 'train.learning_rate'.
    message = config_error(minimal(**{section: {typo: 8}}))
    assert f"'{section}.{meant}'" in message


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "batch_size", 0),
        ("train", "lr", -1.0),
        ("train", "scheduler", "exponential"),
        ("lora", "r", 0),
        ("lora", "lora_dropout", 1.5),
        ("data", "eval_split", 1.0),
        ("data", "truncation", "cut"),
        ("model", "quantize", "int3"),
    ],
)
def test_invalid_value_names_the_dotted_key(section, key, value):
    data = minimal()
    data.setdefault(section, {})[key] = value
    message = config_error(data)
    assert message.startswith(f"{section}.{key}")


def test_best_metric_without_eval_every_is_an_error_naming_both_keys():
    message = config_error(minimal(train={"best_metric": "eval_loss"}))
    assert "train.best_metric" in message and "eval_every" in message


def test_missing_training_data_is_an_error_naming_data_train():
    assert "data.train" in config_error({"train": {"lr": 1e-4}})
    assert "data.train" in config_error({"data": {"eval": "e.jsonl"}})


def test_missing_data_file_names_the_key_and_the_file(tmp_path):
    config = write_config(tmp_path / "c.yaml", {"data": {"train": "nope.jsonl"}})
    with pytest.raises(ConfigError, match=r"data\.train.*nope\.jsonl"):
        load_config(config)
    write_jsonl(tmp_path / "t.jsonl", addition_rows(2))
    config = write_config(tmp_path / "c.yaml", {"data": {"train": str(tmp_path / "t.jsonl"), "eval": "gone.jsonl"}})
    with pytest.raises(ConfigError, match=r"data\.eval.*gone\.jsonl"):
        load_config(config)


def test_relative_data_path_is_found_next_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    write_jsonl(tmp_path / "cfg" / "t.jsonl", addition_rows(2))
    config = write_config(tmp_path / "cfg" / "run.yaml", {"data": {"train": "t.jsonl"}})
    monkeypatch.chdir(tmp_path)
    loaded = load_config(config)
    assert loaded.data.train == str((tmp_path / "cfg" / "t.jsonl").resolve())
    assert loaded.output_dir == "runs/run"  # default: runs/<config file stem>


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("data:\n  train: t.jsonl\ntrain:\n  lr: [1e-4\n  batch_size: 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert str(config) in message and "\n" not in message
    line = int(message.split(f"{config}:")[1].split(":")[0])
    assert 4 <= line <= 6


def test_config_that_is_not_a_mapping_is_an_error(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(config)


@pytest.mark.parametrize(
    "item, path, value",
    [
        ("train.max_steps=5", ["train", "max_steps"], 5),
        ("train.lr=0.001", ["train", "lr"], 0.001),
        ("lora.target_modules=[q_proj, v_proj]", ["lora", "target_modules"], ["q_proj", "v_proj"]),
        ("train.max_steps=null", ["train", "max_steps"], None),
        ("data.eval=", ["data", "eval"], None),
        ("data.packing=true", ["data", "packing"], True),
        ("output_dir=runs/a=b", ["output_dir"], "runs/a=b"),
    ],
)
def test_set_values_are_parsed_as_yaml(item, path, value):
    assert parse_override(item) == (path, value)


def test_set_overrides_reach_the_validated_config(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", addition_rows(2))
    config = write_config(
        tmp_path / "c.yaml", {"data": {"train": str(tmp_path / "t.jsonl")}, "train": {"max_steps": 9}}
    )
    loaded = load_config(
        config,
        [
            "train.max_steps=null",
            "train.lr=1e-3",
            "train.warmup_steps=3",
            "lora.target_modules=[q_proj,v_proj]",
            "lora.r=16",
            "output_dir=elsewhere",
        ],
    )
    assert loaded.train.max_steps is None
    assert loaded.train.lr == pytest.approx(1e-3)
    assert loaded.train.warmup_steps == 3
    assert loaded.lora.target_modules == ["q_proj", "v_proj"] and loaded.lora.r == 16
    assert loaded.output_dir == "elsewhere"


def test_set_errors_name_the_key(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", addition_rows(2))
    config = write_config(tmp_path / "c.yaml", {"data": {"train": str(tmp_path / "t.jsonl")}})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(config, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(config, ["train.batch_size=zero"])
    with pytest.raises(ConfigError, match=r"'train\.lerning_rate'"):
        load_config(config, ["train.lerning_rate=1e-4"])


# --- the learning-rate schedule --------------------------------------------------------------------------


def lrs(kind: str, total: int = 10, warmup: int = 0, base: float = 1.0) -> list[float]:
    return [learning_rate(s, total_steps=total, base_lr=base, warmup_steps=warmup, kind=kind) for s in range(total)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_base_rate(kind):
    values = lrs(kind, total=10, warmup=4, base=2.0)
    assert values[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert values[4] == pytest.approx(2.0)  # the first step after warmup is at the peak


def test_constant_schedule_stays_at_the_base_rate():
    assert lrs("constant", warmup=2)[2:] == pytest.approx([1.0] * 8)


def test_linear_schedule_decays_to_zero_at_the_end():
    values = lrs("linear", total=10, warmup=0)
    assert values == pytest.approx([1.0 - s / 10 for s in range(10)])
    assert learning_rate(10, total_steps=10, base_lr=1.0, warmup_steps=0, kind="linear") == pytest.approx(0.0)


def test_cosine_schedule_halves_at_the_midpoint_and_decreases():
    values = lrs("cosine", total=12, warmup=2)
    decay = values[2:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert learning_rate(7, total_steps=12, base_lr=1.0, warmup_steps=2, kind="cosine") == pytest.approx(0.5)
    assert learning_rate(12, total_steps=12, base_lr=1.0, warmup_steps=2, kind="cosine") == pytest.approx(0.0)
    assert values[-1] > 0


def test_schedule_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="step"):
        learning_rate(5, total_steps=10, base_lr=1.0, warmup_steps=0, kind="step")


def test_run_logs_the_scheduled_learning_rate(finished_run):
    config, run_dir, _, _ = finished_run
    expected = [
        learning_rate(s, total_steps=6, base_lr=config.train.lr, warmup_steps=0, kind="cosine") for s in range(6)
    ]
    assert [r["lr"] for r in train_records(run_dir)] == pytest.approx(expected)
