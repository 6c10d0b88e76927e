"""``loratune sweep``: the command line over ``loratune.experiments``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loratune.cli.options import positive_int
from loratune.errors import ConfigError

SWEEP_HELP = """\
Runs the Cartesian product of the --grid values (times --seeds), each an ordinary run directory DIR/<run name>,
one after another. Running the same command again continues the sweep: finished runs are skipped, a half-done
run resumes from its newest checkpoint. After every run DIR/results.csv (one row per run), DIR/results.md (per
combination of grid values, mean ± std over seeds) and DIR/results.png are rewritten.

grid keys are the dotted config keys of --set; values are YAML, separated by commas outside brackets:
  --grid lora.r=1,4,16,64
  --grid 'lora.target_modules=[q_proj],[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]'
  --grid train.method=lora,full
--budget PARAMS sets lora.r per run to the rank whose trainable-parameter count is closest to PARAMS (the LoRA
paper's Table 5 design: the same budget spread over different target sets).
"""


def add_sweep_verb(verb) -> None:
    """Add ``sweep`` to the parser through ``verb(name, help, description)``."""
    p = verb("sweep", "train a grid of runs (ranks, target sets, methods, seeds) and tabulate their results",
             SWEEP_HELP)
    p.add_argument("config", metavar="CONFIG.yaml", help="the base training config every run starts from")
    p.add_argument("--grid", action="append", default=[], type=_grid, metavar="KEY=V1,V2,...",
                   help="a config key and the values to try; repeatable (runs: the product of all grids)")
    p.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                   help="run each combination with train.seed = 0..N-1 and report mean ± std (default: 1)")
    p.add_argument("--budget", type=positive_int, metavar="PARAMS",
                   help="choose lora.r per run so the adapter has about PARAMS trainable parameters")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every run (as in train); repeatable")
    p.add_argument("--reference", metavar="RUN_DIR",
                   help="with --grid intrinsic.dim=...: report d90, the smallest dim reaching 90%% of this run's "
                        "exact match (a LoRA or full run on the same task)")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's directory (run directories, results)")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and what state each is in")


def _grid(text: str):
    from loratune.experiments import parse_grid

    try:
        return parse_grid(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--grid {text!r}: ")) from None


def run_sweep(args) -> int:
    from loratune.experiments import apply_budget, plan_runs, run_state, run_sweep, write_results
    from loratune.experiments.results import FILES
    from loratune.files import check_location, foreign_entries, read_manifest, write_manifest

    if not args.grid and args.seeds == 1:
        raise ConfigError("nothing to sweep: give at least one --grid KEY=V1,V2,... or --seeds N")
    reference = _reference_summary(args.reference) if args.reference else None
    out = Path(args.out)
    runs = plan_runs(args.config, args.grid, out, seeds=args.seeds, overrides=args.overrides)
    if args.budget:
        runs = apply_budget(runs, args.budget)
    if args.dry_run:
        for run in runs:
            r = f"  (r={run.config.lora.r})" if args.budget else ""
            print(f"{run_state(run):8s} {out / run.name}{r}")
        print(f"{len(runs)} runs; state: new, partial (resumes) or done (skipped)")
        return 0
    check_location(out, "sweep directory")
    manifest = read_manifest(out) if out.is_dir() else None
    if out.is_dir() and any(out.iterdir()):
        if manifest is None or manifest.get("kind") != "sweep":
            raise ConfigError(f"{out} exists and is not a loratune sweep directory; choose another --out")
        strangers = foreign_entries(out)
        if strangers:
            raise ConfigError(f"{out} holds files loratune did not write ({', '.join(strangers[:3])}); "
                              "choose another --out or move them")
    out.mkdir(parents=True, exist_ok=True)
    earlier = manifest["entries"] if manifest else []
    write_manifest(out, "sweep", [*earlier, *FILES, *(run.name for run in runs)])

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    run_sweep(runs, progress=say, on_result=lambda run: write_results(runs, out))
    if reference is not None:
        _report_d90(write_results(runs, out), reference, args.reference, out)
    print((out / "results.md").read_text(), end="")
    say(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def _reference_summary(run_dir: str) -> dict:
    import json

    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        raise ConfigError(f"--reference {run_dir}: no summary.json (give a finished run directory)")
    data = json.loads(summary.read_text())
    if (data.get("eval") or {}).get("eval_exact_match") is None:
        raise ConfigError(f"--reference {run_dir}: d90 needs the run's eval_exact_match (evaluation data with "
                          "references and train.exact_match: true)")
    return data


def _report_d90(rows: list[dict], reference: dict, reference_dir: str, out: Path) -> None:
    from loratune.experiments.results import d90
    from loratune.files import write_text_atomic

    dim, value, metric = d90(rows, reference)
    found = f"d90 = {dim}" if dim is not None else "d90 > the largest intrinsic.dim tried (none reached 90%)"
    line = f"{found}: 90% of {reference_dir}'s {metric} ({value:.3f}) is {0.9 * value:.3f}"
    write_text_atomic(out / "results.md", (out / "results.md").read_text() + "\n" + line + "\n")
