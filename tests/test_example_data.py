"""The shipped example data: each generator rewrites its files byte for byte (the docs' claim that the data can be
regenerated), and the sets are what the experiments say they are (labels balanced, held-out phrasings unseen)."""

from __future__ import annotations

import csv
import json
import statistics
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


ENCODER_TABLES = {  # records under docs/experiments/NAME, rows in docs/experiments/NAME.csv: the rows the doc states
    "encoder": (
        "| full fine-tuning | 0.0003 | 3 | 22,716,296 | 99.3 ± 1.2 |",
        "| BitFit (biases + head) | 0.015 | 3 | 29,192 | 100.0 ± 0.0 |",
        "| LoRA r=8, W_q W_v (+ head) | 0.01 | 3 | 76,808 | 98.8 ± 2.0 |",
        "| head only | 0.05 | 3 | 3,080 | 99.6 ± 0.5 |",
    ),
    "pairs/methods": (
        "| full fine-tuning | 0.0001 | 3 | 22,713,986 | 85.9 ± 1.7 |",
        "| BitFit (biases + head) | 0.005 | 3 | 26,882 | 89.7 ± 0.5 |",
        "| LoRA r=8, W_q W_v (+ head) | 0.001 | 3 | 74,498 | 88.7 ± 2.1 |",
        "| head only | 0.15 | 3 | 770 | 62.5 ± 0.3 |",
    ),
}


@pytest.mark.parametrize("name", ENCODER_TABLES)
def test_the_encoder_tables_are_what_the_kept_run_records_give(name, tmp_path):
    """docs/experiments/NAME.csv (an encoder table's rows, each method at its chosen rate) is recomputed from the
    runs' kept records, with the rates docs/experiments.md states."""
    script, records = ROOT / "scripts/encoder_study.py", ROOT / "docs/experiments" / name
    done = subprocess.run(
        [sys.executable, str(script), "report", str(records), "--csv", str(tmp_path / "table.csv")],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (tmp_path / "table.csv").read_bytes() == (ROOT / f"docs/experiments/{name}.csv").read_bytes()
    for row in ENCODER_TABLES[name]:
        assert row in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("command", "doc", "readings"),
    [
        (
            ["scripts/strength_curve.py", "--csv", "docs/experiments/strength.csv", "--plot", "{tmp}/strength.png"],
            "docs/experiments.md",
            [],
        ),
        (["scripts/subspace_study.py", "--report", "docs/experiments/demo/subspace.csv"], "docs/experiments.md", []),
        (
            [
                "scripts/resize_study.py",
                "--csv",
                "docs/experiments/demo/resize.csv",
                "--ranks-csv",
                "docs/experiments/demo/resize_ranks.csv",
                "--phi-csv",
                "docs/experiments/demo/resize_phi.csv",
            ],
            "README.md",
            ["0.028 / 0.032 / 0.025"],  # φ(1, 1) per seed
        ),
    ],
    ids=["strength", "subspace", "resize"],
)
def test_the_docs_tables_are_what_their_raw_rows_give(command, doc, readings, tmp_path):
    """The strength dial's and §7's tables in docs/experiments.md, and the README's resize tables, are row for row
    what their scripts compute from the committed CSVs (three seeds each); so are the readings the doc quotes."""
    arguments = [a.format(tmp=tmp_path) for a in command]
    done = subprocess.run([sys.executable, *arguments], cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "|---" not in line]
    assert len(rows) >= 3, done.stdout
    text = (ROOT / doc).read_text()
    assert [row for row in rows if row not in text] == []
    assert all(reading in done.stdout and reading in text for reading in readings), done.stdout


def test_the_d90_curve_past_the_grid_is_what_the_kept_rows_give():
    """d = 100,000 at lower rates (`scripts/experiments.sh d90flat`): the best rate's exact match on seeds 0 / 1 / 2
    and its mean ± std, as docs/experiments.md states them, are those of the committed rows."""

    def rows(name: str) -> list[dict]:
        with (ROOT / "docs/experiments/demo" / f"{name}.csv").open() as handle:
            return list(csv.DictReader(handle))

    grid = {float(r["train.lr"]): float(r["eval_exact_match"]) for r in rows("d90-flat")}
    best = max(grid, key=grid.get)
    seeds = [grid[best]] + [float(r["eval_exact_match"]) for r in rows("d90-flat-seeds/dim=100000")]
    doc = (ROOT / "docs/experiments.md").read_text()
    assert best == 0.05 and len(seeds) == 3
    assert " / ".join(f"{100 * v:.1f}" for v in seeds) in doc
    assert f"{100 * statistics.mean(seeds):.1f} ± {100 * statistics.stdev(seeds):.1f}%" in doc
