"""The rank tools: ``rank``, ``resize``, ``extract`` and ``compare`` (parsers and handlers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loratune.cli.options import add_adapter_output, energy_list, positive_int, probability
from loratune.errors import ConfigError

DEFINITIONS = """\
definitions:
  update     ΔW = s·B·A for an adapter module (s = alpha/r, or alpha/√r with rsLoRA, after rank_pattern and
             alpha_pattern); W_tuned − W_base for a full fine-tune. σ₁ ≥ σ₂ ≥ … are its singular values.
  energy     E(k) = Σ_{i≤k} σᵢ² / Σ_i σᵢ²: the share of ‖ΔW‖_F² its best rank-k approximation keeps.
  rank_at    for a threshold t, the smallest k with E(k) ≥ t; recommended_rank[t]: the largest over modules.
  φ(i, j)    subspace similarity (LoRA paper §7): ‖U₁[:, :i]ᵀ·U₂[:, :j]‖_F² / min(i, j), U the right-singular
             vectors of each adapter's A (input space); 1 = the smaller subspace lies in the other, 0 = orthogonal.
"""


def add_rank_verbs(verb) -> None:
    """Add the four verbs to the parser through ``verb(name, help, description)``."""
    p = verb("rank", "how much rank each update needs: singular values and energy per module",
             "Singular values σ and energy E(k) of each adapted module's update s·B·A (from the factors: QR of "
             "each, SVD of an r × r core), or with --model/--tuned of each weight a full fine-tune changed "
             "(W_tuned − W_base, read a block of rows at a time; the top --max-rank σ by an exact or randomized "
             "SVD, E relative to the exact ‖ΔW‖_F²).\n\n" + DEFINITIONS)
    p.add_argument("adapter", nargs="?", metavar="ADAPTER", help="adapter directory (PEFT format) or kohya .safetensors file")
    p.add_argument("--model", "-m", metavar="BASE", help="with --tuned: the base model (alias, .gguf or HF directory)")
    p.add_argument("--tuned", metavar="TUNED_DIR", help="a fully fine-tuned model directory (safetensors) of BASE")
    p.add_argument("--max-rank", type=positive_int, default=64, metavar="K",
                   help="with --tuned: how many singular values per weight (default: 64)")
    p.add_argument("--energy", type=energy_list, default=[0.5, 0.9, 0.99], metavar="T,T,...",
                   help="thresholds for rank_at, each in (0, 1] (default: 0.5,0.9,0.99)")
    p.add_argument("--plot", metavar="FILE.png", help="draw E(k) per module type into FILE.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.png that loratune drew")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (nothing else goes there)")

    p = verb("resize", "replace each module's update by its best rank-k approximation (a smaller adapter)",
             "Truncate each module's update s·B·A to rank k = min(R, r) (--rank R) or to the smallest k with "
             "E(k) ≥ E (--energy E): the truncated SVD, the optimal rank-k approximation (Eckart–Young). Writes "
             "an ordinary adapter (scaling 1 per module: PEFT with rank_pattern/alpha_pattern where ranks differ, kohya "
             "with alpha = k) in the format it read, unless --format says otherwise; for kohya files this is what "
             "kohya's resize_lora.py does, with the exact optimum.\n\n"
             + DEFINITIONS)
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (PEFT format) or kohya .safetensors file")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, metavar="R", help="the rank to keep (at most each module's r)")
    size.add_argument("--energy", type=probability, metavar="E", help="the share of each update's energy to keep, in (0, 1]")
    add_adapter_output(p, "the input's")
    p.add_argument("--json", action="store_true", help="print one JSON object (per-module k and energy kept)")

    p = verb("extract", "a LoRA adapter from a full fine-tune (truncated SVD of each changed weight)",
             "Per changed weight matrix, the truncated SVD of W_tuned − W_base (k = min(R, out, in) with --rank R: "
             "a larger R keeps that module at full rank; or the smallest k ≤ --max-rank with E(k) ≥ E). Changed "
             "tensors that are not matrices (norms, biases) and the modules named with --save-modules go whole "
             "into modules_to_save; tied input/output embeddings are decomposed once and adapted together; "
             "unchanged modules are skipped. Reads one block of rows at a time. PEFT loads the result.\n\n"
             + DEFINITIONS)
    p.add_argument("--model", "-m", required=True, metavar="BASE", help="the base model (alias, .gguf or HF directory)")
    p.add_argument("--tuned", required=True, metavar="TUNED_DIR", help="the fully fine-tuned model directory")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=positive_int, metavar="R", help="rank per module")
    size.add_argument("--energy", type=probability, metavar="E", help="share of each update's energy, in (0, 1]")
    p.add_argument("--max-rank", type=positive_int, default=64, metavar="K",
                   help="with --energy: the largest rank considered per module (default: 64)")
    p.add_argument("--save-modules", nargs="+", default=[], metavar="NAME",
                   help="modules copied whole instead of factorized (exact path or dotted suffix, e.g. lm_head)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR that loratune wrote (see OVERWRITE)")
    p.add_argument("--json", action="store_true", help="print one JSON object (per-module k and energy kept)")

    p = verb("compare", "how alike two adapters' learned subspaces are (φ per module, LoRA paper §7)",
             "Subspace similarity φ(i, j) of the two adapters' A matrices in every module both adapt; with "
             "--model also the amplification factor ‖ΔW‖_F / ‖Uᵀ·W·V‖_F of each (§7.3; U, V: ΔW's top-r "
             "singular vectors, W the base weight).\n\n" + DEFINITIONS)
    p.add_argument("adapter_a", metavar="ADAPTER_A", help="adapter directory (PEFT format) or kohya .safetensors file")
    p.add_argument("adapter_b", metavar="ADAPTER_B")
    p.add_argument("--model", "-m", metavar="BASE", help="the base model, for the amplification factor")
    p.add_argument("--plot", metavar="FILE.png", help="draw φ(i, j) heat maps (up to six modules) into FILE.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.png that loratune drew")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _label(path: str) -> str:
    """A short name for an adapter in a figure: its directory, or the run's for ``runs/NAME/adapter``."""
    p = Path(path).resolve()
    return p.parent.name if p.name in ("adapter", "best") else p.name


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_plot(args) -> None:
    from loratune.analysis.plots import is_our_plot
    from loratune.files import check_output_file

    if args.plot:
        check_output_file(args.plot, overwrite=args.overwrite, ours=is_our_plot, what="plot file")


