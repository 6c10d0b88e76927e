"""``loratune compare``: how alike two adapters' learned subspaces are (φ per module, LoRA paper §7)."""

from __future__ import annotations

import json

from loratune.cli.rank_tools import DEFINITIONS, label, weights
from loratune.cli.writes import Writes, inputs_of, model_inputs

NAME = "compare"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "how alike two adapters' learned subspaces are (φ per module, LoRA paper §7)",
        "Subspace similarity φ(i, j) of the two adapters' A matrices in every module both adapt; with "
        "--model also the amplification factor ‖ΔW‖_F / ‖Uᵀ·W·V‖_F of each (§7.3; U, V: ΔW's top-r "
        "singular vectors, W the base weight).\n\n" + DEFINITIONS,
    )
    p.add_argument("adapter_a", metavar="ADAPTER_A", help="adapter directory (PEFT format) or kohya .safetensors file")
    p.add_argument("adapter_b", metavar="ADAPTER_B")
    p.add_argument("--model", "-m", metavar="BASE", help="the base model, for the amplification factor")
    p.add_argument("--plot", metavar="FILE.png", help="draw φ(i, j) heat maps (up to six modules) into FILE.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.png that loratune drew")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def writes(args) -> Writes:
    if not args.plot:
        return Writes(None)
    inputs = inputs_of([("adapter A", args.adapter_a), ("adapter B", args.adapter_b)], model_inputs(args.model))
    return Writes(args.plot, inputs, kind="file", overwrite=args.overwrite, what="plot file", record_kind="plot")


def run(args) -> int:
    from loratune.adapters.convert import read_any
    from loratune.analysis import compare_adapters
    from loratune.analysis.plots import plot_similarity
    from loratune.models.loader import resolve_model_dir
    from loratune.models.structure import model_structure

    a, b = ((f.config, f.tensors) for f in (read_any(args.adapter_a), read_any(args.adapter_b)))
    base = kinds = None
    if args.model:
        base, kinds = weights(args.model), model_structure(resolve_model_dir(args.model)).kinds
    report = compare_adapters(a, b, base=base, kinds=kinds)
    if args.plot:
        plot_similarity(report, args.plot, labels=(label(args.adapter_a), label(args.adapter_b)))
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"subspace similarity: {args.adapter_a} vs {args.adapter_b}", title_justify="left")
    columns = ["module", "r_a", "r_b", "φ(1,1)", "φ(m,m)"] + (["amp. a", "amp. b"] if base is not None else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "module" else "right")
    for m in report["modules"]:
        extra = [f"{m['amplification_a']:.3g}", f"{m['amplification_b']:.3g}"] if base is not None else []
        table.add_row(m["name"], str(m["r_a"]), str(m["r_b"]), f"{m['phi_top']:.3f}", f"{m['phi_full']:.3f}", *extra)
    console = Console(highlight=False)
    console.print(table)
    tops = [m["phi_top"] for m in report["modules"]]
    console.print(
        f"mean φ(1,1) {sum(tops) / len(tops):.3f} over {len(tops)} modules (1: both adapters' top direction "
        "is the same; two random directions give about 1/in)"
    )
    for side, names in (
        ("only in " + str(args.adapter_a), report["only_in_a"]),
        ("only in " + str(args.adapter_b), report["only_in_b"]),
    ):
        if names:
            console.print(f"{side}: {len(names)} modules")
    if args.plot:
        console.print(f"heat maps -> {args.plot}")
    return 0
