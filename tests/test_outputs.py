"""What loratune may write and replace: ``--overwrite`` replaces only outputs loratune wrote, never the
current directory, its parents, the home directory or a filesystem root, and swaps the new output in so the
old one survives a failure; everything written gets the permissions the user's umask gives.

Every verb that writes (train, merge, mix, compress, export-gguf) runs for real on the tiny Llama.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

import loratune
from loratune.errors import ConfigError, FileAccessError
from loratune.outputs import MANIFEST_NAME, write_output_dir
from run_helpers import train_through_cli, write_jsonl
from test_cli import assert_one_line_error, cli

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything below it, by path relative to ``root``."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_default_modes(root: Path, mask: int) -> None:
    wrong = {}
    for name, mode in modes(root).items():
        path = root / name
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        if mode != expected:
            wrong[name] = oct(mode)
    assert not wrong, f"not {oct(0o666 & ~mask)}/{oct(0o777 & ~mask)}: {wrong}"


@pytest.fixture(scope="module")
def workspace(tiny_llama_dir, tmp_path_factory):
    """A data file, a trained run (through the CLI) and its adapter."""
    return train_through_cli(tiny_llama_dir, tmp_path_factory.mktemp("outputs"), LINEAR)


def user_folder(path: Path) -> Path:
    """A folder with files a user wrote (a source file and a subfolder)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.py").write_text("print('my code')\n")
    (path / "notes").mkdir(exist_ok=True)
    (path / "notes" / "todo.md").write_text("- keep me\n")
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def writing_commands(workspace, tiny_llama_dir, out: Path) -> dict[str, list]:
    """Each verb that writes, aimed at ``out`` (a directory, or a file for export-gguf)."""
    adapter = workspace["adapter"]
    return {
        "train": ["train", workspace["config"], "--set", f"output_dir={out}", "--no-progress"],
        "merge": ["merge", "--model", tiny_llama_dir, "--adapter", adapter, "--out", out],
        "mix": ["mix", f"{adapter}:0.5", "--method", "cat", "--out", out],
        "compress": ["compress", adapter, "--out", out],
        "export-gguf": ["export-gguf", adapter, "--model", tiny_llama_dir, "--out", out],
    }


VERBS = ["train", "merge", "mix", "compress", "export-gguf"]


# --- --overwrite never deletes what loratune did not write -----------------------------------------------


@pytest.mark.parametrize("verb", VERBS)
def test_overwrite_refuses_the_current_directory_and_keeps_its_files(
    capsys, workspace, tiny_llama_dir, tmp_path, monkeypatch, verb
):
    project = user_folder(tmp_path / "project")
    before = snapshot(project)
    monkeypatch.chdir(project)
    args = writing_commands(workspace, tiny_llama_dir, Path("."))[verb]
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, verb)
    assert snapshot(project) == before


@pytest.mark.parametrize("where", ["parent of the current directory", "home directory", "filesystem root"])
def test_overwrite_refuses_a_parent_of_the_current_directory_home_and_root(
    capsys, workspace, tiny_llama_dir, tmp_path, monkeypatch, where
):
    home = user_folder(tmp_path / "home")
    inner = home / "work" / "project"
    inner.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(inner)
    target = {"parent of the current directory": home / "work", "home directory": home, "filesystem root": Path("/")}[
        where
    ]
    before = snapshot(home)
    args = writing_commands(workspace, tiny_llama_dir, target)["merge"]
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, "merge", target)
    assert where.split()[0] in err or "contains the current directory" in err
    assert snapshot(home) == before


@pytest.mark.parametrize("verb", ["train", "merge", "mix", "compress"])
def test_overwrite_refuses_a_folder_holding_files_loratune_did_not_write(
    capsys, workspace, tiny_llama_dir, tmp_path, verb
):
    folder = user_folder(tmp_path / "folder")
    before = snapshot(folder)
    status, _, err = cli(capsys, *writing_commands(workspace, tiny_llama_dir, folder)[verb], "--overwrite")
    assert_one_line_error(status, err, verb, folder, "train.py")
    assert snapshot(folder) == before


def test_overwrite_refuses_to_add_loratune_files_to_a_user_folder_after_an_earlier_output(
    capsys, workspace, tiny_llama_dir, tmp_path
):
    out = tmp_path / "merged"
    args = writing_commands(workspace, tiny_llama_dir, out)["merge"]
    assert cli(capsys, *args)[0] == 0
    (out / "my-notes.txt").write_text("added by the user")
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, "merge", "my-notes.txt")
    assert (out / "my-notes.txt").read_text() == "added by the user"


def test_export_gguf_overwrite_refuses_a_file_it_did_not_write(capsys, workspace, tiny_llama_dir, tmp_path):
    theirs = tmp_path / "base.gguf"
    theirs.write_bytes(b"GGUF a model the user downloaded")
    args = writing_commands(workspace, tiny_llama_dir, theirs)["export-gguf"]
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, "export-gguf", theirs)
    assert theirs.read_bytes() == b"GGUF a model the user downloaded"


