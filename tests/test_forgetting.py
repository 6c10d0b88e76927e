"""Forgetting (``data.retain``, ``eval --retain``): the retain set's loss on the base before training, at every
evaluation and at the end, ``forgetting`` = the rise, in metrics.jsonl, summary.json and the sweep table."""

from __future__ import annotations

import json

import pytest
import torch

import loratune
from loratune.inference.forgetting import builtin_retain_path, retain_examples, retain_loss
from run_helpers import addition_rows, config_dict, text_rows, write_config, write_jsonl
from test_cli import assert_one_line_error, cli


@pytest.fixture
def retain_file(tmp_path):
    return write_jsonl(tmp_path / "retain.jsonl", text_rows(6))


def forgetting_run(capsys, tiny_llama_dir, tmp_path, retain, **train):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    config = write_config(
        tmp_path / "run.yaml",
        config_dict(
            tiny_llama_dir,
            data,
            tmp_path / "run",
            data={"retain": str(retain)},
            train={"max_steps": 4, "lr": 2e-2, "eval_every": 2, "save_every": 2, **train},
        ),
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert status == 0, err
    return config


def base_retain_loss(model_dir, retain) -> float:
    model, tokenizer = loratune.load_model(str(model_dir), dtype="fp32", device="cpu")
    return retain_loss(model, retain_examples(str(retain), tokenizer, 64), tokenizer.pad_token_id, 8)


def test_a_run_measures_the_retain_loss_before_training_at_each_evaluation_and_at_the_end(
    capsys, tiny_llama_dir, tmp_path, retain_file
):
    forgetting_run(capsys, tiny_llama_dir, tmp_path, retain_file, method="full", lr=1e-2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    retained = [r for r in records if "retain_loss" in r]
    assert [r["step"] for r in retained] == [0, 2, 4]
    base = retained[0]["retain_loss"]
    assert base == pytest.approx(base_retain_loss(tiny_llama_dir, retain_file), rel=1e-5)
    for record in retained:
        assert record["forgetting"] == pytest.approx(record["retain_loss"] - base)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["retain_loss_base"] == pytest.approx(base)
    assert summary["forgetting"] == pytest.approx(retained[-1]["forgetting"])
    assert summary["forgetting"] > 0.01  # full fine-tuning on another task at a high lr: the retain loss rose


def test_a_resumed_run_keeps_the_retain_loss_it_measured_before_training(capsys, tiny_llama_dir, tmp_path, retain_file):
    config = forgetting_run(capsys, tiny_llama_dir, tmp_path, retain_file)
    first = json.loads((tmp_path / "run" / "summary.json").read_text())["retain_loss_base"]
    status, _, err = cli(capsys, "train", config, "--no-progress", "--resume", "--set", "train.max_steps=6")
    assert status == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "retain_loss" in r] == [0, 2, 4, 6]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["retain_loss_base"] == first


def test_eval_retain_compares_the_adapter_with_its_base(capsys, tiny_llama_dir, tmp_path, retain_file):
    forgetting_run(capsys, tiny_llama_dir, tmp_path, retain_file)
    status, out, err = cli(
        capsys,
        "eval",
        "--model",
        tiny_llama_dir,
        "--adapter",
        tmp_path / "run" / "adapter",
        "--data",
        tmp_path / "chat.jsonl",
        "--retain",
        retain_file,
        "--no-exact-match",
        "--json",
    )
    assert status == 0, err
    report = json.loads(out)
    assert report["retain_loss_base"] == pytest.approx(base_retain_loss(tiny_llama_dir, retain_file), rel=1e-4)
    assert report["forgetting"] == pytest.approx(report["retain_loss"] - report["retain_loss_base"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert report["retain_loss"] == pytest.approx(summary["retain_loss"], rel=1e-4)


def test_the_builtin_retain_set_ships_with_the_package(tiny_tokenizer):
    rows = [json.loads(line) for line in builtin_retain_path().read_text().splitlines()]
    assert len(rows) == 150 and all(row["messages"][1]["content"] for row in rows)
    assert len(retain_examples("builtin", tiny_tokenizer, 128)) == 150
    config = loratune.train.validate_config(
        {"data": {"train": "x.jsonl", "retain": "builtin"}}, default_output_dir="runs/x"
    )
    assert config.data.retain == "builtin"


def test_a_missing_retain_file_is_one_line(capsys, tiny_llama_dir, tmp_path):
    status, _, err = cli(
        capsys, "eval", "--model", tiny_llama_dir, "--data", tmp_path / "x.jsonl", "--retain", tmp_path / "nope.jsonl"
    )
    assert status == 2 and "nope.jsonl: no such file" in err and len(err.strip().splitlines()) == 1
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    config = write_config(
        tmp_path / "run.yaml",
        config_dict(tiny_llama_dir, data, tmp_path / "run", data={"retain": str(tmp_path / "nope.jsonl")}),
    )
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert_one_line_error(status, err, "train", "data.retain", "nope.jsonl")


def test_the_retain_loss_is_the_mean_over_target_tokens(tiny_llama_dir, retain_file):
    model, tokenizer = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    examples = retain_examples(str(retain_file), tokenizer, 64)
    expected = []
    for example in examples:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=torch.tensor([example.labels])).loss
        expected.append((loss.item(), sum(1 for label in example.labels[1:] if label != -100)))
    mean = sum(loss * n for loss, n in expected) / sum(n for _, n in expected)
    assert retain_loss(model, examples, tokenizer.pad_token_id, 4) == pytest.approx(mean, rel=1e-5)
