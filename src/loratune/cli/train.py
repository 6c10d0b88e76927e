"""``loratune train CONFIG.yaml``: fine-tune as a config says (one process, or ``--nproc N`` through torchrun)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from loratune.cli.loading import console
from loratune.cli.options import positive_int
from loratune.cli.writes import Writes, inputs_of

NAME = "train"
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc", "pearson", "spearman")


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "fine-tune an adapter as a YAML config says",
        "Fine-tune a LoRA adapter (train.method: lora) or every weight (train.method: full, the baseline). "
        "Writes OUTPUT_DIR/adapter (PEFT format + tokenizer; OUTPUT_DIR/model for a full fine-tune), "
        "checkpoints/, metrics.jsonl, config.yaml, loss.png and summary.json. Ctrl-C, SIGTERM and SIGHUP save a "
        "checkpoint of the last completed step and print the command that resumes it.",
    )
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted key, YAML value (e.g. --set train.lr=1e-4); repeatable",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run in output_dir (only a directory loratune wrote: see OVERWRITE "
        "below); the old run stays whole until the new one completes",
    )
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a live progress bar")
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        metavar="N",
        help="train as N processes on this machine (torchrun; DDP, or FSDP2 with --set "
        "train.distributed=fsdp; each gets its share of the CPU threads or one GPU); the effective "
        "batch is batch_size × grad_accum × N",
    )


def _launching(args) -> bool:
    return args.nproc > 1 and "WORLD_SIZE" not in os.environ


def writes(args) -> Writes:
    from loratune.train import load_config
    from loratune.train.distributed import check_nproc
    from loratune.train.run_dir import replacement_dir, run_inputs

    config = load_config(args.config, args.overrides)
    if _launching(args):
        check_nproc(args.nproc)
    # a launcher's rank-0 worker takes the lock; the other workers only read
    lock = not _launching(args) and os.environ.get("RANK", "0") == "0"
    return Writes(
        config.output_dir,
        inputs_of(run_inputs(config, args.config, resume=args.resume)),
        existing="continue",
        what="output directory",
        lock=lock,
        covers=(replacement_dir(Path(config.output_dir)),),
    )


def run(args) -> int:
    from loratune.train import TrainingInterrupted, load_config, train

    config = load_config(args.config, args.overrides)
    if _launching(args):
        from loratune.train.distributed import launch

        sets = [part for override in args.overrides for part in ("--set", override)]
        flags = [
            flag
            for flag, on in (
                ("--resume", args.resume),
                ("--overwrite", args.overwrite),
                ("--no-progress", args.no_progress),
                ("--debug", args.debug),
            )
            if on
        ]
        return launch(["train", str(args.config), *sets, *flags], args.nproc)
    out = console()
    try:
        summary = train(
            config,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            log=lambda line: out.print(line, markup=False, soft_wrap=True),
        )
    except TrainingInterrupted as stop:
        print(f"loratune train: {stop}", file=sys.stderr)
        if stop.checkpoint is not None:
            sets = [part for override in args.overrides for part in ("--set", override)]
            command = shlex.join(["loratune", "train", str(args.config), *sets, "--resume"])
            print(f"loratune train: continue with: {command}", file=sys.stderr)
        return stop.exit_status
    if summary:  # (rank 0's; the other processes of a distributed run print nothing)
        print_summary(out, summary)
    return 0


def print_summary(out, summary: dict) -> None:
    """The table a finished run prints."""
    from rich.table import Table

    table = Table(title="training finished", show_header=False, title_justify="left")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("train time", f"{summary['train_seconds']:.1f} s")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:,.0f}" if summary["tokens_per_s"] else "-")
    table.add_row("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "-")
    if summary["eval"]:
        ev = summary["eval"]
        em = ev.get("eval_exact_match")
        if "eval_perplexity" in ev:
            table.add_row("eval loss / ppl", f"{ev['eval_loss']:.4f} / {ev['eval_perplexity']:.2f}")
        else:
            table.add_row("eval loss", f"{ev['eval_loss']:.4f}")
        if em is not None:
            table.add_row("eval exact match", f"{100 * em:.1f}%")
        for name in CLASSIFICATION_METRICS:
            if ev.get(f"eval_{name}") is not None:
                table.add_row(f"eval {name}", f"{ev[f'eval_{name}']:.4f}")
    if summary["best_metric"] and summary["best"] is not None:
        table.add_row(f"best {summary['best_metric']}", f"{summary['best']:.4f} (step {summary['best_step']})")
    table.add_row("trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,}")
    peaks = summary.get("peak_memory_mb_per_process")
    each = f" (per process: {', '.join(f'{peak:,.0f}' for peak in peaks)} MiB)" if peaks else ""
    table.add_row("peak memory", f"{summary['peak_memory_mb']:,.0f} MiB{each}")
    if summary["adapter_bytes"]:
        table.add_row("adapter", f"{summary['adapter_bytes'] / 2**20:.2f} MiB in {summary['output_dir']}/adapter")
    if summary["model_bytes"]:
        table.add_row("model", f"{summary['model_bytes'] / 2**20:.1f} MiB in {summary['output_dir']}/model")
    out.print(table)
