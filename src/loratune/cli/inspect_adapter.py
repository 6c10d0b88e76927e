"""``loratune inspect``: what an adapter is (base, rank, targets, parameters, size)."""

from __future__ import annotations

import json

from loratune.cli.loading import console
from loratune.cli.writes import NOTHING, Writes

NAME = "inspect"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "describe an adapter: base model, rank, targets, parameters, size",
        "Describe a PEFT adapter directory or a kohya .safetensors file (image-model LoRA: its components, "
        "Linear and Conv modules, ranks and alphas, and the training settings in its ss_* metadata).",
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (PEFT format) or kohya .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def writes(args) -> Writes:
    return NOTHING


def run(args) -> int:
    from rich.table import Table

    from loratune.adapters.inspect import KOHYA_FIELDS, PEFT_FIELDS, describe_adapter

    info = describe_adapter(args.adapter)
    if args.json:
        print(json.dumps(info))
        return 0
    table = Table(title=str(args.adapter), show_header=False, title_justify="left")
    for key in PEFT_FIELDS if info["format"] == "peft" else KOHYA_FIELDS:
        value = info.get(key)
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console().print(table)
    return 0
