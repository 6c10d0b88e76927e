"""``loratune rank``: how much rank each update needs — singular values and energy per module."""

from __future__ import annotations

import json

from loratune.cli.options import energy_list, positive_int
from loratune.cli.rank_tools import DEFINITIONS, label, status, weights
from loratune.cli.writes import Writes, inputs_of, model_inputs
from loratune.errors import ConfigError

NAME = "rank"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "how much rank each update needs: singular values and energy per module",
        "Singular values σ and energy E(k) of each adapted module's update s·B·A (from the factors: QR of "
        "each, SVD of an r × r core), or with --model/--tuned of each weight a full fine-tune changed "
        "(W_tuned − W_base, read a block of rows at a time; the top --max-rank σ by an exact or randomized "
        "SVD, E relative to the exact ‖ΔW‖_F²).\n\n" + DEFINITIONS,
    )
    p.add_argument(
        "adapter", nargs="?", metavar="ADAPTER", help="adapter directory (PEFT format) or kohya .safetensors file"
    )
    p.add_argument("--model", "-m", metavar="BASE", help="with --tuned: the base model (alias, .gguf or HF directory)")
    p.add_argument("--tuned", metavar="TUNED_DIR", help="a fully fine-tuned model directory (safetensors) of BASE")
    p.add_argument(
        "--max-rank",
        type=positive_int,
        default=64,
        metavar="K",
        help="with --tuned: how many singular values per weight (default: 64)",
    )
    p.add_argument(
        "--energy",
        type=energy_list,
        default=[0.5, 0.9, 0.99],
        metavar="T,T,...",
        help="thresholds for rank_at, each in (0, 1] (default: 0.5,0.9,0.99)",
    )
    p.add_argument("--plot", metavar="FILE.png", help="draw E(k) per module type into FILE.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.png that loratune drew")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else goes there)")


def writes(args) -> Writes:
    if not args.plot:
        return Writes(None)
    inputs = inputs_of([("the adapter", args.adapter), ("the tuned model", args.tuned)], model_inputs(args.model))
    return Writes(args.plot, inputs, kind="file", overwrite=args.overwrite, what="plot file", record_kind="plot")


def run(args) -> int:
    from loratune.adapters.convert import read_any
    from loratune.analysis import adapter_spectrum, full_finetune_spectrum
    from loratune.analysis.plots import plot_energy

    if args.tuned is None and args.adapter is None:
        raise ConfigError("give an ADAPTER_DIR, or --model BASE --tuned TUNED_DIR for a full fine-tune")
    if args.tuned is not None and args.adapter is not None:
        raise ConfigError("give either ADAPTER_DIR or --tuned TUNED_DIR, not both")
    if args.tuned is not None and args.model is None:
        raise ConfigError("rank --tuned needs --model BASE, the model the fine-tune started from")
    if args.tuned is not None:
        base, tuned = weights(args.model), weights(args.tuned)
        report = full_finetune_spectrum(base, tuned, args.energy, args.max_rank, progress=None if args.json else status)
        source = args.tuned
    else:
        adapter = read_any(args.adapter)
        report = adapter_spectrum(adapter.config, adapter.tensors, args.energy)
        source = args.adapter
    if args.plot:
        plot_energy(report, args.plot, title=f"energy kept by rank k: {label(source)}")
    if args.json:
        print(json.dumps(report))
        return 0
    _print_rank_table(report, source)
    if args.plot:
        print(f"energy curves -> {args.plot}")
    return 0


def _print_rank_table(report: dict, source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    thresholds = list(report["recommended_rank"])
    table = Table(title=f"{source}: rank needed per module", title_justify="left")
    for column in ("module", "shape", "r", "σ₁", *(f"k @ {t}" for t in thresholds)):
        table.add_column(column, justify="left" if column == "module" else "right")
    for m in _stacks_as_rows(report["modules"]):
        sv = m["singular_values"]
        table.add_row(
            m["name"],
            "×".join(map(str, m["shape"])),
            "-" if m["r"] is None else str(m["r"]),
            f"{sv[0]:.3g}" if sv else "-",
            *("-" if m["rank_at"][t] is None else str(m["rank_at"][t]) for t in thresholds),
        )
    console = Console(highlight=False)
    console.print(table)
    rec = ", ".join(
        f"{float(t):.0%} energy → rank {'> ' + str(len(report['modules'][0]['singular_values'])) if k is None else k}"
        for t, k in report["recommended_rank"].items()
    )
    console.print(f"recommended rank (the largest over modules): {rec}")
    if report.get("other_changed"):
        console.print(
            f"also changed (not matrices): {len(report['other_changed'])} tensors, e.g. "
            f"{', '.join(report['other_changed'][:3])}"
        )


def _stacks_as_rows(modules: list[dict]) -> list[dict]:
    """``modules`` with each expert stack's experts (``path[e]``) folded into one row: ``path[0..E-1]``, the
    largest σ₁, and each ``rank_at`` as the range over its experts (``--json`` keeps every expert)."""
    rows, stacks = [], {}
    for m in modules:
        path, bracket, _ = m["name"].rpartition("[")
        if not (bracket and m["name"].endswith("]")):
            rows.append(m)
            continue
        if path not in stacks:
            stacks[path] = []
            rows.append(stacks[path])  # placeholder, filled below in report order
        stacks[path].append(m)
    folded = []
    for row in rows:
        if isinstance(row, dict):
            folded.append(row)
            continue
        first = row[0]
        path = first["name"].rpartition("[")[0]

        def spread(values):
            known = [v for v in values if v is not None]
            if not known:
                return None
            low, high = min(known), max(known)
            return str(low) if low == high else f"{low}–{high}"

        folded.append(
            {
                "name": f"{path}[0..{len(row) - 1}]",
                "shape": first["shape"],
                "r": first["r"],
                "singular_values": [max(m["singular_values"][0] if m["singular_values"] else 0 for m in row)],
                "rank_at": {t: spread([m["rank_at"][t] for m in row]) for t in first["rank_at"]},
            }
        )
    return folded
