"""Write a second small task on the demo's base, for studies that need two tasks (mixing two trained adapters):
examples/numbers/train.jsonl and examples/numbers/eval.jsonl.

The task: **numbers written in words to digits** — "three thousand four hundred and twelve" → "3412" — chat rows
``{"messages": [user, assistant]}`` like the demo's dates. The numbers run from 0 to 99,999, written with or
without "and", with or without hyphens, sometimes inside a sentence. Generalisation is measured: the evaluation rows
use instruction phrasings training never sees, and numbers training does not contain.

Deterministic (fixed seed): running the script again writes byte-identical files.

Usage: python scripts/make_numbers_data.py [--out examples/numbers] [--train N] [--eval N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONES = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"),
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

# (training phrasings, held-out phrasings for evaluation); {words} is the number in words
PHRASINGS = (
    [
        "Write {words} in digits.",
        "Convert to a number: {words}",
        "{words}\nAs digits, please.",
        'What is "{words}" as a numeral?',
        "The invoice total was {words} euros. Give the amount in digits only.",
        "Digits only: {words}",
        "Turn this into an integer: {words}.",
    ],
    [
        "How do you write {words} with digits? Answer with the number only.",
        "Number form of '{words}'?",
        "She counted {words} birds. Write that count as a numeral.",
    ],
)


def below_hundred(n: int, hyphen: bool) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (("-" if hyphen else " ") + ONES[ones] if ones else "")


def below_thousand(n: int, hyphen: bool, use_and: bool) -> str:
    hundreds, rest = divmod(n, 100)
    if not hundreds:
        return below_hundred(rest, hyphen)
    words = f"{ONES[hundreds]} hundred"
    return words + ((" and " if use_and else " ") + below_hundred(rest, hyphen) if rest else "")


def in_words(n: int, rng: random.Random) -> str:
    """``n`` (0 ≤ n < 100,000) in English words, hyphens and "and" chosen at random."""
    hyphen, use_and = rng.random() < 0.5, rng.random() < 0.5
    thousands, rest = divmod(n, 1000)
    if not thousands:
        return below_thousand(rest, hyphen, use_and)
    words = f"{below_thousand(thousands, hyphen, use_and)} thousand"
    if not rest:
        return words
    joiner = " and " if use_and and rest < 100 else " "
    return words + joiner + below_thousand(rest, hyphen, use_and)


def number(rng: random.Random) -> int:
    """Mostly 1–5 digit numbers, evenly by length, so short and long ones are both common."""
    digits = rng.randint(1, 5)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def rows(rng: random.Random, count: int, templates: list[str], taken: set[int]) -> list[dict]:
    out = []
    while len(out) < count:
        n = number(rng)
        if n in taken:
            continue
        taken.add(n)
        prompt = rng.choice(templates).format(words=in_words(n, rng))
        out.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(n)}]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/numbers")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    taken: set[int] = set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count, templates in (("train", args.train, PHRASINGS[0]), ("eval", args.eval, PHRASINGS[1])):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(rng, count, templates, taken)))
        print(f"wrote {count} rows to {path}")


if __name__ == "__main__":
    main()
