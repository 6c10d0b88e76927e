"""Experiments on the user's own task: sweeps of ordinary training runs (grids, seeds, a parameter budget) and
their results tables. Read top to bottom: ``grid`` (plan), ``budget`` (rank for a parameter count), ``sweep``
(run, continue), ``results`` (CSV, Markdown, plot)."""

from loratune.experiments.budget import adapter_parameters, rank_for_budget
from loratune.experiments.grid import PlannedRun, parse_grid, plan_runs
from loratune.experiments.results import write_results
from loratune.experiments.sweep import apply_budget, run_state, run_sweep

__all__ = [
    "PlannedRun",
    "adapter_parameters",
    "apply_budget",
    "parse_grid",
    "plan_runs",
    "rank_for_budget",
    "run_state",
    "run_sweep",
    "write_results",
]