def _weights(name: str):
    """The safetensors weights of a model (alias, .gguf or directory), read tensor by tensor."""
    from loratune.analysis import WeightReader
    from loratune.models.loader import resolve_model_dir

    return WeightReader(resolve_model_dir(name))


def run_rank(args) -> int:
    from loratune.adapters.convert import read_any
    from loratune.analysis import adapter_spectrum, full_finetune_spectrum
    from loratune.analysis.plots import plot_energy

    if args.tuned is None and args.adapter is None:
        raise ConfigError("give an ADAPTER_DIR, or --model BASE --tuned TUNED_DIR for a full fine-tune")
    if args.tuned is not None and args.adapter is not None:
        raise ConfigError("give either ADAPTER_DIR or --tuned TUNED_DIR, not both")
    if args.tuned is not None and args.model is None:
        raise ConfigError("rank --tuned needs --model BASE, the model the fine-tune started from")
    _check_plot(args)
    if args.tuned is not None:
        base, tuned = _weights(args.model), _weights(args.tuned)
        report = full_finetune_spectrum(base, tuned, args.energy, args.max_rank,
                                        progress=None if args.json else _status)
        source = args.tuned
    else:
        adapter = read_any(args.adapter)
        report = adapter_spectrum(adapter.config, adapter.tensors, args.energy)
        source = args.adapter
    if args.plot:
        plot_energy(report, args.plot, title=f"energy kept by rank k: {_label(source)}")
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
    for m in report["modules"]:
        sv = m["singular_values"]
        table.add_row(m["name"], "×".join(map(str, m["shape"])), "-" if m["r"] is None else str(m["r"]),
                      f"{sv[0]:.3g}" if sv else "-",
                      *("-" if m["rank_at"][t] is None else str(m["rank_at"][t]) for t in thresholds))
    console = Console(highlight=False)
    console.print(table)
    rec = ", ".join(f"{float(t):.0%} energy → rank {'> ' + str(len(report['modules'][0]['singular_values'])) if k is None else k}"
                    for t, k in report["recommended_rank"].items())
    console.print(f"recommended rank (the largest over modules): {rec}")
    if report.get("other_changed"):
        console.print(f"also changed (not matrices): {len(report['other_changed'])} tensors, e.g. "
                      f"{', '.join(report['other_changed'][:3])}")