@pytest.mark.parametrize("verb", VERBS)
def test_overwrite_replaces_an_output_loratune_wrote(capsys, workspace, tiny_llama_dir, tmp_path, verb):
    out = tmp_path / ("out.gguf" if verb == "export-gguf" else "out")
    args = writing_commands(workspace, tiny_llama_dir, out)[verb]
    assert cli(capsys, *args)[0] == 0
    status, _, err = cli(capsys, *args)
    assert_one_line_error(status, err, verb, "--overwrite")
    status, _, err = cli(capsys, *args, "--overwrite")
    assert status == 0, err
    record = [f".{out.name}{MANIFEST_NAME}"] if verb == "export-gguf" else []  # a single file's record
    assert out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *record])  # nothing else


@pytest.mark.parametrize("verb", ["train", "merge", "mix", "compress"])
def test_a_symbolic_link_as_output_directory_is_refused(capsys, workspace, tiny_llama_dir, tmp_path, verb):
    real = user_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    status, _, err = cli(capsys, *writing_commands(workspace, tiny_llama_dir, link)[verb], "--overwrite")
    assert_one_line_error(status, err, verb, "symbolic link")
    assert snapshot(real) == snapshot(user_folder(tmp_path / "copy"))


def test_a_file_where_an_output_directory_should_go_is_one_line(capsys, workspace, tiny_llama_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for verb in ("merge", "mix", "compress", "train"):
        status, _, err = cli(capsys, *writing_commands(workspace, tiny_llama_dir, taken)[verb], "--overwrite")
        assert_one_line_error(status, err, verb, taken)
    assert taken.read_text() == "a file"


def test_a_directory_where_the_gguf_file_should_go_is_one_line(capsys, workspace, tiny_llama_dir, tmp_path):
    status, _, err = cli(capsys, *writing_commands(workspace, tiny_llama_dir, tmp_path)["export-gguf"], "--overwrite")
    assert_one_line_error(status, err, "export-gguf", tmp_path, "directory")


# --- replacing swaps a complete new output in ---------------------------------------------------------------


def test_a_failure_while_building_an_output_leaves_the_old_one_whole(tmp_path):
    target = tmp_path / "out"
    write_output_dir(target, "model", lambda d: (d / "weights.bin").write_bytes(b"old"))

    def fail_half_way(staging: Path) -> None:
        (staging / "weights.bin").write_bytes(b"new, half written")
        raise OSError(28, "No space left on device")

    with pytest.raises(FileAccessError, match="No space left on device"):
        write_output_dir(target, "model", fail_half_way, overwrite=True)
    assert (target / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_training_overwrite_keeps_the_old_run_until_the_new_one_completes(capsys, workspace, tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", workspace["config"], "--set", f"output_dir={run}", "--no-progress"]
    assert cli(capsys, *args)[0] == 0
    old_adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    bad_data = write_jsonl(tmp_path / "broken.jsonl", [{"messages": "not a list"}])
    status, _, err = cli(capsys, *args, "--set", f"data.train={bad_data}", "--overwrite")
    assert_one_line_error(status, err, "train", bad_data)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "run"]
    status, _, err = cli(capsys, *args, "--set", "train.max_steps=3", "--overwrite")
    assert status == 0, err
    assert json_of(run / "summary.json")["steps"] == 3


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_a_run_without_a_record_of_its_files_is_never_overwritten(capsys, workspace, tmp_path):
    run = tmp_path / "run"
    args = ["train", workspace["config"], "--set", f"output_dir={run}", "--no-progress"]
    assert cli(capsys, *args)[0] == 0
    (run / MANIFEST_NAME).unlink()  # as a loratune before records left it: names prove nothing
    before = snapshot(run)
    status, _, err = cli(capsys, *args, "--overwrite")
    assert_one_line_error(status, err, "train", run, "no record")
    assert snapshot(run) == before


# --- permissions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_everything_written_gets_the_permissions_of_the_users_umask(capsys, workspace, tiny_llama_dir, tmp_path, mask):
    with umask(mask):
        for verb in VERBS:
            out = tmp_path / verb / ("adapter.gguf" if verb == "export-gguf" else "out")
            status, _, err = cli(capsys, *writing_commands(workspace, tiny_llama_dir, out)[verb])
            assert status == 0, err
            assert_default_modes(tmp_path / verb, mask)


def test_a_saved_adapter_gets_default_permissions(tmp_path, tiny_llama_dir):
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    loratune.add_adapter(model, loratune.LoraConfig(r=2, target_modules=["q_proj"]))
    with umask(0o022):
        loratune.save_adapter(model, tmp_path / "a")
        loratune.save_adapter(model, tmp_path / "a", compress="int8")
    assert_default_modes(tmp_path / "a", 0o022)


def test_library_save_of_a_merged_model_refuses_a_user_folder(tmp_path, tiny_llama_dir):
    from loratune.models.export import save_hf_model

    model, tokenizer = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    folder = user_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match="train.py"):
        save_hf_model(model, tokenizer, folder, overwrite=True)
    assert (folder / "train.py").is_file()
