"""Training across processes: real torchrun processes on CPU/gloo, DDP, against single-process runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from run_helpers import adapter_tensors, addition_rows, config_dict, metrics, write_config, write_jsonl

pytestmark = pytest.mark.integration  # starts torchrun and worker processes


def loratune(*args, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(
        [sys.executable, "-m", "loratune", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, make_tiny_llama_dir):
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "train.jsonl", addition_rows(24))
    return root, make_tiny_llama_dir(), data


def run_config(root: Path, model_dir, data, name: str, batch_size: int, dropout: float = 0.0, **train) -> Path:
    config = config_dict(
        model_dir,
        data,
        root / name,
        lora={"r": 4, "lora_alpha": 8, "lora_dropout": dropout},
        train={"max_steps": 4, "batch_size": batch_size, "lr": 1e-2, "save_every": 2, **train},
    )
    return write_config(root / f"{name}.yaml", config)


def test_two_processes_make_the_update_one_process_makes_with_twice_the_micro_batch(setup):
    root, model_dir, data = setup
    single = loratune("train", run_config(root, model_dir, data, "single", 4), "--no-progress", threads=2)
    assert single.returncode == 0, single.stderr
    double = loratune("train", run_config(root, model_dir, data, "double", 2), "--nproc", 2, "--no-progress", threads=2)
    assert double.returncode == 0, double.stderr
    ours, reference = adapter_tensors(root / "double"), adapter_tensors(root / "single")
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=0)
    steps = [r for r in metrics(root / "double") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one line per step: rank 0 alone writes
    reference_steps = [r for r in metrics(root / "single") if "loss" in r]
    for a, b in zip(steps, reference_steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert double.stdout.count("training finished") == 1
    assert sorted(p.name for p in (root / "double" / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_too_few_rows_for_one_global_batch_is_one_line(setup, tmp_path):
    _root, model_dir, _ = setup
    small = write_jsonl(tmp_path / "small.jsonl", addition_rows(3))
    result = loratune("train", run_config(tmp_path, model_dir, small, "small", 2), "--nproc", 2, threads=2)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("loratune train: error")]
    assert len(lines) == 1 and "fewer than one global batch" in lines[0]
    assert not (tmp_path / "small").exists()


def worker_pids(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (this test's config file), this one excluded."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_killed_run_stops_every_process_and_resumes_to_the_uninterrupted_result(setup):
    import signal
    import time

    root, model_dir, data = setup
    steps = dict(max_steps=40, save_every=4, dropout=0.1)  # each process's masks are drawn again on resume
    whole = loratune(
        "train", run_config(root, model_dir, data, "whole", 2, **steps), "--nproc", 2, "--no-progress", threads=2
    )
    assert whole.returncode == 0, whole.stderr
    config = run_config(root, model_dir, data, "killed", 2, **steps)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "loratune", "train", str(config), "--nproc", "2", "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (root / "killed" / "checkpoints" / "step-8").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while worker_pids(str(config)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_pids(str(config)) == [], "workers outlived the killed launcher"
    assert not (root / "killed" / "adapter").exists()
    resumed = loratune("train", config, "--nproc", 2, "--resume", "--no-progress", threads=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    ours, reference = adapter_tensors(root / "killed"), adapter_tensors(root / "whole")
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in metrics(root / "killed") if "loss" in r] == list(range(1, 41))
    other = loratune("train", config, "--resume", "--set", "train.max_steps=44", threads=2)
    assert other.returncode != 0 and "--nproc 2" in other.stderr  # another world size: refused in one line


def test_full_fine_tuning_with_gradient_checkpointing_also_matches_one_process(setup):
    root, model_dir, data = setup
    options = dict(method="full", gradient_checkpointing=True, lr=1e-3)
    single = loratune("train", run_config(root, model_dir, data, "full1", 4, **options), "--no-progress", threads=2)
    assert single.returncode == 0, single.stderr
    double = loratune(
        "train", run_config(root, model_dir, data, "full2", 2, **options), "--nproc", 2, "--no-progress", threads=2
    )
    assert double.returncode == 0, double.stderr
    ours, reference = (load_file(root / name / "model" / "model.safetensors") for name in ("full2", "full1"))
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["causal", "classifier"])
def test_evaluation_is_sharded_and_gathered_to_the_single_process_result(setup, tmp_path, task):
    _root, model_dir, data = setup
    if task == "classifier":
        from test_classification import intent_rows
        from tiny_models import tiny_encoder_dir

        model_dir = tiny_encoder_dir(tmp_path / "bert")
        data = write_jsonl(tmp_path / "intents.jsonl", intent_rows(40, 0))
        evaluation = write_jsonl(tmp_path / "intents_eval.jsonl", intent_rows(11, 1))
    else:
        evaluation = write_jsonl(tmp_path / "eval.jsonl", addition_rows(7, start=50))
    results = {}
    for name, batch, nproc in (("one", 4, 1), ("two", 2, 2)):
        config = config_dict(
            model_dir,
            data,
            tmp_path / name,
            data={"eval": str(evaluation)},
            train={"max_steps": 2, "batch_size": batch, "eval_every": 2, "lr": 1e-2},
        )
        result = loratune(
            "train", write_config(tmp_path / f"{name}.yaml", config), "--nproc", nproc, "--no-progress", threads=2
        )
        assert result.returncode == 0, result.stderr
        evaluations = [r for r in metrics(tmp_path / name) if "eval_loss" in r]
        # a classifier's step-0 evaluation (BERT's dropout makes the trained models differ); the LM's last one
        results[name] = evaluations[0] if task == "classifier" else evaluations[-1]
    one, two = results["one"], results["two"]
    assert one.keys() == two.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def held_and_total(run: subprocess.CompletedProcess) -> tuple[float, float]:
    """(MiB of weights each process holds, MiB of all weights) from an FSDP run's log line."""
    found = re.search(
        r"FSDP2: 2 blocks of the base sharded over 2 processes; each holds ([0-9.]+) of the "
        r"weights' ([0-9.]+) MiB",
        run.stdout + run.stderr,
    )
    assert found, run.stdout + run.stderr
    return float(found[1]), float(found[2])