def run_resize(args) -> int:
    from loratune.adapters.convert import output_format, read_any, write_any
    from loratune.analysis import resize_adapter
    from loratune.files import check_output_dir

    adapter = read_any(args.adapter)
    fmt = output_format([adapter], args.format, args.out)
    if fmt == "peft":
        check_output_dir(args.out, overwrite=args.overwrite)
    result = resize_adapter(adapter.config, adapter.tensors, rank=args.rank, energy=args.energy)
    write_any(args.out, result.config, result.tensors, fmt, metadata=adapter.metadata, overwrite=args.overwrite,
              copy_from=args.adapter)
    if args.json:
        print(json.dumps({"out": str(args.out), "modules": result.modules}))
        return 0
    ks = sorted({m["k"] for m in result.modules})
    lowest = min(result.modules, key=lambda m: m["energy"])
    print(f"resized {args.adapter} -> {args.out}: {len(result.modules)} modules, rank "
          f"{ks[0] if len(ks) == 1 else f'{ks[0]}-{ks[-1]}'}; energy kept ≥ {lowest['energy']:.4f} "
          f"(lowest in {lowest['name']})")
    return 0


def run_extract(args) -> int:
    from loratune.adapters import write_adapter_dir
    from loratune.analysis import extract_adapter
    from loratune.files import check_output_dir
    from loratune.models.base_config import model_name_for
    from loratune.models.loader import hf_name_for, resolve_model_dir
    from loratune.models.structure import model_structure

    check_output_dir(args.out, overwrite=args.overwrite)
    base, tuned = _weights(args.model), _weights(args.tuned)
    structure = model_structure(resolve_model_dir(args.tuned))
    base_structure = model_structure(resolve_model_dir(args.model))
    if structure.model_type != base_structure.model_type:
        raise ConfigError(f"the tuned model is a {structure.model_type} and the base a {base_structure.model_type}; "
                          "extract needs a fine-tune of this base")
    result = extract_adapter(base, tuned, structure.kinds, rank=args.rank, energy=args.energy,
                             max_rank=args.max_rank, save_modules=args.save_modules, tied=structure.tied,
                             base_model_name=hf_name_for(model_name_for(args.model)),
                             progress=None if args.json else _status)
    write_adapter_dir(args.out, result.config, result.tensors, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"out": str(args.out), "modules": result.modules,
                          "modules_to_save": result.modules_to_save, "unchanged": result.unchanged}))
        return 0
    if args.energy is not None:
        short = [m for m in result.modules if m["energy"] < args.energy]
        if short:
            _status(f"loratune extract: warning: {len(short)} modules keep less than {args.energy:g} of their energy "
                    f"at --max-rank {args.max_rank} (lowest {min(m['energy'] for m in short):.3f}); raise --max-rank "
                    "to keep more")
    ks = sorted({m["k"] for m in result.modules})
    lowest = min(result.modules, key=lambda m: m["energy"])
    saved = f"; saved whole: {', '.join(result.modules_to_save)}" if result.modules_to_save else ""
    print(f"extracted {len(result.modules)} modules from {args.tuned} -> {args.out}: rank "
          f"{ks[0] if len(ks) == 1 else f'{ks[0]}-{ks[-1]}'}, energy kept ≥ {lowest['energy']:.4f} (lowest in "
          f"{lowest['name']}); {result.unchanged} unchanged weights skipped{saved}")
    return 0


def run_compare(args) -> int:
    from loratune.adapters.convert import read_any
    from loratune.analysis import compare_adapters
    from loratune.analysis.plots import plot_similarity
    from loratune.models.loader import resolve_model_dir
    from loratune.models.structure import model_structure

    _check_plot(args)
    a, b = ((f.config, f.tensors) for f in (read_any(args.adapter_a), read_any(args.adapter_b)))
    base = kinds = None
    if args.model:
        base, kinds = _weights(args.model), model_structure(resolve_model_dir(args.model)).kinds
    report = compare_adapters(a, b, base=base, kinds=kinds)
    if args.plot:
        plot_similarity(report, args.plot, labels=(_label(args.adapter_a), _label(args.adapter_b)))
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
    console.print(f"mean φ(1,1) {sum(tops) / len(tops):.3f} over {len(tops)} modules (1: both adapters' top direction "
                  "is the same; two random directions give about 1/in)")
    for side, names in (("only in " + str(args.adapter_a), report["only_in_a"]),
                        ("only in " + str(args.adapter_b), report["only_in_b"])):
        if names:
            console.print(f"{side}: {len(names)} modules")
    if args.plot:
        console.print(f"heat maps -> {args.plot}")
    return 0
