"""Nothing lost: an output that is one of the command's inputs is refused, ``--overwrite`` removes only what
loratune's record lists, one process at a time writes an output, a stop signal checkpoints, a sweep never reuses a
run trained with other settings, and every option is checked before a model loads.

Each verb runs for real (in-process through ``main``; in subprocesses where signals and races are the point) on
the tiny Llama and a tiny BERT classifier.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.cli.main import VERBS, build_parser
from loratune.errors import ConfigError, DataError
from loratune.outputs import MANIFEST_NAME, Manifest, guard_output, write_output_dir
from loratune.outputs.lock import acquire, lock_file_for
from run_helpers import (
    adapter_tensors,
    addition_rows,
    assert_same_tensors,
    config_dict,
    metrics,
    write_config,
    write_jsonl,
)
from test_cli import assert_one_line_error, cli, loratune_executable
from tiny_models import tiny_encoder_dir

ALIASING = "would destroy what this command reads"


# --- a workspace: data, configs, a trained adapter, a full fine-tune, a classifier ---------------------------------


@pytest.fixture(scope="module")
def ws(tiny_llama_dir, tmp_path_factory):
    from loratune.cli.main import main

    root = tmp_path_factory.mktemp("nothing-lost")
    data = write_jsonl(root / "train.jsonl", addition_rows(8))
    config = write_config(root / "run.yaml", config_dict(tiny_llama_dir, data, root / "run"))
    full = write_config(root / "full.yaml", config_dict(tiny_llama_dir, data, root / "full", train={"method": "full"}))
    tiny_encoder_dir(root / "bert")
    labelled = write_jsonl(
        root / "intents.jsonl",
        [{"text": f"play {w} music", "label": "music"} for w in ("jazz", "rock", "pop")]
        + [{"text": f"book a flight to {c}", "label": "flight"} for c in ("paris", "tokyo", "london")],
    )
    classify = root / "classify.yaml"
    classify.write_text(
        json.dumps(
            {
                "model": {"name": str(root / "bert"), "dtype": "fp32"},
                "data": {"train": str(labelled), "max_length": 16},
                "train": {"max_steps": 2, "batch_size": 2},
                "output_dir": str(root / "cls"),
            }
        )
    )
    rows = write_jsonl(root / "rows.jsonl", [{"text": "play jazz music"}, {"text": "book a flight to paris"}])
    with contextlib.redirect_stdout(None):
        for path in (config, full, classify):
            assert main(["train", str(path), "--no-progress"]) == 0
    return {
        "root": root,
        "model": Path(tiny_llama_dir),
        "data": data,
        "config": config,
        "adapter": root / "run" / "adapter",
        "run": root / "run",
        "tuned": root / "full" / "model",
        "classifier": root / "cls" / "adapter",
        "rows": rows,
    }


def snapshot(*paths: Path) -> dict[str, bytes]:
    """Every file under ``paths`` (or the files themselves) with its bytes."""
    found = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found.update({str(p): p.read_bytes() for p in files})
    return found


@pytest.fixture
def no_model_loads(monkeypatch):
    """Reading a model's weights fails the test: what is checked must be checked before."""
    from loratune.models import loader

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the command's options and paths were checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(loader, "load_streamed", refuse)


# --- every verb: declared, and refusing an output that is one of its inputs --------------------------------------


# Each verb that writes: (argv with OUT for its output, the inputs it reads: what an output must stay clear of)
def writing_verbs(ws, out) -> dict[str, tuple[list, list[Path]]]:
    model, adapter = ws["model"], ws["adapter"]
    return {
        "train": (
            ["train", ws["config"], "--set", f"output_dir={out}", "--no-progress"],
            [ws["data"], model, ws["config"]],
        ),
        "predict": (
            ["predict", "--adapter", ws["classifier"], "--data", ws["rows"], "--out", out],
            [ws["rows"], ws["classifier"]],
        ),
        "merge": (["merge", "--model", model, "--adapter", adapter, "--out", out], [adapter, model]),
        "export-gguf": (["export-gguf", adapter, "--model", model, "--out", out], [adapter, model]),
        "mix": (["mix", f"{adapter}:0.5", "--method", "cat", "--out", out], [adapter]),
        "convert": (["convert", adapter, "--to", "kohya", "--out", out], [adapter]),
        "compress": (["compress", adapter, "--out", out], [adapter]),
        "rank": (["rank", adapter, "--plot", out], [adapter]),
        "resize": (["resize", adapter, "--rank", "1", "--out", out], [adapter]),
        "extract": (
            ["extract", "--model", model, "--tuned", ws["tuned"], "--rank", "1", "--out", out],
            [ws["tuned"], model],
        ),
        "compare": (["compare", adapter, adapter, "--plot", out], [adapter]),
        "sweep": (["sweep", ws["config"], "--grid", "lora.r=1,2", "--out", out], [ws["config"], ws["data"], model]),
    }