def train_in_this_process(config_path: Path) -> None:
    """A reference run, trained in the test's own process (no interpreter and import start-up)."""
    from loratune.train import load_config, train

    train(load_config(config_path), progress=False, log=lambda *_: None)


def two_processes_and_one_reference(tmp_path, runs: dict[str, dict], config) -> dict[str, subprocess.CompletedProcess]:
    """Each of ``runs`` (name -> train options) trained across two processes, each with ``config(name, options)``'s
    batch; and the reference ``"one"``: that config with the batch of both, trained in this process (two
    processes update as one with their batches together: test_two_processes_make_the_update_...). Returns the
    two-process runs' results, each asserted to have succeeded."""
    results = {}
    for name, options in runs.items():
        path = write_config(tmp_path / f"{name}.yaml", config(name, options))
        results[name] = loratune("train", path, "--nproc", 2, "--no-progress", threads=2)
        assert results[name].returncode == 0, results[name].stderr
    one = config("one", {})
    one["train"]["batch_size"] *= 2
    train_in_this_process(write_config(tmp_path / "one.yaml", one))
    return results


def test_fsdp_shards_the_base_and_trains_and_evaluates_as_one_process_does(setup, tmp_path):
    _root, model_dir, data = setup
    evaluation = write_jsonl(tmp_path / "eval.jsonl", addition_rows(5, start=50))
    runs = two_processes_and_one_reference(
        tmp_path,
        {"fsdp": {"distributed": "fsdp"}, "fsdp_ckpt": {"distributed": "fsdp", "gradient_checkpointing": True}},
        lambda name, options: config_dict(
            model_dir,
            data,
            tmp_path / name,
            lora={"r": 4, "lora_alpha": 8},
            data={"eval": str(evaluation)},
            train={"max_steps": 4, "batch_size": 2, "lr": 1e-2, "eval_every": 2, **options},
        ),
    )
    held, total = held_and_total(runs["fsdp"])  # the blocks are split; embeddings, head and adapter are whole
    assert 0.6 * total < held < 0.8 * total
    assert "each block sharded as it was read" in runs["fsdp"].stdout  # no process held the whole base
    reference = adapter_tensors(tmp_path / "one")
    for name in ("fsdp", "fsdp_ckpt"):
        ours = adapter_tensors(tmp_path / name)
        assert ours.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=0)
        evaluations = [r for r in metrics(tmp_path / name) if "eval_loss" in r]
        expected = [r for r in metrics(tmp_path / "one") if "eval_loss" in r]
        assert [r["step"] for r in evaluations] == [2, 4]
        for ours_eval, theirs in zip(evaluations, expected):
            assert ours_eval["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=1e-5)
            assert ours_eval["eval_exact_match"] == theirs["eval_exact_match"]


def test_qlora_under_fsdp_shards_the_4bit_base_and_trains_what_one_process_trains(setup, tmp_path):
    _root, model_dir, data = setup
    runs = two_processes_and_one_reference(
        tmp_path,
        {"fsdp": {"distributed": "fsdp"}},
        lambda name, options: config_dict(
            model_dir,
            data,
            tmp_path / name,
            model={"quantize": "nf4"},
            train={"max_steps": 3, "batch_size": 2, "lr": 1e-2, **options},
        ),
    )
    held, total = held_and_total(runs["fsdp"])  # the 4-bit blocks' packed weights are split too
    assert held < total
    reference, ours = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "fsdp")
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=0)


