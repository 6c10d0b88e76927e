"""``loratune resize``: each module's update replaced by its best rank-k approximation (a smaller adapter)."""

from __future__ import annotations

import json

from loratune.cli.mix import adapter_output
from loratune.cli.options import add_adapter_output, positive_int, probability
from loratune.cli.rank_tools import DEFINITIONS
from loratune.cli.writes import Writes

NAME = "resize"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "replace each module's update by its best rank-k approximation (a smaller adapter)",
        "Truncate each module's update s·B·A to rank k = min(R, r) (--rank R) or to the smallest k with "
        "E(k) ≥ E (--energy E): the truncated SVD, the optimal rank-k approximation (Eckart–Young). Writes "
        "an ordinary adapter (scaling 1 per module: PEFT with rank_pattern/alpha_pattern where ranks differ, kohya "
        "with alpha = k) in the format it read, unless --format says otherwise; for kohya files this is what "
        "kohya's resize_lora.py does, with the exact optimum.\n\n" + DEFINITIONS,
    )
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (PEFT format) or kohya .safetensors file")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, metavar="R", help="the rank to keep (at most each module's r)")
    size.add_argument(
        "--energy", type=probability, metavar="E", help="the share of each update's energy to keep, in (0, 1]"
    )
    add_adapter_output(p, "the input's")
    p.add_argument("--json", action="store_true", help="print one JSON object (per-module k and energy kept)")


def writes(args) -> Writes:
    return adapter_output(args, [("the adapter", args.adapter)])


def run(args) -> int:
    from loratune.adapters.convert import output_format, read_any, write_any
    from loratune.analysis import resize_adapter

    adapter = read_any(args.adapter)
    fmt = output_format([adapter], args.format, args.out)
    result = resize_adapter(adapter.config, adapter.tensors, rank=args.rank, energy=args.energy)
    write_any(
        args.out,
        result.config,
        result.tensors,
        fmt,
        metadata=adapter.metadata,
        overwrite=args.overwrite,
        copy_from=args.adapter,
    )
    if args.json:
        print(json.dumps({"out": str(args.out), "modules": result.modules}))
        return 0
    ks = sorted({m["k"] for m in result.modules})
    lowest = min(result.modules, key=lambda m: m["energy"])
    print(
        f"resized {args.adapter} -> {args.out}: {len(result.modules)} modules, rank "
        f"{ks[0] if len(ks) == 1 else f'{ks[0]}-{ks[-1]}'}; energy kept ≥ {lowest['energy']:.4f} "
        f"(lowest in {lowest['name']})"
    )
    return 0