def reading_verbs(ws) -> dict[str, list]:
    return {
        "data": ["data", ws["config"]],
        "eval": ["eval", "--model", ws["model"], "--data", ws["data"]],
        "generate": ["generate", "--model", ws["model"], "--prompt", "hi"],
        "serve": ["serve", "--model", ws["model"], "--adapter", f"a={ws['adapter']}"],
        "inspect": ["inspect", ws["adapter"]],
    }


def parsed(argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_every_verb_of_the_parser_says_what_it_writes_and_reads(ws, tmp_path):
    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    declared = set(writing_verbs(ws, tmp_path / "out")) | set(reading_verbs(ws))
    assert verbs == declared, f"a verb this test does not cover: {verbs ^ declared}"
    modules = {module.NAME: module for module in VERBS}
    for verb, argv in reading_verbs(ws).items():
        assert modules[verb].writes(parsed(argv)).output is None, verb
    for verb, (argv, inputs) in writing_verbs(ws, tmp_path / "out").items():
        declared = modules[verb].writes(parsed(argv))
        assert declared.output is not None, verb
        resolved = {Path(p).resolve() for _, p in declared.inputs}
        assert {Path(p).resolve() for p in inputs} <= resolved, verb


RELATIONS = ["is", "contains", "lies inside", "link to it", "through a link", "with .."]


def aliased(tmp_path: Path, source: Path, relation: str) -> tuple[Path, Path]:
    """(output path, input path as given) standing in ``relation`` to ``source``."""
    if relation == "is":
        return source, source
    if relation == "contains":
        return source.parent, source
    if relation == "lies inside":
        return (source / "out" if source.is_dir() else source.parent / source.name / "out"), source
    if relation == "link to it":
        link = tmp_path / "link"
        link.symlink_to(source)
        return link, source
    if relation == "through a link":
        link = tmp_path / "via"
        link.symlink_to(source)
        return source, link
    return source.parent / ".." / source.parent.name / source.name, source


# how the guard refuses: the overlap itself, or (an output spelled as a link, a directory where a file goes) the place
GUARD_REFUSALS = (ALIASING, "is a symbolic link", "is a file, not a directory", "is a directory")


def has_option(verb: str, flag: str) -> bool:
    return any(
        flag in action.option_strings for action in build_parser()._subparsers._group_actions[0].choices[verb]._actions
    )


@pytest.mark.parametrize("relation", RELATIONS)
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_before_loading(
    capsys, ws, tmp_path, no_model_loads, relation
):
    for verb, (_, inputs) in writing_verbs(ws, tmp_path / "unused").items():
        overwrite = ["--overwrite"] if has_option(verb, "--overwrite") else []
        for source in inputs:
            out, given = aliased(tmp_path, Path(source), relation)
            argv = [str(a) for a in writing_verbs(ws, out)[verb][0]]
            argv = [str(given) if a == str(source) else a for a in argv]
            before = snapshot(ws["root"])
            status, _, err = cli(capsys, *argv, *overwrite)
            assert_one_line_error(status, err, verb)
            assert any(refusal in err for refusal in GUARD_REFUSALS), err
            assert snapshot(ws["root"]) == before, f"{verb} changed its input ({relation} {source})"
            for link in (tmp_path / "link", tmp_path / "via"):
                link.unlink(missing_ok=True)


def test_merge_onto_its_own_adapter_keeps_the_adapter(capsys, ws, no_model_loads):
    adapter = ws["adapter"]
    before = snapshot(adapter)
    status, _, err = cli(capsys, "merge", "--adapter", adapter, "--out", adapter, "--overwrite")
    assert_one_line_error(status, err, "merge", adapter, ALIASING)
    assert snapshot(adapter) == before


def test_predict_onto_its_own_data_keeps_the_data(capsys, ws, no_model_loads):
    before = snapshot(ws["rows"])
    status, _, err = cli(
        capsys, "predict", "--adapter", ws["classifier"], "--data", ws["rows"], "--out", ws["rows"], "--overwrite"
    )
    assert_one_line_error(status, err, "predict", ws["rows"], ALIASING)
    assert snapshot(ws["rows"]) == before


# the guard itself, over every way two paths can be related and spelled
PARTS = st.lists(st.sampled_from(["a", "b", "c d", "é"]), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    source=PARTS,
    extra=PARTS,
    relation=st.sampled_from(["same", "parent", "child", "sibling", "symlink"]),
    spelling=st.sampled_from(["absolute", "relative", "dotdot"]),
    is_dir=st.booleans(),
)
def test_the_guard_refuses_exactly_the_paths_that_overlap_an_input(
    tmp_path, monkeypatch, source, extra, relation, spelling, is_dir
):
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # each example its own tree
    src = root.joinpath("in", *source)
    src.parent.mkdir(parents=True, exist_ok=True)
    src.mkdir() if is_dir else src.write_text("input")
    out = {
        "same": src,
        "parent": src.parent,
        "child": src.joinpath(*extra),
        "sibling": src.parent / ("other-" + "-".join(extra)),
        "symlink": root / ("link-" + "-".join(extra)),
    }[relation]
    if relation == "symlink":
        out.symlink_to(src)
    monkeypatch.chdir(root)
    relative = Path(os.path.relpath(out, root))
    spelled = {"absolute": out, "relative": relative, "dotdot": Path(relative.parts[0]) / ".." / relative}[spelling]
    overlaps = relation in ("same", "parent", "symlink") or (relation == "child" and is_dir)
    from loratune.outputs import refuse_aliasing

    if overlaps:
        with pytest.raises(ConfigError, match=ALIASING):
            refuse_aliasing(spelled, [("the data", src)])
    elif relation == "child":  # inside a file: refused too (it is no directory), only not as an overlap
        with pytest.raises(ConfigError):
            refuse_aliasing(spelled, [("the data", src)])
    else:
        refuse_aliasing(spelled, [("the data", src)])


# --- --overwrite trusts the record of what was written, file by file ---------------------------------------------


def test_train_overwrite_refuses_a_folder_the_user_put_into_a_run(capsys, ws, tmp_path):
    run = tmp_path / "run"
    args = ["train", ws["config"], "--set", f"output_dir={run}", "--no-progress"]
    assert cli(capsys, *args)[0] == 0
    (run / "model").mkdir()  # a name a run could write, but this one did not
    (run / "model" / "notes.md").write_text("mine\n")
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, "train", "holds model/")
    assert (run / "model" / "notes.md").read_text() == "mine\n"