def test_an_adapter_whose_start_reads_the_base_loads_it_whole_under_fsdp_and_matches_one_process(setup, tmp_path):
    _root, model_dir, data = setup
    runs = two_processes_and_one_reference(
        tmp_path,
        {"fsdp": {"distributed": "fsdp"}},
        lambda name, options: config_dict(
            model_dir,
            data,
            tmp_path / name,
            lora={"r": 4, "lora_alpha": 8, "use_dora": True},
            train={"max_steps": 3, "batch_size": 2, "lr": 1e-2, **options},
        ),
    )
    assert "the base was read whole, then sharded" in runs["fsdp"].stdout  # DoRA's magnitudes need whole weights
    reference, ours = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "fsdp")
    assert ours.keys() == reference.keys() and any("magnitude" in key for key in ours)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=0)


def test_what_fsdp_cannot_shard_is_refused_in_one_line(capsys, setup, tmp_path):
    from test_cli import assert_one_line_error, cli

    _, model_dir, data = setup
    config = config_dict(model_dir, data, tmp_path / "run", intrinsic={"dim": 8})
    config["train"].update(method="intrinsic", distributed="fsdp")
    status, _, err = cli(capsys, "train", write_config(tmp_path / "fsdp.yaml", config), "--no-progress")
    assert_one_line_error(status, err, "train", "train.method: intrinsic")
    assert not (tmp_path / "run").exists()


def model_weights(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / name / "model.safetensors")


def test_full_fine_tuning_under_fsdp_shards_the_trained_weights_and_matches_one_process(setup, tmp_path):
    _root, model_dir, data = setup
    evaluation = write_jsonl(tmp_path / "eval.jsonl", addition_rows(5, start=50))
    runs = two_processes_and_one_reference(
        tmp_path,
        {"fsdp": {"distributed": "fsdp"}, "fsdp_ckpt": {"distributed": "fsdp", "gradient_checkpointing": True}},
        lambda name, options: config_dict(
            model_dir,
            data,
            tmp_path / name,
            data={"eval": str(evaluation)},
            train={
                "method": "full",
                "max_steps": 4,
                "batch_size": 2,
                "lr": 1e-3,
                "eval_every": 2,
                "save_every": 2,
                "best_metric": "eval_loss",
                **options,
            },
        ),
    )
    held, total = held_and_total(runs["fsdp"])  # the blocks' trained weights are split too
    assert "trained parameters sharded too" in runs["fsdp"].stdout + runs["fsdp"].stderr
    assert 0.6 * total < held < 0.8 * total
    reference = model_weights(tmp_path / "one")
    for name in ("fsdp", "fsdp_ckpt"):
        for output in ("model", "best"):  # the final model and the best one, gathered whole
            ours = model_weights(tmp_path / name, output)
            assert ours.keys() == model_weights(tmp_path / "one", output).keys()
            for key, value in model_weights(tmp_path / "one", output).items():
                torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=0)
        evaluations = [r["eval_loss"] for r in metrics(tmp_path / name) if "eval_loss" in r]
        expected = [r["eval_loss"] for r in metrics(tmp_path / "one") if "eval_loss" in r]
        assert evaluations == pytest.approx(expected, abs=1e-5)
    assert reference.keys() == model_weights(tmp_path / "fsdp").keys()


def test_an_fsdp_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_one_does(setup, tmp_path):
    _root, model_dir, data = setup

    def train(name: str, *extra, steps: int = 4):
        # a constant lr: the schedule must not depend on max_steps, which the resume raises from 2 to 4
        config = config_dict(
            model_dir,
            data,
            tmp_path / name,
            train={
                "max_steps": steps,
                "batch_size": 2,
                "distributed": "fsdp",
                "save_every": 2,
                "scheduler": "constant",
                "lr": 1e-2,
            },
        )
        result = loratune(
            "train", write_config(tmp_path / f"{name}.yaml", config), "--nproc", 2, "--no-progress", *extra, threads=2
        )
        assert result.returncode == 0, result.stderr
        return result

    train("whole")
    train("resumed", steps=2)
    assert "resuming" in train("resumed", "--resume", "--set", "train.max_steps=4", steps=2).stdout
    whole, resumed = adapter_tensors(tmp_path / "whole"), adapter_tensors(tmp_path / "resumed")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0)


