"""Nothing silent: loratune says what it does instead of quietly reinterpreting, ignoring or losing things.

Covers: the model's context capping ``max_length`` (with a word), ``--resume`` with changes (applied when
safe, refused by name otherwise, never ignored), runs that fail before their first step, oversized mixes,
Ctrl-C during training (a checkpoint and the exact resume command), library warnings kept out of streamed
text, the chat's turn markers, and the one-time conversion of the built-in model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import loratune
from loratune.cli.main import main
from loratune.errors import ConfigError
from loratune.train import train, validate_config
from loratune.train.run_dir import run_directory, write_run_config
from run_helpers import (
    adapter_tensors,
    addition_rows,
    assert_same_tensors,
    config_dict,
    metrics,
    train_records,
    write_config,
    write_jsonl,
)
from test_cli import assert_one_line_error, cli, loratune_executable


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", addition_rows(8))


def lines_of(log: list[str]) -> str:
    return "\n".join(log)


# --- max_length and the model's context ------------------------------------------------------------------


def test_training_longer_than_the_context_says_so_and_caps_max_length(tiny_llama_dir, data, tmp_path):
    log: list[str] = []
    config = validate_config(
        config_dict(tiny_llama_dir, data, tmp_path / "run", data={"max_length": 4096}), default_output_dir="unused"
    )
    train(config, progress=False, log=log.append)
    assert "data.max_length 4096 is longer than the model's context (128 positions); using 128" in lines_of(log)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["max_length"] == 128


def test_data_and_eval_warn_when_max_length_is_longer_than_the_context(capsys, tiny_llama_dir, data, tmp_path):
    config = write_config(tmp_path / "c.yaml", config_dict(tiny_llama_dir, data, tmp_path / "run"))
    status, _, err = cli(capsys, "data", config, "--set", "data.max_length=1000", "-n", "0")
    assert status == 0 and "data.max_length 1000 is longer than the model's context (128 positions)" in err
    status, _, err = cli(
        capsys, "eval", "--model", tiny_llama_dir, "--data", data, "--max-length", "1000", "--no-exact-match"
    )
    assert status == 0 and "--max-length 1000 is longer than the model's context (128 positions)" in err


# --- --resume with changes ----------------------------------------------------------------------------------


@pytest.fixture
def two_step_run(capsys, tiny_llama_dir, data, tmp_path):
    config = write_config(
        tmp_path / "run.yaml", config_dict(tiny_llama_dir, data, tmp_path / "run", train={"scheduler": "constant"})
    )
    assert cli(capsys, "train", config, "--no-progress")[0] == 0
    return config, tmp_path / "run"


def test_resume_extends_a_finished_run(capsys, two_step_run):
    config, run = two_step_run
    status, out, err = cli(capsys, "train", config, "--resume", "--set", "train.max_steps=4", "--no-progress")
    assert status == 0, err
    assert "train.max_steps: 2 → 4" in out
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4


def test_an_extended_run_equals_one_trained_that_long(capsys, two_step_run, tiny_llama_dir, data, tmp_path):
    config, run = two_step_run
    assert cli(capsys, "train", config, "--resume", "--set", "train.max_steps=4", "--no-progress")[0] == 0
    straight = write_config(
        tmp_path / "straight.yaml",
        config_dict(tiny_llama_dir, data, tmp_path / "straight", train={"scheduler": "constant", "max_steps": 4}),
    )
    assert cli(capsys, "train", straight, "--no-progress")[0] == 0
    assert_same_tensors(adapter_tensors(run), adapter_tensors(tmp_path / "straight"))


def test_resume_may_change_evaluation_and_logging(capsys, two_step_run, tmp_path):
    config, _run = two_step_run
    (tmp_path / "eval.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    status, _, err = cli(
        capsys,
        "train",
        config,
        "--resume",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.eval_every=1",
        "--set",
        "train.log_every=5",
        "--no-progress",
    )
    assert status == 0, err


@pytest.mark.parametrize(
    "change, named",
    [
        (["--set", "lora.r=16"], "lora.r"),
        (["--set", "train.lr=0.5", "--set", "train.max_steps=9"], "train.lr"),
        (["--set", "model.dtype=bf16"], "model.dtype"),
    ],
)
def test_resume_refuses_changes_a_run_cannot_take_naming_them(capsys, two_step_run, change, named):
    config, run = two_step_run
    before = adapter_tensors(run)
    status, _, err = cli(capsys, "train", config, "--resume", *change, "--no-progress")
    assert_one_line_error(status, err, "train", named, "--resume")
    assert "train.max_steps" not in err.split("may change only")[0]  # the allowed change is not refused
    assert_same_tensors(adapter_tensors(run), before)


def test_resume_notices_an_edited_config_file(capsys, two_step_run):
    config, _run = two_step_run
    edited = yaml.safe_load(config.read_text())
    edited["train"]["lr"] = 0.123
    config.write_text(yaml.safe_dump(edited))
    status, _, err = cli(capsys, "train", config, "--resume", "--no-progress")
    assert_one_line_error(status, err, "train", "train.lr", "0.123")


def test_resuming_a_finished_run_without_extending_it_is_an_error_not_a_no_op(capsys, two_step_run):
    config, _run = two_step_run
    status, _, err = cli(capsys, "train", config, "--resume", "--no-progress")
    assert_one_line_error(status, err, "train", "already finished", "train.max_steps")


def test_resume_cannot_shorten_a_run_below_the_step_it_reached(capsys, tiny_llama_dir, data, tmp_path):
    config = write_config(
        tmp_path / "run.yaml", config_dict(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 4})
    )
    assert cli(capsys, "train", config, "--no-progress")[0] == 0
    status, _, err = cli(capsys, "train", config, "--resume", "--set", "train.max_steps=3", "--no-progress")
    assert_one_line_error(status, err, "train", "step 4")


# --- a run that fails before its first step ---------------------------------------------------------------


def test_a_run_that_fails_before_its_first_step_leaves_nothing_behind(capsys, tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    bad = write_config(
        tmp_path / "bad.yaml", config_dict(tiny_llama_dir, data, run, lora={"target_modules": ["no_such_module"]})
    )
    status, _, err = cli(capsys, "train", bad, "--no-progress")
    assert_one_line_error(status, err, "train", "no_such_module")
    assert not run.exists()
    good = write_config(tmp_path / "good.yaml", config_dict(tiny_llama_dir, data, run))
    status, _, err = cli(capsys, "train", good, "--no-progress")
    assert status == 0, err


def test_a_run_that_crashed_before_its_first_step_is_started_afresh(tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    config = validate_config(config_dict(tiny_llama_dir, data, run), default_output_dir="unused")
    with run_directory(run, resume=False, overwrite=False):  # what a crash right after the start leaves
        write_run_config(run, config)
    log: list[str] = []
    train(config, progress=False, log=log.append)
    assert "never completed a step; starting afresh" in lines_of(log)
    assert [r["step"] for r in train_records(run)] == [1, 2]


def test_a_run_that_completed_a_step_is_never_started_afresh(tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    config = validate_config(config_dict(tiny_llama_dir, data, run), default_output_dir="unused")
    train(config, progress=False, log=lambda line: None)
    (run / "checkpoints").rename(tmp_path / "moved")
    (run / "adapter").rename(tmp_path / "moved-adapter")  # metrics.jsonl still records steps
    with pytest.raises(ConfigError, match="--resume"):
        train(config, progress=False, log=lambda line: None)


# --- mix: a result far larger than its inputs --------------------------------------------------------------


@pytest.fixture
def rank1_adapters(tiny_llama_dir, tmp_path):
    paths = []
    for seed in (0, 1):
        model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
        torch.manual_seed(seed)
        loratune.add_adapter(
            model, loratune.LoraConfig(r=1, lora_alpha=2, init_lora_weights=False, target_modules="all-linear")
        )
        paths.append(loratune.save_adapter(model, tmp_path / f"a{seed}"))
    return paths


def test_a_full_rank_mix_warns_with_its_size_and_suggests_a_rank(capsys, rank1_adapters, tmp_path):
    a, b = rank1_adapters
    status, _out, err = cli(
        capsys, "mix", a, b, "--method", "ties", "--density", "0.5", "--rank", "full", "--out", tmp_path / "full"
    )
    assert status == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and " MB" in warning[0] and "--rank" in warning[0], err


def test_the_default_rank_of_pruning_mixes_keeps_the_inputs_size(capsys, rank1_adapters, tmp_path):
    a, b = rank1_adapters
    status, out, err = cli(capsys, "mix", a, b, "--method", "dare_ties", "--density", "0.5", "--out", tmp_path / "m")
    assert status == 0 and "warning" not in err, err
    assert "rank 2" in out and "energy kept" in out
    size = (tmp_path / "m" / "adapter_model.safetensors").stat().st_size
    inputs = sum((p / "adapter_model.safetensors").stat().st_size for p in rank1_adapters)
    assert size < 1.5 * inputs


# --- generation: warnings after the stream, turns marked ------------------------------------------------------


def test_library_warnings_never_land_inside_streamed_text(capsys, monkeypatch, tiny_llama_dir):
    from loratune.cli import generate

    args = ["generate", "--model", str(tiny_llama_dir), "--prompt", "hello", "--max-new-tokens", "6"]
    status, text, _ = cli(capsys, *args)
    assert status == 0
    load = generate.load_for_verb

    def load_with_a_chatty_library(args):
        model, tokenizer, labels = load(args)
        model.register_forward_hook(lambda *_: warnings.warn("a library deprecation", FutureWarning, stacklevel=2))
        return model, tokenizer, labels

    monkeypatch.setattr(generate, "load_for_verb", load_with_a_chatty_library)
    both = io.StringIO()  # stdout and stderr as a terminal shows them: one stream, in order
    with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
        assert main(args) == 0
    shown = both.getvalue()
    assert shown.startswith(text)  # the streamed text and its line break, uninterrupted
    assert "loratune generate: warning: a library deprecation\n" in shown[len(text) :]
    assert shown.count("a library deprecation") == 1


def test_interactive_chat_marks_whose_turn_it_is(capsys, monkeypatch, tiny_llama_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand you?\n\n"))
    status, out, err = cli(capsys, "generate", "--model", tiny_llama_dir, "--max-new-tokens", "4")
    assert status == 0
    assert err.count("you> ") == 3 and err.count("model> ") == 2
    assert err.index("you> hello") < err.index("model> ") < err.index("you> and you?")
    assert "you>" not in out and "model>" not in out  # stdout holds the model's words only


# --- Ctrl-C during training ----------------------------------------------------------------------------------


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real ``loratune`` executable with one thread (its results then match other one-thread runs)."""
    return subprocess.run(
        [loratune_executable(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.integration
def test_ctrl_c_saves_a_checkpoint_and_prints_the_exact_resume_command(tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        config_dict(tiny_llama_dir, data, tmp_path / "elsewhere", train={"max_steps": 100000, "scheduler": "constant"}),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [loratune_executable(), "train", str(config), "--set", f"output_dir={run}", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and not (run / "metrics.jsonl").is_file()) or len(metrics(run)) < 3:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("loratune train: interrupted at step ")
    reached = int(lines[0].split("interrupted at step ")[1].split()[0])
    assert (run / "checkpoints" / f"step-{reached}").is_dir() and str(run / "checkpoints") in lines[0]
    command = shlex.split(lines[1].split("continue with: ", 1)[1])
    assert command[:3] == ["loratune", "train", str(config)] and command[-1] == "--resume"
    assert f"output_dir={run}" in command

    done = run_cli(*command[1:], "--set", f"train.max_steps={reached + 2}", "--no-progress")
    assert done.returncode == 0, done.stderr
    straight = run_cli(
        "train",
        config,
        "--set",
        f"output_dir={tmp_path / 'straight'}",
        "--set",
        f"train.max_steps={reached + 2}",
        "--no-progress",
    )
    assert straight.returncode == 0, straight.stderr
    assert_same_tensors(adapter_tensors(run), adapter_tensors(tmp_path / "straight"))


# --- the built-in model ---------------------------------------------------------------------------------------


def test_the_command_line_shows_the_conversion_notice(capsys, monkeypatch, tmp_path):
    """The notice itself is checked on the real smollm2-135m conversion in test_models; here, that the
    command line shows it, on a stand-in GGUF whose conversion yields a model without an architecture."""
    from loratune.models import gguf_cache

    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    stand_in = tmp_path / "Stand-In.Q4_0.gguf"
    stand_in.write_bytes(b"GGUF")
    monkeypatch.setattr(
        gguf_cache, "convert_gguf_to_hf", lambda path, out: (Path(out) / "config.json").write_text("{}")
    )
    adapter = tmp_path / "adapter"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    loratune.add_adapter(model, loratune.LoraConfig(r=1, target_modules=["0"]))
    loratune.save_adapter(model, adapter)
    status, _, err = cli(capsys, "export-gguf", adapter, "--model", stand_in, "--out", tmp_path / "a.gguf")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 2
    assert lines[0].startswith("loratune export-gguf: converting ") and str(tmp_path / "cache") in lines[0]
    assert lines[1].startswith("loratune export-gguf: error: ")
