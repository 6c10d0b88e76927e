"""The shipped example data: each generator rewrites its files byte for byte (the docs' claim that the data can be
regenerated), and the sets are what the experiments say they are (labels balanced, held-out phrasings unseen)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from loratune.data.classification import is_pair_data, read_classification

ROOT = Path(__file__).resolve().parent.parent
GENERATORS = {
    "demo": "make_demo_data.py",
    "classify": "make_classify_data.py",
    "numbers": "make_numbers_data.py",
    "pairs": "make_pairs_data.py",
}


@pytest.mark.parametrize("example", GENERATORS)
def test_each_example_set_is_what_its_generator_writes(example, tmp_path):
    script = ROOT / "scripts" / GENERATORS[example]
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "examples" / example / name).read_bytes(), name


def test_the_pair_set_is_balanced_and_its_eval_pairs_are_new():
    train = read_classification(ROOT / "examples/pairs/train.jsonl")
    held_out = read_classification(ROOT / "examples/pairs/eval.jsonl")
    assert is_pair_data(train) and is_pair_data(held_out)
    assert Counter(e.label for e in train) == {"same": 1000, "different": 1000}
    assert Counter(e.label for e in held_out) == {"same": 250, "different": 250}
    seen = {frozenset((e.text, e.pair)) for e in train}
    assert not any(frozenset((e.text, e.pair)) in seen for e in held_out)


def test_the_numbers_set_answers_in_digits_with_numbers_training_never_saw():
    def rows(name: str) -> list[tuple[str, str]]:
        lines = (ROOT / "examples/numbers" / name).read_text().splitlines()
        return [tuple(turn["content"] for turn in json.loads(line)["messages"]) for line in lines]

    train, held_out = rows("train.jsonl"), rows("eval.jsonl")
    assert all(answer.isdigit() and not any(c.isdigit() for c in prompt) for prompt, answer in train + held_out)
    assert not {answer for _, answer in held_out} & {answer for _, answer in train}


D90_TASKS = {  # task: (the report's extra arguments, the d90 readings docs/experiments.md states)
    "pairs": ([], ["→ d90 150 (interpolated 146)", "→ d90 300 (interpolated 264)"]),
    "demo": (["--reference-lr", "3e-4", "--lora-lr", "2e-3"], ["→ d90 5,000 (interpolated 4,602)"]),
}


@pytest.mark.parametrize("task", D90_TASKS)
def test_the_d90_table_is_what_the_kept_run_records_give(task, tmp_path):
    """docs/experiments/TASK/d90.csv (a d90 table's rows) is recomputed from the runs' kept records, and the report
    reads d90 from them as docs/experiments.md states it."""
    extra, readings = D90_TASKS[task]
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/d90_study.py"),
            "report",
            str(ROOT / "docs/experiments" / task),
            "--csv",
            str(tmp_path / "d90.csv"),
            "--plot",
            str(tmp_path / "d90.png"),
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (tmp_path / "d90.csv").read_bytes() == (ROOT / "docs/experiments" / task / "d90.csv").read_bytes()
    assert all(reading in done.stdout for reading in readings), done.stdout


def test_the_encoder_table_is_what_the_kept_run_records_give(tmp_path):
    """docs/experiments/encoder.csv (the encoder table's rows, each method at its chosen rate) is recomputed from
    the runs' kept records, with the rates docs/experiments.md states."""
    script, records = ROOT / "scripts/encoder_study.py", ROOT / "docs/experiments/encoder"
    done = subprocess.run(
        [sys.executable, str(script), "report", str(records), "--csv", str(tmp_path / "encoder.csv")],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (tmp_path / "encoder.csv").read_bytes() == (ROOT / "docs/experiments/encoder.csv").read_bytes()
    for row in (
        "| full fine-tuning | 0.0003 | 3 | 22,716,296 | 99.3 ± 1.2 |",
        "| BitFit (biases + head) | 0.015 | 3 | 29,192 | 100.0 ± 0.0 |",
        "| LoRA r=8, W_q W_v (+ head) | 0.01 | 3 | 76,808 | 98.8 ± 2.0 |",
        "| head only | 0.05 | 3 | 3,080 | 99.6 ± 0.5 |",
    ):
        assert row in done.stdout, done.stdout


EXPERIMENTS_DOC = ROOT / "docs/experiments.md"


@pytest.mark.parametrize(
    "command",
    [
        ["scripts/strength_curve.py", "--csv", "docs/experiments/strength.csv", "--plot", "{tmp}/strength.png"],
        ["scripts/subspace_study.py", "--report", "docs/experiments/demo/subspace.csv"],
    ],
    ids=["strength", "subspace"],
)
def test_the_docs_tables_are_what_their_raw_rows_give(command, tmp_path):
    """The strength dial's and §7's tables in docs/experiments.md are, row for row, what their scripts compute from
    the committed CSVs (three seeds each)."""
    arguments = [a.format(tmp=tmp_path) for a in command]
    done = subprocess.run([sys.executable, *arguments], cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "|---" not in line]
    assert len(rows) >= 3, done.stdout
    doc = EXPERIMENTS_DOC.read_text()
    assert [row for row in rows if row not in doc] == []
