"""Write the built-in retain set (``data.retain: builtin``): what the base model already does, in its own words.

Forgetting is measured as the rise of the loss on text standing for what the base already knows. The built-in
set is text the base model itself generated (so the project can ship it): smollm2-135m's greedy answers
(bf16, up to 96 new tokens) to 150 everyday instructions — 50 topics in general knowledge, science, daily life,
language and reasoning, asked three ways. Rows are OpenAI ``messages`` chats; the loss counts the answers.
Deterministic: running the script again writes the same file (given the same torch and model).

Usage: python scripts/make_retain_data.py [--out src/loratune/data/retain/smollm2-135m.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOPICS = [
    "photosynthesis",
    "the water cycle",
    "gravity",
    "volcanoes",
    "the human heart",
    "vaccines",
    "the moon",
    "rainbows",
    "electricity",
    "magnets",
    "the Roman Empire",
    "the printing press",
    "the Great Wall of China",
    "the Industrial Revolution",
    "democracy",
    "the Olympic Games",
    "the Amazon rainforest",
    "deserts",
    "oceans",
    "honeybees",
    "dinosaurs",
    "recycling",
    "healthy sleep",
    "drinking water",
    "exercise",
    "cooking rice",
    "making tea",
    "saving money",
    "writing a letter",
    "learning a language",
    "reading books",
    "friendship",
    "time management",
    "public libraries",
    "bicycles",
    "trains",
    "airplanes",
    "the internet",
    "computers",
    "smartphones",
    "music",
    "painting",
    "chess",
    "football",
    "gardening",
    "weather forecasts",
    "maps",
    "prime numbers",
    "fractions",
    "the metric system",
]
TEMPLATES = [
    "Explain {topic} in a few simple sentences.",
    "What are three interesting facts about {topic}?",
    "Why is {topic} important? Answer briefly.",
]
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "loratune" / "data" / "retain" / "smollm2-135m.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    import loratune
    from loratune.data.tokenize import chat_prompt_ids
    from loratune.inference.decode import generate_greedy
    from loratune.outputs import write_text_atomic

    model, tokenizer = loratune.load_model("smollm2-135m", dtype="bf16", device="cpu")
    prompts = [template.format(topic=topic) for topic in TOPICS for template in TEMPLATES]
    answers = generate_greedy(
        model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in prompts], args.max_new_tokens, batch_size=25
    )
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a.strip()}]}
        for p, a in zip(prompts, answers)
    ]
    write_text_atomic(args.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
