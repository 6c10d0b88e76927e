"""Write examples/grpo's prompts from the demo task's rows: each user message becomes a conversational prompt and
its assistant answer the ``answer`` column the rewards compare with.

    python examples/grpo/make_prompts.py        # writes examples/grpo/train.jsonl and eval.jsonl
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo"


def convert(source: Path, target: Path, rows: int) -> None:
    with target.open("w") as out:
        for line in source.read_text().splitlines()[:rows]:
            user, assistant = json.loads(line)["messages"]
            out.write(json.dumps({"prompt": [user], "answer": assistant["content"]}) + "\n")


if __name__ == "__main__":
    convert(DEMO / "train.jsonl", HERE / "train.jsonl", 1000)
    convert(DEMO / "eval.jsonl", HERE / "eval.jsonl", 32)  # instruction phrasings never used in training
