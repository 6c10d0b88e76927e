"""``loratune compress``: an int8-compressed copy of an adapter."""

from __future__ import annotations

from loratune.cli.writes import Writes, inputs_of

NAME = "compress"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "write an int8-compressed copy of an adapter (about 3-4x smaller than float32)",
        "Store A and B as int8 with one float32 scale per row (symmetric absmax: scale = max|row|/127, "
        "every element within scale/2 of the original) in adapter_model.int8.safetensors. loratune loads "
        "it transparently (every --adapter option), dequantizing to the adapter dtype; PEFT refuses it.",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory for the compressed adapter (its tokenizer files are copied too)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing DIR that loratune wrote (see OVERWRITE)"
    )


def writes(args) -> Writes:
    return Writes(args.out, inputs_of([("the adapter", args.adapter)]), overwrite=args.overwrite)


def run(args) -> int:
    from loratune.adapters import compress_adapter
    from loratune.adapters.inspect import describe_adapter

    before = describe_adapter(args.adapter)["size_bytes"]
    compress_adapter(args.adapter, args.out, overwrite=args.overwrite)
    after = describe_adapter(args.out)["size_bytes"]
    print(
        f"compressed {args.adapter} ({before:,} bytes) -> {args.out} ({after:,} bytes, int8, "
        f"{before / after:.2f}x smaller)"
    )
    return 0
