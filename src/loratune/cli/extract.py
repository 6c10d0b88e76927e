"""``loratune extract``: a LoRA adapter from a full fine-tune (truncated SVD of each changed weight)."""

from __future__ import annotations

import json

from loratune.cli.options import positive_int, probability
from loratune.cli.rank_tools import DEFINITIONS, status, weights
from loratune.cli.writes import Writes, inputs_of, model_inputs
from loratune.errors import ConfigError

NAME = "extract"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "a LoRA adapter from a full fine-tune (truncated SVD of each changed weight)",
        "Per changed weight matrix, the truncated SVD of W_tuned − W_base (k = min(R, out, in) with --rank R: "
        "a larger R keeps that module at full rank; or the smallest k ≤ --max-rank with E(k) ≥ E). Changed "
        "tensors that are not matrices (norms, biases) and the modules named with --save-modules go whole "
        "into modules_to_save; tied input/output embeddings are decomposed once and adapted together; "
        "unchanged modules are skipped. Reads one block of rows at a time. PEFT loads the result.\n\n" + DEFINITIONS,
    )
    p.add_argument("--model", "-m", required=True, metavar="BASE", help="the base model (alias, .gguf or HF directory)")
    p.add_argument("--tuned", required=True, metavar="TUNED_DIR", help="the fully fine-tuned model directory")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, metavar="R", help="rank per module")
    size.add_argument("--energy", type=probability, metavar="E", help="share of each update's energy, in (0, 1]")
    p.add_argument(
        "--max-rank",
        type=positive_int,
        default=64,
        metavar="K",
        help="with --energy: the largest rank considered per module (default: 64)",
    )
    p.add_argument(
        "--save-modules",
        nargs="+",
        default=[],
        metavar="NAME",
        help="modules copied whole instead of factorized (exact path or dotted suffix, e.g. lm_head)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the adapter")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing DIR that loratune wrote (see OVERWRITE)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (per-module k and energy kept)")


def writes(args) -> Writes:
    inputs = inputs_of([("the tuned model", args.tuned)], model_inputs(args.model))
    return Writes(args.out, inputs, overwrite=args.overwrite)


def run(args) -> int:
    from loratune.adapters import write_adapter_dir
    from loratune.analysis import extract_adapter
    from loratune.models.base_config import model_name_for
    from loratune.models.loader import hf_name_for, resolve_model_dir
    from loratune.models.structure import model_structure

    base, tuned = weights(args.model), weights(args.tuned)
    structure = model_structure(resolve_model_dir(args.tuned))
    base_structure = model_structure(resolve_model_dir(args.model))
    if structure.model_type != base_structure.model_type:
        raise ConfigError(
            f"the tuned model is a {structure.model_type} and the base a {base_structure.model_type}; "
            "extract needs a fine-tune of this base"
        )
    result = extract_adapter(
        base,
        tuned,
        structure.kinds,
        rank=args.rank,
        energy=args.energy,
        max_rank=args.max_rank,
        save_modules=args.save_modules,
        tied=structure.tied,
        base_model_name=hf_name_for(model_name_for(args.model)),
        progress=None if args.json else status,
    )
    write_adapter_dir(args.out, result.config, result.tensors, overwrite=args.overwrite)
    if args.json:
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "modules": result.modules,
                    "modules_to_save": result.modules_to_save,
                    "unchanged": result.unchanged,
                }
            )
        )
        return 0
    if args.energy is not None:
        short = [m for m in result.modules if m["energy"] < args.energy]
        if short:
            status(
                f"loratune extract: warning: {len(short)} modules keep less than {args.energy:g} of their energy "
                f"at --max-rank {args.max_rank} (lowest {min(m['energy'] for m in short):.3f}); raise --max-rank "
                "to keep more"
            )
    ks = sorted({m["k"] for m in result.modules})
    lowest = min(result.modules, key=lambda m: m["energy"])
    saved = f"; saved whole: {', '.join(result.modules_to_save)}" if result.modules_to_save else ""
    print(
        f"extracted {len(result.modules)} modules from {args.tuned} -> {args.out}: rank "
        f"{ks[0] if len(ks) == 1 else f'{ks[0]}-{ks[-1]}'}, energy kept ≥ {lowest['energy']:.4f} (lowest in "
        f"{lowest['name']}); {result.unchanged} unchanged weights skipped{saved}"
    )
    return 0
