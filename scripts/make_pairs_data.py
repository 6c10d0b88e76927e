"""Write the sentence-pair demo's data: examples/pairs/train.jsonl and examples/pairs/eval.jsonl.

The task: **paraphrase detection** (as MRPC, the intrinsic-dimension papers' sentence-pair task): are two home-
assistant requests the same request? Rows ``{"sentence1", "sentence2", "label"}`` with label ``same`` or
``different``. Each request is an intent with slot values (a time, a room, a number of minutes...), each intent has
phrasing templates, and a pair shows one request in two phrasings (``same``) or two requests that differ in one
slot value or in the intent itself (``different``: a timer of 10 against one of 15 minutes; lights on against off
in the same room; an alarm against a reminder at the same time). Half the pairs are ``same``. A classifier must
compare the two texts' values, not spot a keyword.

Generalisation is measured, not memorisation: in every evaluation pair one sentence has a phrasing (template)
training never sees, the other any phrasing of its intent, and the slot values of evaluation are training's mixed
with values of their own.

Deterministic (fixed seed): running the script again writes byte-identical files.

Usage: python scripts/make_pairs_data.py [--out examples/pairs] [--train N] [--eval N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# intent -> (training phrasings, held-out phrasings for evaluation)
PHRASINGS = {
    "timer": (
        [
            "set a timer for {minutes} minutes",
            "start a {minutes} minute timer",
            "timer for {minutes} minutes please",
            "count down {minutes} minutes",
            "can you time {minutes} minutes for me",
        ],
        ["let me know when {minutes} minutes have passed", "i need {minutes} minutes on the clock"],
    ),
    "alarm": (
        [
            "set an alarm for {time}",
            "wake me up at {time}",
            "i need an alarm at {time}",
            "alarm at {time} please",
            "can you set my alarm to {time}",
        ],
        ["make sure i'm awake by {time}", "ring me at {time} to get up"],
    ),
    "reminder": (
        [
            "remind me to {chore} at {time}",
            "at {time} remind me to {chore}",
            "set a reminder to {chore} for {time}",
            "don't let me forget to {chore} at {time}",
        ],
        ["ping me at {time} about having to {chore}", "at {time} nudge me to {chore}"],
    ),
    "lights_on": (
        [
            "turn on the {room} lights",
            "switch the lights on in the {room}",
            "lights on in the {room}",
            "can you put the {room} lights on",
        ],
        ["i want light in the {room}", "make the {room} bright"],
    ),
    "lights_off": (
        [
            "turn off the {room} lights",
            "switch the lights off in the {room}",
            "lights off in the {room}",
            "can you shut the {room} lights",
        ],
        ["kill the lights in the {room}", "make the {room} dark"],
    ),
    "heating": (
        [
            "set the {room} to {degrees} degrees",
            "heat the {room} to {degrees} degrees",
            "make it {degrees} degrees in the {room}",
            "change the {room} thermostat to {degrees}",
        ],
        ["i'd like the {room} at {degrees} degrees", "warm the {room} up to {degrees}"],
    ),
    "music": (
        [
            "play some {artist}",
            "put on {artist}",
            "i want to listen to {artist}",
            "start playing {artist}",
        ],
        ["queue up {artist} for me", "let's hear {artist}"],
    ),
    "weather": (
        [
            "what's the weather in {city} {day}",
            "will it rain in {city} {day}",
            "weather forecast for {city} {day}",
            "how warm is it in {city} {day}",
        ],
        ["should i take an umbrella in {city} {day}", "tell me the forecast {day} for {city}"],
    ),
}

# slot -> (training values, held-out values mixed into evaluation)
VALUES = {
    "minutes": (["3", "5", "10", "15", "20", "25", "30", "35", "45", "50", "60", "75"], ["8", "12", "40", "90"]),
    "time": (
        ["6 am", "6:30", "7 am", "7:15", "7:45", "8 am", "9 am", "1 pm", "5 pm", "9 pm", "10 pm", "noon"],
        ["5:45", "11 am", "8:30", "midnight"],
    ),
    "chore": (
        ["take my pills", "call mom", "water the plants", "pay the rent", "feed the cat", "take out the bins"],
        ["book the dentist", "charge my phone", "buy milk"],
    ),
    "room": (
        ["kitchen", "bedroom", "living room", "bathroom", "office", "hallway", "dining room", "porch"],
        ["garage", "nursery", "attic"],
    ),
    "degrees": (["16", "18", "19", "20", "21", "22", "23", "26"], ["17", "24", "25"]),
    "artist": (
        ["the beatles", "adele", "miles davis", "taylor swift", "bach", "queen", "beyonce", "radiohead"],
        ["abba", "nina simone", "mozart"],
    ),
    "city": (["paris", "london", "berlin", "madrid", "rome", "oslo", "cairo", "dublin"], ["tokyo", "lisbon", "vienna"]),
    "day": (["today", "tomorrow", "this weekend", "on monday"], ["tonight", "on friday"]),
}

# intents that share slots, so a pair of different intents can carry the same values
NEIGHBOURS = {
    "timer": [],
    "alarm": ["reminder"],
    "reminder": ["alarm"],
    "lights_on": ["lights_off", "heating"],
    "lights_off": ["lights_on", "heating"],
    "heating": ["lights_on", "lights_off"],
    "music": [],
    "weather": [],
}


def slots_of(template: str) -> list[str]:
    return [name for name in VALUES if "{" + name + "}" in template]


def request(rng: random.Random, intent: str, held_out: bool) -> dict[str, str]:
    """Slot values for one request of ``intent`` (held-out values mixed in for evaluation)."""
    names = sorted({name for templates in PHRASINGS[intent] for template in templates for name in slots_of(template)})
    values = {}
    for name in names:
        train, extra = VALUES[name]
        values[name] = rng.choice(train + extra if held_out else train)
    return values


def phrase(rng: random.Random, intent: str, values: dict[str, str], templates: list[str], avoid: str = "") -> str:
    return rng.choice([t for t in templates if t != avoid]).format(**values)


def pair(rng: random.Random, held_out: bool) -> dict[str, str]:
    intent = rng.choice(sorted(PHRASINGS))
    values = request(rng, intent, held_out)
    train, unseen = PHRASINGS[intent]
    first = phrase(rng, intent, values, unseen if held_out else train)
    kind = rng.random()
    if kind < 0.5:  # the same request, phrased another way
        other_intent, other_values, label = intent, values, "same"
    elif kind < 0.85 or not NEIGHBOURS[intent]:  # one slot value changed
        other_intent, other_values, label = intent, dict(values), "different"
        name = rng.choice(sorted(values))
        train, extra = VALUES[name]
        other_values[name] = rng.choice([v for v in (train + extra if held_out else train) if v != values[name]])
    else:  # a neighbouring intent with the values the two share
        other_intent, label = rng.choice(NEIGHBOURS[intent]), "different"
        other_values = request(rng, other_intent, held_out)
        other_values.update({k: v for k, v in values.items() if k in other_values})
    template = next(t for templates in PHRASINGS[intent] for t in templates if t.format(**values) == first)
    other_train, other_unseen = PHRASINGS[other_intent]
    templates = other_train + other_unseen if held_out else other_train
    second = phrase(rng, other_intent, other_values, templates, avoid=template if other_intent == intent else "")
    if rng.random() < 0.5:
        first, second = second, first
    return {"sentence1": first, "sentence2": second, "label": label}


def rows(rng: random.Random, count: int, held_out: bool, seen: set) -> list[dict]:
    """``count`` distinct pairs, half of each label (repeats of a pair, in either order, are drawn again)."""
    out, wanted = [], {"same": count // 2, "different": count - count // 2}
    while len(out) < count:
        row = pair(rng, held_out)
        key = frozenset((row["sentence1"], row["sentence2"]))
        if wanted[row["label"]] and key not in seen and len(key) == 2:
            seen.add(key)
            wanted[row["label"]] -= 1
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples/pairs")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set = set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count, held_out in (("train", args.train, False), ("eval", args.eval, True)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(rng, count, held_out, seen)))
        print(f"wrote {count} pairs to {path}")


if __name__ == "__main__":
    main()
