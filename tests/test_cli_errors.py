"""Every user error is one line: the nonsense a user could type into each verb, damaged and unreadable files,
paths of the wrong kind, a full disk and a denied permission all end in one line on stderr and exit status
2 (never a traceback), and nothing the user had is lost.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from run_helpers import train_through_cli
from test_cli import assert_one_line_error, cli, loratune_executable

LINEAR = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def ws(tiny_llama_dir, tmp_path_factory):
    """A config, its data and a trained run (adapter) on the tiny Llama; plus damaged copies of files."""
    trained = train_through_cli(tiny_llama_dir, tmp_path_factory.mktemp("cli-errors"), LINEAR)
    root, data, config, adapter = trained["root"], trained["data"], trained["config"], trained["adapter"]
    truncated = root / "truncated-adapter"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    bad_json = root / "bad-json-adapter"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_bytes(b"\xff\xfe not json")
    (bad_json / "adapter_model.safetensors").write_bytes(weights)
    return {
        "root": root,
        "data": data,
        "config": config,
        "adapter": adapter,
        "model": tiny_llama_dir,
        "truncated": truncated,
        "bad_json": bad_json,
        "weights_file": adapter / "adapter_model.safetensors",
    }


def fill(args, ws, tmp_path):
    """Replace placeholders in an argument list by the workspace's paths."""
    names = {
        "MODEL": ws["model"],
        "ADAPTER": ws["adapter"],
        "DATA": ws["data"],
        "CONFIG": ws["config"],
        "TRUNCATED": ws["truncated"],
        "BADJSON": ws["bad_json"],
        "WEIGHTS": ws["weights_file"],
        "OUT": tmp_path / "out",
        "TMP": tmp_path,
    }

    def one(arg: str) -> str:
        for name, value in names.items():
            if arg == name:
                return str(value)
            for sep in ("=", ":"):  # output_dir=OUT, ADAPTER:0.5
                if arg.endswith(sep + name):
                    return arg[: -len(name)] + str(value)
                if arg.startswith(name + sep):
                    return str(value) + arg[len(name) :]
        return arg

    return [one(a) for a in args]


