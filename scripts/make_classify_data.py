"""Write the classification demo's data: examples/classify/train.jsonl and examples/classify/eval.jsonl.

The task: **intent classification** for a home assistant, eight intents (alarm, flight, food order, music,
reminder, shopping list, timer, weather), rows ``{"text", "label"}``. Each intent has a set of phrasing
templates filled with slot values (places, dishes, artists, times). Generalisation is measured, not
memorisation: the evaluation rows use phrasings (templates) that training never sees, with their own slot
values mixed in. The intents are close on purpose (alarm / timer / reminder; food order / shopping list), so
a classifier must read more than one keyword.

Deterministic (fixed seed): running the script again writes byte-identical files.

Usage: python scripts/make_classify_data.py [--out examples/classify] [--train N] [--eval N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# intent -> (training phrasings, held-out phrasings for evaluation)
PHRASINGS = {
    "alarm": (
        [
            "set an alarm for {time}",
            "wake me up at {time}",
            "i need an alarm at {time} tomorrow",
            "alarm at {time} please",
            "can you set my alarm to {time}",
            "get me up at {time}",
        ],
        ["make sure i'm awake by {time}", "ring me at {time} in the morning", "put an alarm on for {time}"],
    ),
    "timer": (
        [
            "set a timer for {minutes} minutes",
            "start a {minutes} minute timer",
            "timer for {minutes} minutes",
            "count down {minutes} minutes",
            "can you time {minutes} minutes for me",
        ],
        [
            "let me know when {minutes} minutes have passed",
            "begin a countdown of {minutes} minutes",
            "i need {minutes} minutes on the clock",
        ],
    ),
    "reminder": (
        [
            "remind me to {chore} at {time}",
            "don't let me forget to {chore}",
            "set a reminder to {chore}",
            "remind me {day} to {chore}",
            "i need a reminder to {chore}",
        ],
        ["make a note for me to {chore} {day}", "ping me about having to {chore}", "can you nudge me to {chore} later"],
    ),
    "flight": (
        [
            "book a flight to {city}",
            "find me flights to {city} {day}",
            "i want to fly to {city}",
            "get me a plane ticket to {city}",
            "are there flights to {city} {day}",
        ],
        [
            "i'd like to travel to {city} by plane",
            "search air tickets for {city}",
            "what does it cost to fly to {city} {day}",
        ],
    ),
    "weather": (
        [
            "what's the weather in {city}",
            "will it rain {day}",
            "how hot is it in {city} {day}",
            "weather forecast for {day}",
            "do i need an umbrella {day}",
        ],
        ["is it going to be sunny in {city}", "how cold will it get {day}", "what's it like outside in {city}"],
    ),
    "music": (
        [
            "play some {artist}",
            "put on {artist}",
            "i want to listen to {artist}",
            "play music by {artist}",
            "start my {artist} playlist",
        ],
        ["could you throw on a few songs by {artist}", "queue up tracks from {artist}", "let's hear {artist}"],
    ),
    "food_order": (
        [
            "order a {dish} for delivery",
            "i want to order {dish}",
            "get me {dish} delivered",
            "can you order {dish} from the usual place",
            "order dinner: {dish}",
        ],
        ["have a {dish} brought to my door", "i'm hungry, send over a {dish}", "place a delivery order for {dish}"],
    ),
    "shopping_list": (
        [
            "add {item} to my shopping list",
            "put {item} on the list",
            "we need {item}, add it",
            "shopping list: {item}",
            "remember to buy {item}",
        ],
        ["note that we're out of {item}", "include {item} in the groceries", "make sure {item} is on the list"],
    ),
}
SLOTS = {
    "time": ["six am", "7:30", "seven thirty", "noon", "8 pm", "half past six", "5:45"],
    "minutes": ["five", "ten", "15", "twenty", "3", "forty"],
    "chore": ["call mom", "water the plants", "pay the rent", "take my pills", "feed the cat", "send the report"],
    "day": ["today", "tomorrow", "on friday", "this weekend", "next monday", "tonight"],
    "city": ["paris", "tokyo", "new york", "berlin", "lisbon", "seoul", "chicago"],
    "artist": ["the beatles", "miles davis", "taylor swift", "daft punk", "bach", "nirvana"],
    "dish": ["pizza", "pad thai", "sushi", "a burrito", "ramen", "curry"],
    "item": ["milk", "eggs", "bread", "coffee beans", "dish soap", "bananas"],
}


def fill(template: str, rng: random.Random) -> str:
    return template.format(**{slot: rng.choice(values) for slot, values in SLOTS.items()})


def rows(n: int, split: int, rng: random.Random) -> list[dict]:
    intents = sorted(PHRASINGS)
    out = []
    for i in range(n):
        label = intents[i % len(intents)]
        out.append({"text": fill(rng.choice(PHRASINGS[label][split]), rng), "label": label})
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="examples/classify")
    parser.add_argument("--train", type=int, default=1600)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, split in (("train", args.train, 0), ("eval", args.eval, 1)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(n, split, rng)), encoding="utf-8")
        print(f"wrote {path} ({n} rows)")


if __name__ == "__main__":
    main()
