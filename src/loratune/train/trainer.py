"""``train``: a fine-tune as its config says — the processes joined, stop signals handled, the run directory guarded
for the whole run (rank 0), then the recipe (``train.recipe``) with the config's objective and topology."""

from __future__ import annotations

import contextlib

from loratune import signals
from loratune.errors import LoratuneError
from loratune.train import distributed
from loratune.train.objectives import objective_for
from loratune.train.objectives.sft import prepare_data
from loratune.train.recipe import Recipe, TrainingDiverged, TrainingInterrupted
from loratune.train.run_dir import RunDirs, abandon_run_dir, run_directory, run_inputs
from loratune.train.topology import OneProcess, topology_for


def train(config, *, resume: bool = False, overwrite: bool = False, progress: bool | None = None, log=print) -> dict:
    """Run a fine-tune as ``config`` says and return the summary (also written to ``summary.json``).

    ``resume`` continues the run in ``config.output_dir`` from its newest complete checkpoint with the run's
    saved config, changed only where ``config`` differs in what a resumed run may change (more steps or
    epochs, evaluation, logging and saving: ``run_dir.RESUMABLE_CHANGES``). ``overwrite`` replaces an
    existing run that loratune wrote; the new run is built beside it and swapped in when it completes.
    ``progress`` shows a live bar (default: on a terminal).

    Raises ``ConfigError`` for an output directory that cannot be used, a resume that would change anything
    else or finds the run finished, and other user errors; ``OutputInUse`` when another process writes the run;
    ``TrainingDiverged`` when the loss stops being finite (the last checkpoint stays); ``TrainingInterrupted`` on
    Ctrl-C, SIGTERM or SIGHUP, after saving a checkpoint at the last completed step. A run that fails before its
    first step leaves no output directory behind.
    """
    processes = distributed.start()
    topology = topology_for(processes, config)
    dirs = None
    try:
        with signals.stop_on_signals(), contextlib.ExitStack() as guarded:
            dirs = _shared_run_dir(config, resume, overwrite, log, topology, guarded)
            objective = objective_for(config)
            recipe = Recipe(
                config,
                objective,
                topology,
                dirs,
                resume=resume,
                progress=progress,
                log=log if topology.main else _quiet,
            )
            return recipe.run()
    except BaseException as error:
        if (
            topology.main
            and dirs is not None
            and not isinstance(error, TrainingInterrupted)
            and not _first_step_done(dirs)
        ):
            abandon_run_dir(dirs)
        raise
    finally:
        distributed.stop(processes)


def _quiet(*_args, **_kwargs) -> None:
    """The log of processes other than rank 0: the run speaks once."""


def _shared_run_dir(
    config, resume: bool, overwrite: bool, log, topology: OneProcess, guarded: contextlib.ExitStack
) -> RunDirs:
    """Rank 0 guards the run directory (held in ``guarded`` for the run) and decides where it writes; every process
    gets its paths (or rank 0's error, raised everywhere)."""
    prepared = None
    if topology.main:
        try:
            prepared = guarded.enter_context(
                run_directory(
                    config.output_dir,
                    resume=resume,
                    overwrite=overwrite,
                    log=log,
                    inputs=run_inputs(config, resume=resume),
                )
            )
        except LoratuneError as error:
            prepared = error
    prepared = topology.from_main(prepared)
    if isinstance(prepared, LoratuneError):
        raise prepared
    return prepared


def _first_step_done(dirs: RunDirs) -> bool:
    metrics = dirs.work / "metrics.jsonl"
    return (dirs.work / "checkpoints").is_dir() or (metrics.is_file() and metrics.stat().st_size > 0)


__all__ = ["TrainingDiverged", "TrainingInterrupted", "prepare_data", "train"]
