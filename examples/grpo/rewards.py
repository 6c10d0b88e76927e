"""Reward functions for examples/grpo, with TRL's signature (``f(prompts, completions, **columns) -> list[float]``):
they run unchanged under TRL's ``GRPOTrainer``."""

import re

ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def date_parts(prompts, completions, answer, **kwargs):
    """Partial credit on the way to an exact match: the share of the year, month and day of the first YYYY-MM-DD
    date in the completion that equal the answer's (0 when the completion holds no such date)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        found = ISO_DATE.search(_text(completion))
        if found is None:
            rewards.append(0.0)
            continue
        want = expected.split("-")
        rewards.append(sum(int(a) == int(b) for a, b in zip(found.groups(), want)) / 3)
    return rewards
