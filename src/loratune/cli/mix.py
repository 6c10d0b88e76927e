"""``loratune mix``: adapters of one base combined into one (weighted sum, SVD, linear, TIES, DARE, ...)."""

from __future__ import annotations

from loratune.cli.options import adapter_spec, add_adapter_output, density, mix_rank, seed
from loratune.cli.writes import Writes, adapter_inputs, inputs_of

NAME = "mix"


def add_parser(verb) -> None:
    from loratune.adapters.mix import METHOD_DEFINITIONS, METHODS

    p = verb(
        NAME,
        "combine adapters of one base into one adapter (weighted sum, SVD, linear, TIES, DARE)",
        "Combine adapters trained on the same base model into one PEFT adapter (no model is loaded). "
        "Each input is ADAPTER:WEIGHT (weight 1 when omitted; negative weights subtract), a PEFT directory or "
        "a kohya .safetensors file; the result has the inputs' format unless --format says otherwise.\n\n"
        + METHOD_DEFINITIONS,
    )
    p.add_argument(
        "adapters",
        nargs="*",
        type=adapter_spec,
        metavar="ADAPTER:WEIGHT",
        help="an adapter (directory or kohya file) and its weight; one adapter with a weight rescales it",
    )
    p.add_argument("--method", required=True, metavar="NAME", help=f"one of: {', '.join(METHODS)}")
    p.add_argument(
        "--rank",
        type=mix_rank,
        default=None,
        metavar="R",
        help="rank of the result for svd (default: largest input rank) and for ties, dare_linear, "
        "dare_ties, magnitude_prune (default: the sum of the input ranks; 'full': the numerical "
        "rank, i.e. exact, which can be hundreds of MB)",
    )
    p.add_argument(
        "--density",
        type=density,
        default=None,
        metavar="D",
        help="fraction of entries kept, in (0, 1]; required by ties, dare_linear, dare_ties, magnitude_prune",
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of DARE's random drops (default: 0)")
    p.add_argument(
        "--majority-sign",
        default="total",
        choices=("total", "frequency"),
        help="TIES sign election: sign of the summed values (total, default) or of the summed signs",
    )
    p.add_argument("--int8", action="store_true", help="write the result int8-compressed (see: loratune compress)")
    add_adapter_output(p, "kohya when every input is a kohya file, else peft")


def writes(args) -> Writes:
    return adapter_output(args, adapter_inputs(args.adapters))


def adapter_output(args, inputs) -> Writes:
    """The guard of a verb writing an adapter to ``--out`` in either format: a kohya ``.safetensors`` file, else a
    PEFT directory."""
    kohya = str(args.out).endswith(".safetensors") and args.format != "peft"
    return Writes(
        args.out,
        inputs_of(inputs),
        kind="file" if kohya else "directory",
        overwrite=args.overwrite,
        record_kind="kohya-lora",
    )


def run(args) -> int:
    from loratune.adapters.mix import mix_adapter_dirs

    result = mix_adapter_dirs(
        args.adapters,
        args.out,
        args.method,
        rank=args.rank,
        density=args.density,
        seed=args.seed,
        majority_sign=args.majority_sign,
        compress="int8" if args.int8 else None,
        overwrite=args.overwrite,
        format=args.format,
    )
    ranks = sorted(set(result.ranks.values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    inputs = ", ".join(f"{path}:{weight:g}" for path, weight in args.adapters)
    print(f"mixed {inputs} with {args.method} -> {args.out} ({len(result.ranks)} modules, rank {rank_text})")
    if result.energy_total is not None:
        lowest = min(result.energy, key=result.energy.get)
        print(
            f"energy kept: {100 * result.energy_total:.4f}% overall, lowest {100 * result.energy[lowest]:.4f}% "
            f"in {lowest}"
        )
    return 0