# Per verb, what a user could type wrongly, and what the one error line must name.
NONSENSE = [
    # train
    ("train", ["TMP/missing.yaml"], ["missing.yaml"]),
    ("train", ["TMP"], ["TMP"]),
    ("train", ["CONFIG", "--set", "train.lr"], ["KEY=VALUE"]),
    ("train", ["CONFIG", "--set", "train.learning_rate=1"], ["did you mean 'train.lr'"]),
    ("train", ["CONFIG", "--set", "train.lr=fast"], ["train.lr"]),
    ("train", ["CONFIG", "--set", "train.batch_size=-3"], ["train.batch_size"]),
    ("train", ["CONFIG", "--set", "model.dtype=int3", "--set", "output_dir=OUT"], ["int3"]),
    ("train", ["CONFIG", "--set", "model.device=gpu9", "--set", "output_dir=OUT"], ["gpu9"]),
    ("train", ["CONFIG", "--resume", "--set", "output_dir=OUT"], ["--resume", "OUT"]),
    # data
    ("data", ["CONFIG", "-n", "-1"], ["-n", "0 or more"]),
    ("data", ["CONFIG", "--set", "data.max_length=0"], ["data.max_length"]),
    ("data", ["CONFIG", "--set", "data.format=jsonl"], ["data.format"]),
    # eval
    ("eval", ["--model", "MODEL", "--data", "TMP/none.jsonl"], ["none.jsonl"]),
    ("eval", ["--model", "MODEL", "--data", "TMP"], ["TMP"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--max-length", "0"], ["--max-length", "at least 1"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--batch-size", "0"], ["--batch-size"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--max-examples", "-2"], ["--max-examples"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--max-new-tokens", "-5"], ["--max-new-tokens"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--format", "chat"], ["--format", "chat"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--dtype", "int8"], ["--dtype", "int8"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--device", "gpu!"], ["--device", "gpu!"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--adapter", "ADAPTER:strong"], ["strong", "not a number"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--adapter", "ADAPTER:nan"], ["finite"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--adapter", "TRUNCATED"], ["TRUNCATED", "truncated"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--adapter", "BADJSON"], ["BADJSON"]),
    ("eval", ["--model", "MODEL", "--data", "DATA", "--adapter", "WEIGHTS"], ["WEIGHTS", "not an adapter directory"]),
    ("eval", ["--model", "TMP/none", "--data", "DATA"], ["none"]),
    # generate
    (
        "generate",
        ["--model", "MODEL", "--prompt", "hi", "--temperature", "-1"],
        ["--temperature", "0 (greedy) or more"],
    ),
    ("generate", ["--model", "MODEL", "--prompt", "hi", "--temperature", "1", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    ("generate", ["--model", "MODEL", "--prompt", "hi", "--temperature", "1", "--top-p", "1.5"], ["--top-p"]),
    ("generate", ["--model", "MODEL", "--prompt", "hi", "--temperature", "1", "--top-k", "0"], ["--top-k"]),
    ("generate", ["--model", "MODEL", "--prompt", "hi", "--max-new-tokens", "-1"], ["--max-new-tokens"]),
    ("generate", ["--model", "MODEL", "--prompt", "hi", "--top-p", "0.9"], ["--top-p", "--temperature"]),
    ("generate", ["--model", "MODEL", "--prompt", "hi", "--temperature", "inf"], ["--temperature", "finite"]),
    ("generate", ["--model", "MODEL", "--raw"], ["--prompt"]),
    # merge
    ("merge", ["--model", "MODEL", "--out", "OUT"], ["--adapter"]),
    ("merge", ["--model", "MODEL", "--adapter", "ADAPTER", "--out", "WEIGHTS"], ["WEIGHTS", "file"]),
    ("merge", ["--model", "MODEL", "--adapter", "ADAPTER", "--out", "OUT", "--out-dtype", "int4"], ["--out-dtype"]),
    ("merge", ["--model", "MODEL", "--adapter", "TRUNCATED", "--out", "OUT"], ["TRUNCATED"]),
    ("merge", ["--model", "MODEL", "--adapter", "ADAPTER", "--out", "OUT", "--requantize"], ["--quantize"]),
    # export-gguf
    ("export-gguf", ["ADAPTER", "--model", "MODEL", "--out", "TMP"], ["TMP", "directory"]),
    ("export-gguf", ["ADAPTER", "--model", "MODEL", "--out", "OUT", "--scale", "nan"], ["--scale", "finite"]),
    ("export-gguf", ["ADAPTER", "--model", "MODEL", "--out", "OUT", "--dtype", "q4_0"], ["--dtype"]),
    ("export-gguf", ["TRUNCATED", "--model", "MODEL", "--out", "OUT"], ["TRUNCATED"]),
    # mix
    ("mix", ["ADAPTER", "--method", "ties", "--density", "0", "--out", "OUT"], ["--density"]),
    ("mix", ["ADAPTER", "--method", "ties", "--density", "2", "--out", "OUT"], ["--density"]),
    ("mix", ["ADAPTER", "--method", "svd", "--rank", "0", "--out", "OUT"], ["--rank"]),
    ("mix", ["ADAPTER", "--method", "svd", "--rank", "many", "--out", "OUT"], ["--rank"]),
    ("mix", ["ADAPTER", "--method", "mean", "--out", "OUT"], ["mean"]),
    (
        "mix",
        ["ADAPTER", "--method", "ties", "--density", "0.5", "--majority-sign", "most", "--out", "OUT"],
        ["--majority-sign"],
    ),
    ("mix", ["ADAPTER:x", "--method", "cat", "--out", "OUT"], ["'x'", "not a number"]),
    ("mix", ["WEIGHTS", "--method", "cat", "--out", "OUT"], ["WEIGHTS"]),
    ("mix", ["TRUNCATED", "--method", "cat", "--out", "OUT"], ["TRUNCATED"]),
    # compress
    ("compress", ["TRUNCATED", "--out", "OUT"], ["TRUNCATED"]),
    ("compress", ["ADAPTER", "--out", "WEIGHTS"], ["WEIGHTS"]),
    ("compress", ["TMP/none", "--out", "OUT"], ["none"]),
    # inspect
    ("inspect", ["TMP/none"], ["none"]),
    ("inspect", ["TRUNCATED"], ["TRUNCATED", "truncated"]),
    ("inspect", ["WEIGHTS"], ["WEIGHTS"]),
    ("inspect", ["BADJSON"], ["BADJSON"]),
    # rank tools
    ("rank", ["TRUNCATED"], ["TRUNCATED", "truncated"]),
    ("rank", ["WEIGHTS"], ["WEIGHTS"]),
    ("rank", ["ADAPTER", "--energy", "most"], ["--energy"]),
    ("rank", ["ADAPTER", "--plot", "TMP"], ["TMP", "directory"]),
    ("rank", ["--model", "MODEL", "--tuned", "TMP/none"], ["none"]),
    ("rank", ["--model", "MODEL", "--tuned", "ADAPTER"], ["ADAPTER"]),
    ("rank", ["ADAPTER", "--model", "MODEL", "--tuned", "ADAPTER"], ["not both"]),
    ("resize", ["ADAPTER", "--out", "OUT"], ["--rank", "--energy"]),
    ("resize", ["ADAPTER", "--rank", "2", "--energy", "0.5", "--out", "OUT"], ["--energy"]),
    ("resize", ["TRUNCATED", "--rank", "2", "--out", "OUT"], ["TRUNCATED"]),
    ("resize", ["ADAPTER", "--rank", "2", "--out", "WEIGHTS"], ["WEIGHTS"]),
    ("extract", ["--model", "MODEL", "--tuned", "TMP/none", "--rank", "2", "--out", "OUT"], ["none"]),
    ("extract", ["--model", "MODEL", "--tuned", "MODEL", "--rank", "-1", "--out", "OUT"], ["--rank"]),
    ("compare", ["ADAPTER", "TRUNCATED"], ["TRUNCATED"]),
    ("compare", ["ADAPTER", "TMP/none"], ["none"]),
    # usage
    ("eval", ["--model", "MODEL"], ["--data"]),
    ("train", [], ["required"]),
]


@pytest.mark.parametrize("verb, args, named", NONSENSE, ids=[f"{v}-{i}" for i, (v, _, _) in enumerate(NONSENSE)])
def test_nonsense_is_one_line_on_stderr_with_status_2(capsys, ws, tmp_path, verb, args, named):
    before = sorted(p.name for p in ws["root"].iterdir())
    status, _out, err = cli(capsys, verb, *fill(args, ws, tmp_path))
    assert_one_line_error(status, err, verb, *fill(named, ws, tmp_path))
    assert sorted(p.name for p in ws["root"].iterdir()) == before
    assert not (tmp_path / "out").exists()


# --- the operating system says no -------------------------------------------------------------------------


def run_limited(args: list[str], *, file_size: int | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The real ``loratune`` executable, optionally limited to writing files of ``file_size`` bytes (what a
    full disk looks like to a writer: the write fails with an OS error)."""

    def limit():
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [loratune_executable(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
        cwd=cwd,
        env=env,
    )


def assert_one_line(done: subprocess.CompletedProcess, verb: str, *named) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"loratune {verb}: error: ") and "Traceback" not in done.stderr
    for thing in named:
        assert str(thing) in lines[0], lines[0]


@pytest.mark.integration
def test_a_full_disk_while_merging_is_one_line_and_leaves_nothing(ws, tmp_path):
    out = tmp_path / "merged"
    done = run_limited(["merge", "--model", ws["model"], "--adapter", ws["adapter"], "--out", out], file_size=4096)
    assert_one_line(done, "merge")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_full_disk_while_training_is_one_line(ws, tmp_path):
    done = run_limited(
        ["train", ws["config"], "--set", f"output_dir={tmp_path / 'run'}", "--no-progress"], file_size=2048
    )
    assert_one_line(done, "train")


@contextlib.contextmanager
def writes_denied(directory: Path):
    """Make ``directory`` refuse new entries for this user (root ignores modes: the immutable flag then)."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("cannot deny root a write here (chattr +i unsupported)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.parametrize("verb", ["compress", "merge", "train", "export-gguf"])
def test_permission_denied_is_one_line_naming_the_path(capsys, ws, tmp_path, verb):
    locked = tmp_path / "locked"
    locked.mkdir()
    args = {
        "compress": ["compress", ws["adapter"], "--out", locked / "c"],
        "merge": ["merge", "--model", ws["model"], "--adapter", ws["adapter"], "--out", locked / "m"],
        "train": ["train", ws["config"], "--set", f"output_dir={locked / 'run'}", "--no-progress"],
        "export-gguf": ["export-gguf", ws["adapter"], "--model", ws["model"], "--out", locked / "a.gguf"],
    }[verb]
    with writes_denied(locked):
        status, _, err = cli(capsys, *args)
    assert_one_line_error(status, err, verb, locked, "ermission denied" if os.geteuid() else "not permitted")
    assert list(locked.iterdir()) == []


def test_a_path_through_a_file_is_one_line(capsys, ws, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    status, _, err = cli(capsys, "compress", ws["adapter"], "--out", blocker / "sub" / "c")
    assert_one_line_error(status, err, "compress", blocker)


def test_an_unexpected_failure_is_one_line_that_says_it_is_a_bug(capsys, ws, monkeypatch):
    from loratune.cli import inspect_adapter

    def broken(args):
        raise ZeroDivisionError("something loratune did not foresee")

    monkeypatch.setattr(inspect_adapter, "run", broken)
    status, _, err = cli(capsys, "inspect", ws["adapter"])
    assert status == 1
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and "internal error" in lines[0] and "--debug" in lines[0] and "ZeroDivisionError" in lines[0]
    )


@pytest.mark.integration
def test_a_usage_error_of_the_real_executable_is_one_line(ws):
    done = run_limited(["generate", "--model", ws["model"], "--prompt", "hi", "--temperature", "1", "--top-p", "0"])
    assert_one_line(done, "generate", "--top-p")