def test_overwrite_refuses_a_file_changed_since_loratune_wrote_it(capsys, ws, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", "--model", ws["model"], "--adapter", ws["adapter"], "--out", out]
    assert cli(capsys, *args)[0] == 0
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # a user's edit
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, "merge", "config.json (changed since loratune wrote it)")


def test_a_finished_run_records_every_file_it_wrote(capsys, ws, tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        ws["config"],
        "--set",
        f"output_dir={run}",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.save_every=1",
        "--set",
        "train.keep_checkpoints=2",
        "--set",
        f"data.eval={ws['data']}",
        "--set",
        "train.eval_every=2",
        "--set",
        "train.best_metric=eval_loss",
        "--no-progress",
    ]
    assert cli(capsys, *args)[0] == 0
    record = Manifest.read(run)
    assert record.kind == "run" and record.foreign(run) == []
    assert {"adapter", "best"} <= record.outputs and "metrics.jsonl" in record.files
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert not any(name.startswith("checkpoints/step-1/") for name in record.files)  # pruned, and forgotten
    status, _, err = cli(capsys, *args[:-1], "--set", "train.max_steps=6", "--resume", "--no-progress")
    assert status == 0, err
    assert Manifest.read(run).foreign(run) == []
    status, _, err = cli(capsys, *args, "--overwrite")  # everything there is the run's own
    assert status == 0, err


def test_predict_overwrite_replaces_its_own_output_and_refuses_a_file_it_did_not_write(capsys, ws, tmp_path):
    out = tmp_path / "labels.jsonl"
    args = ["predict", "--adapter", ws["classifier"], "--data", ws["rows"], "--out", out]
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, *args, "--overwrite")[0] == 0
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text('{"text": "my own file"}\n')
    status, _, err = cli(capsys, *args[:-1], theirs, "--overwrite")
    assert_one_line_error(status, err, "predict", theirs, "loratune wrote")
    assert theirs.read_text() == '{"text": "my own file"}\n'


