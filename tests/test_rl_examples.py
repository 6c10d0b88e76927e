"""examples/dpo and examples/grpo: their configs load, their data reads as the objectives read it, and the GRPO
example's reward function scores as its docstring says (the runs themselves take minutes: see their READMEs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.data.preference import read_preferences
from loratune.train import load_config
from loratune.train.objectives.grpo import GRPO
from loratune.train.rewards import score

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_dpo_example_loads_and_every_pair_differs():
    config = load_config(EXAMPLES / "dpo" / "config.yaml")
    assert config.train.objective == "dpo" and config.model.name == "smollm2-135m"
    for split in (config.data.train, config.data.eval):
        pairs = read_preferences(split)
        assert len(pairs) >= 48
    rows = [json.loads(line) for line in (EXAMPLES / "dpo" / "train.jsonl").read_text().splitlines()]
    assert all(row["chosen"] != row["rejected"] for row in rows)


def test_the_grpo_example_loads_its_rewards_and_scores_dates():
    config = load_config(EXAMPLES / "grpo" / "config.yaml")
    objective = GRPO.from_config(config)
    assert [r.name for r in objective.rewards] == ["exact_match", "date_parts", "regex"]
    completions = [[{"role": "assistant", "content": text}] for text in ("2031-04-12", "It is 2031-12-04.", "April")]
    columns = {"answer": ["2031-04-12"] * 3}
    got = [score(r, [[]] * 3, completions, columns, ["row"] * 3, {}) for r in objective.rewards]
    assert got[0] == [1.0, 0.0, 0.0]  # exact match
    assert got[1] == pytest.approx([1.0, 1 / 3, 0.0])  # year, month, day of the first YYYY-MM-DD
    assert got[2] == [1.0, 0.0, 0.0]  # the whole completion is one date
