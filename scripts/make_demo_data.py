"""Write the demo task's data: examples/demo/train.jsonl and examples/demo/eval.jsonl.

The task: **date normalisation**. The user writes a calendar date the way people do ("March 5th, 2021",
"5 Mar 2021", "the fifth of March, 2021", "Friday, March 5, 2021", "2021, March 5", ...) inside an
instruction or a sentence; the assistant answers with that date in ISO 8601 form and nothing else:
``2021-03-05``. Every date names its month in letters and its year in four digits, so no answer is
ambiguous (no all-numeric forms such as 03/05/2021, which mean different dates in different countries).

The base smollm2-135m knows roughly what an ISO date looks like but, asked zero-shot, it chats, echoes
the input or garbles the month number; three worked examples in the prompt help only a little. A LoRA
adapter learns the mapping (month name → number, ordinal words → day, zero padding, nothing else to say)
in a few minutes on a CPU.

Generalisation is measured, not memorisation: the evaluation set's instruction phrasings come from a
template list that training never sees, and its dates never occur in the training set. Both sets use the
same date spellings (those are the task). Rows are in OpenAI ``messages`` format, one JSON object a line.
Generation is deterministic (fixed seed): running the script again writes byte-identical files.

Usage: python scripts/make_demo_data.py [--out examples/demo] [--train N] [--eval N] [--seed S]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import tempfile
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
MONTH_ABBR = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
ORDINAL_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
                 "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
                 "eighteenth", "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third",
                 "twenty-fourth", "twenty-fifth", "twenty-sixth", "twenty-seventh", "twenty-eighth",
                 "twenty-ninth", "thirtieth", "thirty-first"]  # fmt: skip
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST_YEAR, LAST_YEAR = 1950, 2049


def ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _abbr(d: dt.date, dot: bool) -> str:
    # "May" has no abbreviation, so it never gets a dot; "Sept." is a common spelling of September.
    abbr = MONTH_ABBR[d.month - 1]
    if dot and d.month == 9:
        return "Sept."
    return abbr + "." if dot and d.month != 5 else abbr


# Ways to write a date (the task). Each takes a date and returns its spelling.
DATE_STYLES = {
    "month d, yyyy": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "month dth, yyyy": lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",
    "d month yyyy": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "dth month yyyy": lambda d: f"{ordinal(d.day)} {MONTHS[d.month - 1]} {d.year}",
    "d mon yyyy": lambda d: f"{d.day} {_abbr(d, False)} {d.year}",
    "mon d, yyyy": lambda d: f"{_abbr(d, False)} {d.day}, {d.year}",
    "mon. d, yyyy": lambda d: f"{_abbr(d, True)} {d.day}, {d.year}",
    "the dth of month, yyyy": lambda d: f"the {ORDINAL_WORDS[d.day - 1]} of {MONTHS[d.month - 1]}, {d.year}",
    "month the dth, yyyy": lambda d: f"{MONTHS[d.month - 1]} the {ordinal(d.day)}, {d.year}",
    "month word-d, yyyy": lambda d: f"{MONTHS[d.month - 1]} {ORDINAL_WORDS[d.day - 1]}, {d.year}",
    "yyyy, month d": lambda d: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",
    "yyyy mon d": lambda d: f"{d.year} {_abbr(d, False)} {d.day}",
    "weekday, month d, yyyy": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    "weekday d month yyyy": lambda d: f"{WEEKDAYS[d.weekday()]} {d.day} {MONTHS[d.month - 1]} {d.year}",
    "d-mon-yyyy": lambda d: f"{d.day:02d}-{_abbr(d, False)}-{d.year}",
    "MONTH D YYYY": lambda d: f"{MONTHS[d.month - 1].upper()} {d.day} {d.year}",
    "month d yyyy": lambda d: f"{MONTHS[d.month - 1].lower()} {d.day} {d.year}",
}

# Instruction phrasings. The two lists share no template: evaluation measures whether the adapter learned
# the task, not the training prompts.
TRAIN_TEMPLATES = [
    "Convert this date to ISO 8601 format (YYYY-MM-DD): {date}",
    "Rewrite {date} in YYYY-MM-DD format.",
    "What is {date} in ISO format? Answer with the date only.",
    "Normalize the date: {date}",
    "Give the ISO 8601 date for {date}.",
    "Date: {date}\nWrite it as YYYY-MM-DD.",
    "Please format {date} as an ISO date.",
    "The meeting is on {date}. Write that date in YYYY-MM-DD form.",
    "I was born on {date}. What's that in ISO 8601?",
    "Format as YYYY-MM-DD: {date}",
    "{date}\nConvert to ISO 8601.",
    "Change the date {date} to the format year-month-day (YYYY-MM-DD).",
    "Our shop reopens {date}. Give me that date in ISO format, please.",
    "ISO date for: {date}",
    'Standardize this date as YYYY-MM-DD: "{date}"',
    "The contract was signed on {date}. Output the signing date as YYYY-MM-DD.",
]
EVAL_TEMPLATES = [
    "Express {date} using the ISO 8601 date format.",
    "Turn the date in this sentence into YYYY-MM-DD: The invoice was paid on {date}.",
    "{date} -- what is this as a YYYY-MM-DD string?",
    "Could you write the date {date} in ISO form (YYYY-MM-DD)?",
    "Transform into an ISO 8601 calendar date: {date}",
    "My flight leaves on {date}. Reformat that date as YYYY-MM-DD.",
    "Input date: {date}\nOutput the same date as YYYY-MM-DD.",
    "In YYYY-MM-DD notation, how is {date} written?",
    "The package arrived {date}. Convert the arrival date to ISO 8601.",
    'Represent "{date}" as an ISO-8601 date.',
]


def random_date(rng: random.Random) -> dt.date:
    first = dt.date(FIRST_YEAR, 1, 1).toordinal()
    last = dt.date(LAST_YEAR, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(first, last))


def make_row(date: dt.date, style: str, template: str) -> dict:
    question = template.format(date=DATE_STYLES[style](date))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": date.isoformat()}]}


def make_split(rng: random.Random, dates: list[dt.date], templates: list[str]) -> list[dict]:
    """One row per date; date styles and templates cycle through shuffled orders so each is used evenly."""
    styles = list(DATE_STYLES)
    rows = []
    for i, date in enumerate(dates):
        if i % len(styles) == 0:
            rng.shuffle(styles)
        rows.append(make_row(date, styles[i % len(styles)], rng.choice(templates)))
    return rows


def make_demo_data(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Return (train rows, eval rows): distinct dates in each, no date shared between them."""
    rng = random.Random(seed)
    dates: set[dt.date] = set()
    ordered: list[dt.date] = []
    while len(ordered) < n_train + n_eval:
        date = random_date(rng)
        if date not in dates:
            dates.add(date)
            ordered.append(date)
    eval_dates, train_dates = ordered[:n_eval], ordered[n_eval:]
    return make_split(rng, train_dates, TRAIN_TEMPLATES), make_split(rng, eval_dates, EVAL_TEMPLATES)


def write_jsonl_atomic(rows: list[dict], path: Path) -> None:
    """Write rows as JSON lines to a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "examples" / "demo")
    parser.add_argument("--train", type=int, default=3000, help="training examples (default: 3000)")
    parser.add_argument("--eval", type=int, default=250, help="evaluation examples (default: 250)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    train, evaluation = make_demo_data(args.train, args.eval, args.seed)
    write_jsonl_atomic(train, args.out / "train.jsonl")
    write_jsonl_atomic(evaluation, args.out / "eval.jsonl")
    print(f"wrote {len(train)} training and {len(evaluation)} evaluation examples to {args.out}")


if __name__ == "__main__":
    main()
