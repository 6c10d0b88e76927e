"""Write examples/dpo's preference pairs from the demo task's rows: the prompt is the user's date question, the
chosen answer the date alone as YYYY-MM-DD, the rejected one a near miss a small model often gives instead — day
and month swapped, the US format, or a sentence around the date.

    python examples/dpo/make_pairs.py           # writes examples/dpo/train.jsonl and eval.jsonl
"""

import datetime
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo"


def near_miss(iso: str, kind: int) -> str:
    """A wrong or wordy answer for the date ``iso`` (YYYY-MM-DD); ``kind`` picks which."""
    year, month, day = iso.split("-")
    if kind == 0 and day != month:
        return f"{year}-{day}-{month}"  # day and month swapped
    if kind in (0, 1):
        return f"{month}/{day}/{year}"  # the US format
    spelled = datetime.date(int(year), int(month), int(day)).strftime("%B %-d, %Y")
    return f"The date {spelled} in ISO 8601 format is {iso}."  # right date, but not the date alone


def convert(source: Path, target: Path, rows: int) -> None:
    with target.open("w") as out:
        for i, line in enumerate(source.read_text().splitlines()[:rows]):
            user, assistant = json.loads(line)["messages"]
            iso = assistant["content"]
            pair = {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": iso}],
                "rejected": [{"role": "assistant", "content": near_miss(iso, i % 3)}],
            }
            out.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
    convert(DEMO / "train.jsonl", HERE / "train.jsonl", 1000)
    convert(DEMO / "eval.jsonl", HERE / "eval.jsonl", 48)  # instruction phrasings never used in training
