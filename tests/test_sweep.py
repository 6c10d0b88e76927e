"""``loratune sweep``: grids × seeds as ordinary runs, the results table with every column, a parameter budget
(the LoRA paper's Table 5 design), continuing after a kill, and one-line errors before anything runs."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratune.experiments import adapter_parameters, parse_grid
from loratune.experiments.results import COLUMNS
from loratune.outputs import Manifest
from run_helpers import addition_rows, config_dict, write_config, write_jsonl
from test_cli import assert_one_line_error, cli

TARGETS = "lora.target_modules=[q_proj],[q_proj,v_proj]"


@pytest.fixture
def base_config(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", addition_rows(4, start=20))
    return write_config(
        tmp_path / "base.yaml",
        config_dict(
            tiny_llama_dir,
            data,
            tmp_path / "unused",
            data={"eval": str(evaluation)},
            train={"max_steps": 2, "save_every": 1, "exact_match": True},
        ),
    )


def rows(out):
    with (out / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_parse_grid_keeps_lists_whole_and_parses_yaml_values():
    assert parse_grid("lora.r=1,4,16") == ("lora.r", [1, 4, 16])
    assert parse_grid(TARGETS) == ("lora.target_modules", [["q_proj"], ["q_proj", "v_proj"]])
    assert parse_grid("train.method=lora,full") == ("train.method", ["lora", "full"])


def test_a_sweep_of_ranks_targets_and_seeds_runs_every_combination_with_every_column(capsys, base_config, tmp_path):
    out = tmp_path / "sweep"
    status, stdout, err = cli(
        capsys, "sweep", base_config, "--grid", "lora.r=2,4", "--grid", TARGETS, "--seeds", "2", "--out", out
    )
    assert status == 0, err
    table = rows(out)
    assert len(table) == 8
    assert {"run", "lora.r", "lora.target_modules", "train.seed", *COLUMNS} <= set(table[0])
    assert all(row["eval_loss"] and row["trainable_params"] and row["peak_memory_mb"] for row in table)
    assert {(row["r"], row["target_modules"]) for row in table} == {
        (r, t) for r in ("2", "4") for t in ("[q_proj]", "[q_proj, v_proj]")
    }
    params = {(row["r"], row["target_modules"]): int(row["trainable_params"]) for row in table}
    assert params[("4", "[q_proj]")] == 2 * params[("2", "[q_proj]")]  # r · (in + out) per module
    markdown = (out / "results.md").read_text()
    assert "8 of 8 runs finished; mean ± std over up to 2 seeds" in markdown and " ± " in markdown.split("\n")[4]
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    assert "[8/8]" in err and markdown in stdout
    assert Manifest.read(out).kind == "sweep"

    # the same command again: nothing retrains
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    status, _, err = cli(
        capsys, "sweep", base_config, "--grid", "lora.r=2,4", "--grid", TARGETS, "--seeds", "2", "--out", out
    )
    assert status == 0 and err.count("done before, skipped") == 8
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}


def test_budget_mode_picks_for_each_target_set_the_rank_closest_to_the_budget(
    capsys, base_config, tiny_llama_dir, tmp_path
):
    from loratune import LoraConfig

    status, out, err = cli(
        capsys, "sweep", base_config, "--grid", TARGETS, "--budget", "2000", "--out", tmp_path / "budget", "--dry-run"
    )
    assert status == 0, err
    ranks = {line.split("(r=")[1].rstrip(")") for line in out.splitlines() if "(r=" in line}
    assert len(ranks) == 2  # two target sets, two ranks
    for targets in (["q_proj"], ["q_proj", "v_proj"]):
        per_rank = adapter_parameters(str(tiny_llama_dir), LoraConfig(r=1, target_modules=targets))
        chosen = round(2000 / per_rank)
        assert abs(chosen * per_rank - 2000) <= per_rank  # within one rank step of the budget
        assert str(chosen) in ranks


def test_a_killed_sweep_continues_where_it_stopped(base_config, tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "loratune", "sweep", str(base_config), "--grid", "lora.r=2,4,8", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "r=2" / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert (out / "r=2" / "summary.json").exists(), "the first run did not finish in time"
    first = (out / "r=2" / "summary.json").stat().st_mtime_ns

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "[1/3] r=2: done before, skipped" in finished.stderr
    assert (out / "r=2" / "summary.json").stat().st_mtime_ns == first
    assert len(rows(out)) == 3


@pytest.mark.parametrize(
    "args, named",
    [
        (["--grid", "lora.rank=4,8"], "lora.r"),
        (["--grid", "lora.r=4,,8"], "empty value"),
        (["--grid", "lora.r=4,8", "--budget", "10"], "smaller than a rank-1 adapter"),
        (["--grid", "lora.r=0,4"], "lora.r"),
        ([], "nothing to sweep"),
    ],
)
def test_bad_sweeps_are_one_line_errors_and_run_nothing(capsys, base_config, tmp_path, args, named):
    status, _, err = cli(capsys, "sweep", base_config, *args, "--out", tmp_path / "sweep")
    assert status == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_refuses_a_directory_it_did_not_write(capsys, base_config, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    status, _, err = cli(capsys, "sweep", base_config, "--grid", "lora.r=2,4", "--out", tmp_path / "mine")
    assert_one_line_error(status, err, "sweep", "not a loratune sweep directory")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_diverging_run_is_reported_and_the_sweep_goes_on(capsys, base_config, tmp_path):
    out = tmp_path / "sweep"
    status, _, err = cli(capsys, "sweep", base_config, "--grid", "train.lr=1e-3,1e30", "--out", out)
    assert status == 0, err
    assert "lr=1e30: diverged" in err
    assert [row["train.lr"] for row in rows(out)] == ["1e-3"]
    assert "1 of 2 runs finished" in (out / "results.md").read_text()


def test_a_run_directory_killed_before_anything_was_written_into_it_does_not_block_the_sweep(base_config, tmp_path):
    """The window a SIGKILL can hit: the next run's directory made (with its own record) but not yet in the
    sweep's record. Continuing the sweep must take it as that run's, not as someone else's files."""
    from loratune.outputs import open_record

    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "loratune", "sweep", str(base_config), "--grid", "lora.r=2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(command, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    with open_record(out / "r=4", "run"):
        pass
    (out / "elsewhere").mkdir()  # a directory loratune did not begin is still refused ...
    command[command.index("lora.r=2")] = "lora.r=2,4"
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "elsewhere/" in refused.stderr and "r=4" not in refused.stderr
    (out / "elsewhere").rmdir()
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert len(rows(out)) == 2 and (out / "r=4" / "summary.json").is_file()


