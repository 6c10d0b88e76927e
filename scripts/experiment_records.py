"""The raw record of a sweep's finished runs, kept in the repository so that a table can be checked and a long
sweep continued on another machine.

    python scripts/experiment_records.py keep SWEEP_DIR RECORDS_DIR     # copy each finished run's record
    python scripts/experiment_records.py restore RECORDS_DIR SWEEP_DIR  # a sweep then skips those runs

A run's record is what its numbers come from: ``config.yaml`` (every setting), ``summary.json`` (the results a
sweep's table reads) and ``metrics.jsonl`` (the logged steps), a few kilobytes; adapters and checkpoints stay out.
``restore`` writes each kept run that the sweep directory lacks back as a finished run directory with loratune's
output record listing those files, so ``loratune sweep`` counts it as done (and its ``results.csv`` includes it);
a run already in the sweep directory is left alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from loratune.outputs import Manifest
from loratune.outputs.manifest import file_record

RECORD = ("config.yaml", "summary.json", "metrics.jsonl")


def keep(sweep: Path, records: Path) -> int:
    """Copy the record of every finished run in ``sweep`` into ``records``/RUN; the number of runs kept."""
    count = 0
    for run in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()) if sweep.is_dir() else []:
        target = records / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORD:
            if (run / name).is_file():
                shutil.copyfile(run / name, target / name)
        count += 1
    return count


def restore(records: Path, sweep: Path) -> int:
    """Write every run kept in ``records`` that ``sweep`` lacks as a finished run directory; the number written."""
    kept = sorted(p for p in records.iterdir() if (p / "summary.json").is_file()) if records.is_dir() else []
    missing = [p for p in kept if not (sweep / p.name).exists()]
    if not missing:
        return 0
    sweep.mkdir(parents=True, exist_ok=True)
    outer = Manifest.read(sweep) or Manifest("sweep")
    if outer.kind != "sweep":
        raise SystemExit(f"{sweep} is not a loratune sweep directory")
    for source in missing:
        run = sweep / source.name
        run.mkdir()
        manifest = Manifest("run")
        for name in RECORD:
            if (source / name).is_file():
                shutil.copyfile(source / name, run / name)
                manifest.files[name] = file_record(run / name, appended=name == "metrics.jsonl")
        manifest.write(run)
        outer.outputs.add(source.name)
    outer.write(sweep)
    return len(missing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("keep", "restore"))
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.action == "keep":
        print(f"kept the record of {keep(args.source, args.target)} finished runs in {args.target}", file=sys.stderr)
    else:
        print(f"restored {restore(args.source, args.target)} finished runs into {args.target}", file=sys.stderr)


if __name__ == "__main__":
    main()
