"""Helpers for training-run tests: tiny data files and configs that train in about a second on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def addition_rows(n: int = 12, start: int = 0) -> list[dict]:
    """Chat rows ``"add a b"`` → ``"a+b"``; answers of different lengths (1 to 4 digits), so micro-batches
    carry different numbers of target tokens."""
    rows = []
    for i in range(start, start + n):
        a, b = (i * 7) % 10, (i * 389) % (10 ** (1 + i % 4))
        rows.append(
            {"messages": [{"role": "user", "content": f"add {a} {b}"}, {"role": "assistant", "content": str(a + b)}]}
        )
    return rows


def prompt_completion_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"add {i} {i + 1} =", "completion": f" {2 * i + 1}"} for i in range(n)]


def text_rows(n: int = 6) -> list[dict]:
    return [{"text": f"The quick brown fox number {i} jumps over the lazy dog."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def config_dict(model_dir, train_file, output_dir, **sections) -> dict:
    """A small, fast run config as plain data; ``sections`` update the ``model``/``lora``/``data``/``train``
    sections key by key (``train={"max_steps": 2}``)."""
    config = {
        "model": {"name": str(model_dir), "dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"train": str(train_file), "max_length": 64},
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "grad_accum": 1,
            "log_every": 1,
            "lr": 1e-3,
            "eval_batch_size": 8,
            "eval_max_new_tokens": 4,
        },
        "output_dir": str(output_dir),
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            config[name] = {**config.get(name, {}), **values}
        else:
            config[name] = values
    return config


def write_config(path: Path, config: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def adapter_tensors(run_or_adapter_dir) -> dict[str, torch.Tensor]:
    """The tensors of ``DIR/adapter`` (a run directory) or of ``DIR`` itself (an adapter directory)."""
    path = Path(run_or_adapter_dir)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    return load_file(path / "adapter_model.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def train_records(run_dir) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def train_through_cli(model_dir, root: Path, targets, name: str = "run") -> dict:
    """A config, its data and a run trained with ``loratune train`` under ``root``: paths by name."""
    import contextlib

    from loratune.cli.main import main

    data = write_jsonl(root / "train.jsonl", addition_rows(8))
    config = write_config(
        root / f"{name}.yaml", config_dict(model_dir, data, root / name, lora={"target_modules": targets})
    )
    with contextlib.redirect_stdout(None):
        assert main(["train", str(config), "--no-progress"]) == 0
    return {"root": root, "data": data, "config": config, "run": root / name, "adapter": root / name / "adapter"}