def test_a_full_fine_tune_under_fsdp_resumes_to_the_uninterrupted_result(setup, tmp_path):
    # bf16, where each process keeps float32 masters of its share: the resume restores them (float32 full training
    # under FSDP is test_full_fine_tuning_under_fsdp_..., an FSDP resume test_an_fsdp_run_resumed_...)
    _root, model_dir, data = setup
    dtype = "bf16"

    def train(name: str, *extra, steps: int = 4):
        config = config_dict(
            model_dir,
            data,
            tmp_path / name,
            model={"dtype": dtype},
            train={
                "method": "full",
                "max_steps": steps,
                "batch_size": 2,
                "distributed": "fsdp",
                "save_every": 2,
                "scheduler": "constant",
                "lr": 1e-3,
            },
        )
        result = loratune(
            "train", write_config(tmp_path / f"{name}.yaml", config), "--nproc", 2, "--no-progress", *extra, threads=2
        )
        assert result.returncode == 0, result.stderr
        return result

    train("whole")
    train("resumed", steps=2)  # its checkpoint holds the gathered weights and AdamW's moments
    assert "resuming" in train("resumed", "--resume", "--set", "train.max_steps=4", steps=2).stdout
    whole, resumed = model_weights(tmp_path / "whole"), model_weights(tmp_path / "resumed")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=0)
    masters = [
        load_file(tmp_path / name / "checkpoints" / "step-4" / "model_state.safetensors")
        for name in ("whole", "resumed")
    ]
    assert all(t.dtype == torch.float32 for t in masters[0].values())
    for key in masters[0]:
        torch.testing.assert_close(masters[1][key], masters[0][key], atol=1e-6, rtol=0)


def two_processes_and_one(tmp_path, run_config, batch_size: int) -> tuple[list[dict], list[dict]]:
    """Train ``run_config(name, batch_size)`` in this process, and with half the batch in each of two; assert their
    adapters equal (1e-5) and return each run's per-step records (the two processes', the one's)."""
    train_in_this_process(run_config("single", batch_size))
    double = loratune("train", run_config("double", batch_size // 2), "--nproc", 2, "--no-progress", threads=2)
    assert double.returncode == 0, double.stderr
    ours, reference = adapter_tensors(tmp_path / "double"), adapter_tensors(tmp_path / "single")
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-5, rtol=0)
    double_steps, single_steps = ([r for r in metrics(tmp_path / name) if "loss" in r] for name in ("double", "single"))
    return double_steps, single_steps


def test_grpo_across_two_processes_updates_as_one_process_does(setup, tmp_path):
    """Greedy rollouts (the same completions in any process) and a KL to the base that a non-zero adapter gives a
    gradient: one prompt in each of two processes must make the update two prompts make in one."""
    _, model_dir, _ = setup
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2)]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)

    def grpo_run(name: str, batch_size: int) -> Path:
        config = config_dict(
            model_dir,
            data,
            tmp_path / name,
            lora={"r": 4, "lora_alpha": 8, "init_lora_weights": False},
            train={"objective": "grpo", "max_steps": 3, "batch_size": batch_size, "lr": 2e-3, "save_every": 10},
            grpo={"group_size": 2, "max_new_tokens": 4, "temperature": 0.0, "beta": 0.5, "rewards": ["exact_match"]},
        )
        return write_config(tmp_path / f"{name}.yaml", config)

    steps, reference_steps = two_processes_and_one(tmp_path, grpo_run, 2)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for a, b in zip(steps, reference_steps, strict=True):
        assert a["kl"] > 0 and a["kl"] == pytest.approx(b["kl"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
    assert len({r["kl"] for r in steps}) == 3  # each update moved the adapter


def test_dpo_across_two_processes_updates_as_one_process_does(setup, tmp_path):
    """Two pairs in each of two processes must make the update four pairs make in one: the loss, TRL's metrics and
    the adapter (each pair's prompt read once for its chosen and rejected rows, inside DDP's forward)."""
    _, model_dir, _ = setup
    rows = [
        {"prompt": f"What is {i} + {i}?", "chosen": f" {2 * i}", "rejected": f" The answer is {2 * i + 1}." + " no" * i}
        for i in range(4)
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def dpo_run(name: str, batch_size: int) -> Path:
        config = config_dict(
            model_dir,
            data,
            tmp_path / name,
            lora={"r": 4, "lora_alpha": 8},
            train={"objective": "dpo", "max_steps": 3, "batch_size": batch_size, "lr": 1e-2, "save_every": 10},
        )
        return write_config(tmp_path / f"{name}.yaml", config)

    steps, reference_steps = two_processes_and_one(tmp_path, dpo_run, 4)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # a fresh adapter: ln 2 in both
    for a, b in zip(steps, reference_steps, strict=True):
        for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    assert steps[-1]["loss"] < steps[0]["loss"]
