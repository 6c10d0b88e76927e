"""``loratune sweep``: a grid of training runs and their results table (over ``loratune.experiments``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from loratune.cli.options import positive_int
from loratune.cli.writes import Writes, inputs_of
from loratune.errors import ConfigError

SWEEP_HELP = """\
Runs the Cartesian product of the --grid values (times --seeds), each an ordinary run directory DIR/<run name>,
one after another. Running the same command again continues the sweep: finished runs are skipped, a half-done
run resumes from its newest checkpoint, a run asked for more steps (train.max_steps, train.epochs) is extended.
A run directory trained with other settings (an edited config, another --set, changed data) is never reused:
the sweep refuses, naming what changed, unless --restart-changed. After every run DIR/results.csv (one row per
run), DIR/results.md (per combination of grid values, mean ± std over seeds) and DIR/results.png are rewritten.
Ctrl-C, SIGTERM or SIGHUP stop the running run at a checkpoint; the same command continues.

grid keys are the dotted config keys of --set; values are YAML, separated by commas outside brackets:
  --grid lora.r=1,4,16,64
  --grid 'lora.target_modules=[q_proj],[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]'
  --grid train.method=lora,full
--budget PARAMS sets lora.r per run to the rank whose trainable-parameter count is closest to PARAMS (the LoRA
paper's Table 5 design: the same budget spread over different target sets).
"""


NAME = "sweep"


def add_parser(verb) -> None:
    p = verb(NAME, "train a grid of runs (ranks, target sets, methods, seeds) and tabulate their results", SWEEP_HELP)
    p.add_argument("config", metavar="CONFIG.yaml", help="the base training config every run starts from")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        type=_grid,
        metavar="KEY=V1,V2,...",
        help="a config key and the values to try; repeatable (runs: the product of all grids)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        metavar="N",
        help="run each combination with train.seed = 0..N-1 and report mean ± std (default: 1)",
    )
    p.add_argument(
        "--budget",
        type=positive_int,
        metavar="PARAMS",
        help="choose lora.r per run so the adapter has about PARAMS trainable parameters",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value for every run (as in train); repeatable",
    )
    p.add_argument(
        "--reference",
        metavar="RUN_DIR",
        help="with --grid intrinsic.dim=...: report d90, the smallest dim reaching 90%% of this run's "
        "exact match, or a classifier's accuracy (a LoRA or full run on the same task)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's directory (run directories, results)")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and what state each is in")
    p.add_argument(
        "--restart-changed",
        action="store_true",
        help="train afresh the runs whose directories hold runs trained with other settings (each is "
        "replaced when its new run completes)",
    )


def _grid(text: str):
    from loratune.experiments import parse_grid

    try:
        return parse_grid(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--grid {text!r}: ")) from None


def writes(args) -> Writes:
    from loratune.experiments import plan_runs
    from loratune.train.run_dir import run_inputs

    if args.dry_run:
        return Writes(None)
    if not args.grid and args.seeds == 1:
        raise ConfigError("nothing to sweep: give at least one --grid KEY=V1,V2,... or --seeds N")
    runs = plan_runs(args.config, args.grid, args.out, seeds=args.seeds, overrides=args.overrides)
    inputs = {(what, path) for run in runs for what, path in run_inputs(run.config, args.config)}
    if args.reference:
        inputs.add(("the reference run", Path(args.reference)))
    return Writes(args.out, inputs_of(sorted(inputs, key=str)), existing="continue", what="sweep directory")


def run(args) -> int:
    from loratune.experiments import apply_budget, plan_runs, run_state, run_sweep, write_results
    from loratune.experiments.sweep import refuse_changed
    from loratune.outputs import open_record
    from loratune.train import TrainingInterrupted

    if not args.grid and args.seeds == 1:
        raise ConfigError("nothing to sweep: give at least one --grid KEY=V1,V2,... or --seeds N")
    reference = _reference_summary(args.reference) if args.reference else None
    out = Path(args.out)
    runs = plan_runs(args.config, args.grid, out, seeds=args.seeds, overrides=args.overrides)
    if args.budget:
        runs = apply_budget(runs, args.budget)
    if args.dry_run:
        for planned in runs:
            r = f"  (r={planned.config.lora.r})" if args.budget else ""
            print(f"{run_state(planned):8s} {out / planned.name}{r}")
        print(
            f"{len(runs)} runs; state: new, partial (resumes), extend (more steps), changed (trained with other "
            "settings: refused without --restart-changed) or done (skipped)"
        )
        return 0
    _check_sweep_dir(out)
    if not args.restart_changed:
        refuse_changed(runs)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    again = shlex.join(["loratune", *args.command_line])
    with open_record(out, "sweep"):
        try:
            run_sweep(
                runs,
                progress=say,
                on_result=lambda done: write_results(runs, out),
                restart_changed=args.restart_changed,
            )
        except TrainingInterrupted as stop:
            say(f"loratune sweep: {stop}")
            say(f"loratune sweep: continue with: {again}")
            return stop.exit_status
        except KeyboardInterrupt:
            say(f"loratune sweep: continue with: {again}")
            raise
        if reference is not None:
            settings = list(dict.fromkeys(key for run in runs for key in run.settings))
            _report_d90(write_results(runs, out), reference, args.reference, out, settings)
    print((out / "results.md").read_text(), end="")
    say(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


def _check_sweep_dir(out: Path) -> None:
    """Refuse a ``--out`` that is not a sweep directory loratune wrote (or a new, empty one)."""
    from loratune.outputs import Manifest

    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = Manifest.read(out)
    if manifest is None or manifest.kind != "sweep":
        raise ConfigError(f"{out} exists and is not a loratune sweep directory; choose another --out")
    if manifest.legacy:
        raise ConfigError(
            f"{out} is a sweep directory of an earlier loratune that recorded only names; continue it "
            "with that version, or start this sweep in a new --out"
        )
    strangers = manifest.foreign(out)
    if strangers:
        raise ConfigError(
            f"{out} holds files loratune did not write ({', '.join(strangers[:3])}); choose another --out or move them"
        )


def _reference_summary(run_dir: str) -> dict:
    import json

    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        raise ConfigError(f"--reference {run_dir}: no summary.json (give a finished run directory)")
    from loratune.experiments.results import d90_metric

    data = json.loads(summary.read_text())
    if d90_metric(data) is None:
        raise ConfigError(
            f"--reference {run_dir}: d90 needs the run's eval_exact_match (evaluation data with "
            "references and train.exact_match: true) or a classifier's eval_accuracy"
        )
    return data


def _report_d90(rows: list[dict], reference: dict, reference_dir: str, out: Path, settings: list[str]) -> None:
    from loratune.experiments.results import d90
    from loratune.outputs import write_text_atomic

    dim, value, metric, chosen = d90(rows, reference, settings)
    at = f" (at {', '.join(f'{key}={value}' for key, value in chosen.items())})" if chosen else ""
    found = f"d90 = {dim}{at}" if dim is not None else "d90 > the largest intrinsic.dim tried (none reached 90%)"
    line = f"{found}: 90% of {reference_dir}'s {metric} ({value:.3f}) is {0.9 * value:.3f}"
    write_text_atomic(out / "results.md", (out / "results.md").read_text() + "\n" + line + "\n")