ENTRY = st.tuples(
    st.sampled_from(["a", "b", "sub/c", "sub/deep/d", "adapter/x", "new"]),
    st.sampled_from(["file", "dir", "edit", "link", "empty-dir"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(additions=st.lists(ENTRY, max_size=3))
def test_overwrite_never_removes_what_the_record_does_not_list(tmp_path, additions):
    """Whatever a user adds to or changes in an output, ``--overwrite`` either refuses and changes nothing, or
    (nothing added) replaces it."""
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / "out"

    def fill(staging: Path) -> None:
        (staging / "a").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "c").write_text("c")
        (staging / "adapter").mkdir()
        (staging / "adapter" / MANIFEST_NAME).write_text(Manifest("adapter").to_json())

    write_output_dir(out, "model", fill)
    for name, kind in additions:
        path = out / name
        if kind == "edit":
            if path.is_file() and path.name != MANIFEST_NAME:
                path.write_text(path.read_text() + "!")
            continue
        if path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            path.write_text("user")
        elif kind == "link":
            path.symlink_to(tmp_path)
        else:
            path.mkdir()
            if kind == "dir":
                (path / "f").write_text("u")
    before = snapshot(out)
    changed = bool(Manifest.read(out).foreign(out))
    if changed:
        with pytest.raises(ConfigError, match="only what loratune wrote"):
            write_output_dir(out, "model", lambda staging: (staging / "new").write_text("new"), overwrite=True)
        assert snapshot(out) == before
    else:
        write_output_dir(out, "model", lambda staging: (staging / "new").write_text("new"), overwrite=True)
        assert (out / "new").read_text() == "new"


# --- one process per output -------------------------------------------------------------------------------------


def _race(target: str, barrier, won) -> None:
    barrier.wait()
    try:
        acquire(Path(target), "loratune test")
    except Exception:  # noqa: BLE001 - losing is the expected outcome for all but one
        barrier.wait()
        return
    won.value += 1
    barrier.wait()  # hold it until every process has tried


def test_of_processes_racing_for_one_output_exactly_one_wins(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        barrier, won = context.Barrier(4), context.Value("i", 0)
        racers = [context.Process(target=_race, args=(str(tmp_path / f"out{round_}"), barrier, won)) for _ in range(4)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(timeout=30)
        assert won.value == 1


@contextlib.contextmanager
def held_by_another_process(path: Path, command: str = "loratune train"):
    """Another process holding ``path``'s lock for the block; yields its pid."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from loratune.outputs.lock import acquire
        acquire(Path({str(path)!r}), {command!r})
        print("held", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_an_output_another_process_writes_is_refused_naming_it(capsys, ws, tmp_path):
    run = tmp_path / "run"
    args = ["train", ws["config"], "--set", f"output_dir={run}", "--no-progress"]
    with held_by_another_process(run) as pid:
        status, _, err = cli(capsys, *args)
        assert_one_line_error(status, err, "train", run, f"in use by loratune train (pid {pid}, since ")
        # a directory inside it, or around it
        status, _, err = cli(capsys, "merge", "--model", ws["model"], "--adapter", ws["adapter"], "--out", run / "m")
        assert_one_line_error(status, err, "merge", f"lies inside {run.resolve()}", f"pid {pid}")
        status, _, err = cli(capsys, "compress", ws["adapter"], "--out", tmp_path / "c")
        assert status == 0, err  # a sibling is free
    assert cli(capsys, *args)[0] == 0  # the lock died with its process


def test_a_crashed_holder_leaves_no_lock(capsys, ws, tmp_path):
    run = tmp_path / "run"
    with held_by_another_process(run):
        pass  # killed with SIGKILL: no cleanup ran
    assert lock_file_for(run.resolve()).exists()  # the file may stay; the lock did not
    assert cli(capsys, "train", ws["config"], "--set", f"output_dir={run}", "--no-progress")[0] == 0


def test_a_nested_guard_in_the_same_process_takes_no_second_lock(tmp_path):
    with guard_output(tmp_path / "run", existing="continue"), guard_output(tmp_path / "run" / "adapter"):
        write_output_dir(tmp_path / "run" / "adapter", "adapter", lambda d: (d / "x").write_text("x"))
    assert (tmp_path / "run" / "adapter" / "x").is_file()
    assert not lock_file_for(tmp_path / "run").exists()


def one_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _one_ran(run: Path) -> None:
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert Manifest.read(run).foreign(run) == []
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]  # one run's lines, not two interleaved


@pytest.mark.integration
def test_a_training_started_on_an_output_another_one_writes_says_who(ws, tmp_path):
    run = tmp_path / "run"
    command = [loratune_executable(), "train", str(ws["config"]), "--set", f"output_dir={run}", "--no-progress"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env())
    lock, deadline = lock_file_for(run), time.monotonic() + 120
    while f'"pid": {first.pid},' not in (lock.read_text() if lock.exists() else ""):  # it holds the run now
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # and keeps it, however fast it would train
    try:
        second = subprocess.run(command, capture_output=True, text=True, env=one_thread_env(), timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by loratune train (pid {first.pid}, since " in lines[0], second.stderr
    _one_ran(run)


@pytest.mark.integration
def test_two_trainings_started_together_on_one_output_one_runs_the_other_refuses(ws, tmp_path):
    for round_ in range(2):
        run = tmp_path / f"run{round_}"
        command = [loratune_executable(), "train", str(ws["config"]), "--set", f"output_dir={run}", "--no-progress"]
        first = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env()
        )
        second = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env()
        )
        done = [(p, *p.communicate(timeout=300)) for p in (first, second)]
        statuses = sorted(p.returncode for p, _, _ in done)
        assert statuses == [0, 2], [(p.returncode, err) for p, _, err in done]
        winner = next(p for p, _, _ in done if p.returncode == 0)
        loser_err = next(err for p, _, err in done if p.returncode == 2)
        lines = loser_err.strip().splitlines()
        # one line: who holds the run while it trains, or, when the winner was through before the other process
        # got as far as the output (it takes seconds to start on a busy machine), that the run exists
        assert len(lines) == 1, loser_err
        assert (
            f"in use by loratune train (pid {winner.pid}, since " in lines[0]
            or f"output directory {run} already exists and is not empty" in lines[0]
        ), loser_err
        _one_ran(run)


@pytest.mark.integration
def test_two_sweeps_on_one_directory_one_runs(ws, tmp_path):
    out = tmp_path / "sweep"
    command = [loratune_executable(), "sweep", str(ws["config"]), "--grid", "lora.r=1,2", "--out", str(out)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env())
        for _ in range(2)
    ]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(status for status, _ in done) == [0, 2], done
    assert "in use by loratune sweep (pid " in next(err for status, err in done if status == 2)
    assert (out / "results.csv").read_text().count("\n") == 3


# --- stop signals ------------------------------------------------------------------------------------------------


def start_training(config, run: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [loratune_executable(), "train", str(config), "--set", f"output_dir={run}", "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=one_thread_env(),
    )


def wait_for_step(process: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").is_file() and len([r for r in metrics(run) if "loss" in r]) >= step):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def long_config(ws, tiny_llama_dir):
    return write_config(
        ws["root"] / "long.yaml",
        config_dict(
            tiny_llama_dir,
            ws["data"],
            ws["root"] / "unused",
            lora={"lora_dropout": 0.1},
            train={"max_steps": 100000, "scheduler": "constant", "log_every": 1},
        ),
    )


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_at_a_random_step_checkpoints_and_resumes_to_the_identical_adapter(long_config, tmp_path, signum):
    run = tmp_path / "run"
    process = start_training(long_config, run)
    wait_for_step(process, run, random.Random(signum).randint(2, 6))
    time.sleep(random.Random(signum + 1).random() * 0.05)  # anywhere inside a step
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith(f"loratune train: stopped by {name} at step ")
    reached = int(lines[0].split(" at step ")[1].split()[0])
    command = lines[1].split("continue with: ", 1)[1].split()
    assert command[-1] == "--resume" and (run / "checkpoints" / f"step-{reached}").is_dir()
    env = one_thread_env()
    done = subprocess.run(
        [loratune_executable(), *command[1:], "--set", f"train.max_steps={reached + 2}", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    straight = subprocess.run(
        [
            loratune_executable(),
            "train",
            str(long_config),
            "--set",
            f"output_dir={tmp_path / 'straight'}",
            "--set",
            f"train.max_steps={reached + 2}",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    assert_same_tensors(adapter_tensors(run), adapter_tensors(tmp_path / "straight"))
    assert Manifest.read(run).foreign(run) == []


@pytest.mark.integration
def test_signals_after_the_stop_never_kill_the_exiting_process(long_config, tmp_path):
    run = tmp_path / "run"
    process = start_training(long_config, run)
    wait_for_step(process, run, 2)
    process.send_signal(signal.SIGTERM)
    said = []
    while not any("stopped by SIGTERM" in line for line in said):  # saved; the process is on its way out
        line = process.stderr.readline()
        assert line, "".join(said)
        said.append(line)
    # a scheduler (or an impatient user) that keeps signalling until the process is gone
    signums, deadline = itertools.cycle((signal.SIGHUP, signal.SIGTERM, signal.SIGINT)), time.monotonic() + 120
    while process.poll() is None:
        assert time.monotonic() < deadline, "the stopped process did not exit"
        process.send_signal(next(signums))
        time.sleep(0.005)
    said.append(process.stderr.read())
    assert process.returncode == 143, "".join(said)


@pytest.mark.integration
def test_signals_during_the_stop_never_cut_the_checkpoint(long_config, tmp_path):
    run = tmp_path / "run"
    process = start_training(long_config, run)
    wait_for_step(process, run, 3)
    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        process.send_signal(signum)
        time.sleep(0.002)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    reached = int(err.split(" at step ")[1].split()[0])
    checkpoint = run / "checkpoints" / f"step-{reached}"
    assert {p.name for p in checkpoint.iterdir()} >= {
        "trainer_state.json",
        "adapter_state.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
    }
    done = subprocess.run(
        [
            loratune_executable(),
            "train",
            str(long_config),
            "--set",
            f"output_dir={run}",
            "--set",
            f"train.max_steps={reached + 1}",
            "--resume",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=one_thread_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.integration
def test_a_stopped_sweep_says_how_to_continue_and_continues(ws, tiny_llama_dir, tmp_path):
    config = write_config(
        tmp_path / "sweep.yaml",
        config_dict(tiny_llama_dir, ws["data"], tmp_path / "unused", train={"max_steps": 40, "log_every": 1}),
    )
    out = tmp_path / "sweep"
    command = [loratune_executable(), "sweep", str(config), "--grid", "lora.r=1,2", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env())
    wait_for_step(process, out / "r=1", 3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "loratune sweep: stopped by SIGTERM at step" in err and "continue with: loratune sweep " in err
    done = subprocess.run(command, capture_output=True, text=True, env=one_thread_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[1/2] r=1: resuming" in done.stderr
    assert (out / "results.csv").read_text().count("\n") == 3


# --- a sweep run is its configuration ----------------------------------------------------------------------------


def test_a_rerun_sweep_refuses_runs_trained_with_other_settings_and_extends_longer_ones(capsys, ws, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", ws["config"], "--grid", "lora.r=1,2", "--out", out]
    assert cli(capsys, *args)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}

    status, _, err = cli(capsys, *args, "--set", "train.lr=0.005")
    assert_one_line_error(status, err, "sweep", "train.lr 0.001 → 0.005", "--restart-changed", "1 more")
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}  # nothing retrained
    status, listing, _ = cli(capsys, *args, "--set", "train.lr=0.005", "--dry-run")
    assert status == 0 and [line.split()[0] for line in listing.splitlines()[:2]] == ["changed", "changed"]

    status, _, err = cli(capsys, *args, "--set", "train.max_steps=3")
    assert status == 0 and err.count("extending (train.max_steps 2 → 3)") == 2, err
    assert all(json.loads(p.read_text())["steps"] == 3 for p in out.glob("*/summary.json"))

    status, _, err = cli(capsys, *args, "--set", "train.max_steps=3", "--set", "train.lr=0.005", "--restart-changed")
    assert status == 0 and err.count("training afresh (train.lr 0.001 → 0.005)") == 2, err
    config = (out / "r=1" / "config.yaml").read_text()
    assert "lr: 0.005" in config
    assert Manifest.read(out).foreign(out) == []

    # a setting no run of the sweep's method reads changes nothing: the runs are done as they were
    status, _, err = cli(
        capsys, *args, "--set", "train.max_steps=3", "--set", "train.lr=0.005", "--set", "intrinsic.dim=7"
    )
    assert status == 0 and err.count("done") >= 2 and "afresh" not in err, err


def test_a_sweep_notices_changed_training_data(capsys, ws, tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", addition_rows(8))
    config = write_config(tmp_path / "c.yaml", config_dict(tiny_llama_dir, data, tmp_path / "unused"))
    args = ["sweep", config, "--grid", "lora.r=1,2", "--out", tmp_path / "sweep"]
    assert cli(capsys, *args)[0] == 0
    write_jsonl(data, addition_rows(8, start=30))
    status, _, err = cli(capsys, *args)
    assert_one_line_error(status, err, "sweep", "data.train", "changed")


# --- values that cannot mean anything -----------------------------------------------------------------------------


def test_labels_of_mixed_kinds_are_refused_naming_file_and_line(capsys, ws, tmp_path):
    for labels, named in (
        (["pos", "neg", 3], "label 3 is an integer, but 'pos'"),
        ([0, 1, 2.5, 1], "label 2.5 is a number with a fraction, but 0"),
    ):
        data = write_jsonl(
            tmp_path / "mixed.jsonl", [{"text": f"row {i}", "label": label} for i, label in enumerate(labels)]
        )
        config = tmp_path / "c.yaml"
        config.write_text(
            json.dumps(
                {
                    "model": {"name": str(ws["root"] / "bert")},
                    "data": {"train": str(data)},
                    "output_dir": str(tmp_path / "run"),
                }
            )
        )
        status, _, err = cli(capsys, "train", config, "--no-progress")
        assert_one_line_error(status, err, "train", f"{data}:3: {named}")
        assert not (tmp_path / "run").exists()


def test_label_kinds_that_belong_together_are_accepted():
    from loratune.data.classification import check_label_kinds

    for labels in (["a", "b"], [0, 1, 2], ["0", "1"], [0.5, 3.0, 5.0], ["3.200", "1.000"]):
        check_label_kinds([(label, f"f:{i}") for i, label in enumerate(labels)])
    with pytest.raises(DataError, match="f:1: tag 'B-PER'"):
        check_label_kinds([(0, "f:0"), ("B-PER", "f:1")], "tag")


def every_option(verb: str):
    """(flag, action) for each option of ``verb`` that takes a value."""
    sub = build_parser()._subparsers._group_actions[0].choices[verb]
    for action in sub._actions:
        if action.option_strings and action.nargs != 0 and action.dest not in ("help",):
            yield (
                action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0],
                action,
            )


# a value no option of that kind can take, by its type (argparse checks these before anything runs)
def bad_values(ws) -> dict:
    from loratune.cli import options, serve, sweep

    return {
        options.positive_int: "0",
        options.non_negative_int: "-1",
        options.finite_float: "nan",
        options.temperature: "-0.5",
        options.probability: "0",
        options.density: "1.5",
        options.mix_rank: "0",
        options.device: "gpu7",
        options.adapter_spec: f"{ws['adapter']}:strong",
        options.energy_list: "0.5,2",
        options.retain_source: "/no/such/retain.jsonl",
        options.seed: str(2**64),
        options.positive_seconds: "0",
        options.non_negative_seconds: "-1",
        options.non_negative_float: "-1",
        options.port: "70000",
        sweep._grid: "lora.r",
        serve.named_adapter: f"a={ws['adapter']}:strong",
        serve.listen_port: "70000",
    }


# values checked after parsing, still before any model loads
LATE = {
    "--host": "no-such-host.invalid",
    "--adapter-root": "/no/such/dir",
    "--method": "no-such-method",
    "--set": "train.no_such_key=1",
    "--tuned": "/no/such/model",
    "--reference": "/no/such/run",
    "--api-key": "",
}


def test_every_option_of_every_verb_refuses_a_value_that_cannot_mean_anything_before_loading(
    capsys, ws, tmp_path, no_model_loads
):
    minimal = {verb: argv for verb, (argv, _) in writing_verbs(ws, tmp_path / "out").items()}
    minimal.update(reading_verbs(ws))
    minimal["rank"], minimal["compare"] = ["rank", ws["adapter"]], ["compare", ws["adapter"], ws["adapter"]]
    bad = bad_values(ws)
    unchecked = []
    for verb, argv in minimal.items():
        for flag, action in every_option(verb):
            if action.type in bad:
                value = bad[action.type]
            elif action.choices:
                value = "bogus"
            elif flag in LATE:
                value = LATE[flag]
            else:
                unchecked.append(f"{verb} {flag}")
                continue
            status, _, err = cli(capsys, *argv, flag, value)
            assert_one_line_error(status, err, verb)
    # free text, names and paths whose every value means something (or whose check is a test of its own)
    assert set(unchecked) <= {
        f"{verb} {flag}"
        for verb in minimal
        for flag in (
            "--model",
            "--data",
            "--out",
            "--prompt",
            "--system",
            "--plot",
            "--save-modules",
            "--config",
            "--adapter",
            "--format",
            "--tuned",
        )
    }, unchecked


@pytest.mark.parametrize("verb", ["merge", "predict", "export-gguf", "extract"])
def test_an_output_place_that_takes_no_files_is_said_before_loading(capsys, ws, tmp_path, no_model_loads, verb):
    from test_cli_errors import writes_denied

    locked = tmp_path / "locked"
    locked.mkdir()
    with writes_denied(locked):
        status, _, err = cli(capsys, *writing_verbs(ws, locked / "out")[verb][0])
    assert_one_line_error(status, err, verb, locked / "out")
    assert list(locked.iterdir()) == []


def test_serve_refuses_a_busy_port_and_an_unknown_host_before_loading(capsys, ws, no_model_loads):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, _, err = cli(capsys, "serve", "--model", ws["model"], "--port", port)
        assert_one_line_error(status, err, "serve", f"cannot listen on 127.0.0.1:{port}", "--port")
    status, _, err = cli(capsys, "serve", "--model", ws["model"], "--host", "no-such-host.invalid")
    assert_one_line_error(status, err, "serve", "--host no-such-host.invalid")


# --- messages that say what is wrong ---------------------------------------------------------------------------


def test_convert_says_what_its_source_is_instead(capsys, ws, tmp_path):
    (tmp_path / "empty").mkdir()
    for source, said in (
        (ws["data"], "is not a LoRA file"),
        (tmp_path / "nothing", "no such file or directory"),
        (tmp_path / "empty", "directory without adapter_config.json"),
    ):
        status, _, err = cli(capsys, "convert", source, "--to", "peft", "--out", tmp_path / "out")
        assert_one_line_error(status, err, "convert", source, said)
        assert "format already" not in err


def test_a_directory_given_as_training_data_is_named_a_directory(capsys, ws, tmp_path):
    status, _, err = cli(
        capsys, "train", ws["config"], "--set", f"data.train={tmp_path}", "--set", f"output_dir={tmp_path / 'run'}"
    )
    assert_one_line_error(status, err, "train", str(tmp_path), "is a directory")


def test_more_processes_than_cores_are_refused(capsys, ws, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status, _, err = cli(capsys, "train", ws["config"], "--set", f"output_dir={tmp_path / 'run'}", "--nproc", "64")
    assert_one_line_error(status, err, "train", "--nproc 64", "CPU cores")
    assert not (tmp_path / "run").exists()


def test_a_log_stopped_while_it_starts_leaves_nothing_unrecorded(tmp_path, monkeypatch):
    """A run's metrics.jsonl (and GRPO's completions.jsonl) is recorded before it appears under its name: a stop in
    between (here: recording it raising, as a SIGKILL would stop there) leaves no file the run's record does not
    list, which would make a sweep refuse to continue the run."""
    import loratune.outputs.manifest as manifest_module
    import loratune.train.metrics as metrics_module
    from loratune.outputs import Manifest, open_record
    from loratune.train.metrics import MetricsLog

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    for module in (manifest_module, metrics_module):
        monkeypatch.setattr(module, "record_published", stopped, raising=False)
    with open_record(run, "run"), pytest.raises(KeyboardInterrupt):
        MetricsLog(run)
    assert Manifest.read(run).foreign(run) == []
    monkeypatch.undo()
    with open_record(run, "run"):
        MetricsLog(run).log({"step": 1, "loss": 1.0})
    assert Manifest.read(run).foreign(run) == []
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_checkpoint_killed_while_staged_leaves_a_run_that_can_be_continued(tmp_path):
    """A SIGKILL while the first checkpoint is staged leaves ``checkpoints/`` holding only its staging directory
    (a temporary name), not yet recorded: the run's record takes it as loratune's leftover, not as someone else's
    files; an empty directory loratune did not record is still foreign."""
    from loratune.files import temp_dir_beside
    from loratune.outputs import Manifest, open_record

    run = tmp_path / "run"
    with open_record(run, "run"):
        pass
    staging = temp_dir_beside(run / "checkpoints" / "step-5")
    (staging / "adapter_model.safetensors").write_bytes(b"partial")
    assert Manifest.read(run).foreign(run) == []
    (run / "elsewhere").mkdir()
    assert Manifest.read(run).foreign(run) == ["elsewhere/"]
