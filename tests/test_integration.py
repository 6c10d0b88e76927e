"""A short real fine-tune of smollm2-135m through the CLI: it must learn (eval loss falls far below the base
model's) and produce an adapter that loads back and generates the task's answer format."""

import json
import shutil
from pathlib import Path

import pytest

from loratune.cli.main import main

pytestmark = pytest.mark.integration

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    lines = (DEMO / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:400]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((DEMO / "eval.jsonl").read_text().splitlines()[:24]) + "\n")
    shutil.copy(DEMO / "config.yaml", root / "config.yaml")
    return root


def eval_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", "--data", *args, "--json", "--max-new-tokens", "16"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_short_fine_tune_of_smollm2_learns_the_task(small_demo, use_loratune_cache, capsys):
    run = small_demo / "run"
    code = main(
        [
            "train",
            str(small_demo / "config.yaml"),
            "--no-progress",
            "--set",
            f"output_dir={run}",
            "--set",
            "train.max_steps=12",
            "--set",
            "train.batch_size=8",
            "--set",
            "train.save_every=6",
        ]
    )
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["tokens_per_s"] > 0
    eval_file = str(small_demo / "eval.jsonl")
    base = eval_json(capsys, eval_file)
    adapted = eval_json(capsys, eval_file, "--adapter", str(run / "adapter"))
    print(f"base {base}\nadapted {adapted}")
    assert adapted["loss"] < 0.5 * base["loss"]
    assert adapted["exact_match"] > base["exact_match"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