def test_kept_run_records_continue_a_sweep_elsewhere_with_the_same_table(capsys, base_config, tmp_path):
    """scripts/experiment_records.py: the records of a sweep's finished runs, restored into a new sweep directory,
    are skipped as done by the same sweep and give the same results rows; a run that was not kept trains."""
    records_script = [sys.executable, Path(__file__).parents[1] / "scripts" / "experiment_records.py"]
    first, records, second = tmp_path / "first", tmp_path / "records", tmp_path / "second"
    assert cli(capsys, "sweep", base_config, "--grid", "lora.r=2,4", "--out", first)[0] == 0
    kept = subprocess.run([*records_script, "keep", first, records], capture_output=True, text=True, check=True)
    assert "2 finished runs" in kept.stderr
    assert sorted(p.name for p in records.iterdir()) == ["r=2", "r=4"]
    assert sorted(p.name for p in (records / "r=2").iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]

    subprocess.run([*records_script, "restore", records, second], check=True, capture_output=True)
    status, _, err = cli(capsys, "sweep", base_config, "--grid", "lora.r=2,4,8", "--out", second)
    assert status == 0, err
    assert err.count("done before, skipped") == 2 and "[3/3] r=8: training" in err
    restored = {row["run"]: row for row in rows(second)}
    for row in rows(first):
        assert restored[row["run"]] == row
    assert set(restored) == {"r=2", "r=4", "r=8"}
