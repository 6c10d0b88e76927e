"""Tests for the ``loratune`` command line: every verb end to end on a tiny random Llama (in-process through
``loratune.cli.main.main`` for speed), the one-line error contract, ``--help``, and one run of the real
executable.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loratune
from loratune.cli.main import main
from loratune.cli.options import adapter_spec
from loratune.errors import LoratuneError
from run_helpers import addition_rows, config_dict, text_rows, write_config, write_jsonl

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["add 3 4", "What is the capital of France?", "hello"]


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``loratune ARGS`` in-process; return (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:  # argparse: --help, usage errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, verb: str, *named: str) -> None:
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"loratune {verb}: error: ")
    assert "Traceback" not in err
    for thing in named:
        assert str(thing) in lines[0], f"{thing!r} not named in: {lines[0]}"


# --- fixtures: two adapters trained through the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    return {
        "root": root,
        "chat": write_jsonl(root / "chat.jsonl", addition_rows(8)),
        "text": write_jsonl(root / "text.jsonl", text_rows(4)),
    }


def train_through_cli(model_dir, files, name: str, targets) -> tuple[Path, str]:
    """Train with ``loratune train`` (a large learning rate, so the adapter clearly changes the model)."""
    root = files["root"]
    config = write_config(
        root / f"{name}.yaml",
        config_dict(
            model_dir,
            files["chat"],
            root / name,
            lora={"target_modules": targets},
            train={"max_steps": 4, "lr": 0.05},
        ),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["train", str(config), "--no-progress"])
    assert status == 0, out.getvalue()
    return root / name, out.getvalue()


@pytest.fixture(scope="module")
def embed_run(tiny_llama_dir, files):
    """Tied embeddings; the adapter targets ``embed_tokens`` as well as every projection."""
    return train_through_cli(tiny_llama_dir, files, "embed", [*LINEAR_TARGETS, "embed_tokens"])


@pytest.fixture(scope="module")
def linear_run(tiny_llama_dir, files):
    return train_through_cli(tiny_llama_dir, files, "linear", "all-linear")


def load_with_adapter(model_dir, adapter_dir, scale: float = 1.0):
    model, tokenizer = loratune.load_model(str(model_dir), dtype="fp32", device="cpu")
    loratune.load_adapter(model, str(adapter_dir), scale=scale)
    return model.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_text(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """What greedy decoding with plain ``transformers.generate`` produces, up to the end of the turn."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(ids) :].tolist()
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    cut = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True)


# --- train / eval / generate / merge / inspect ------------------------------------------------------------


def test_train_prints_a_summary_and_writes_the_run(embed_run):
    run_dir, output = embed_run
    assert "training finished" in output and "final loss" in output
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "summary.json").is_file()


def test_eval_json_reports_loss_perplexity_exact_match_and_n(capsys, tiny_llama_dir, linear_run, files):
    run_dir, _ = linear_run
    status, out, _ = cli(
        capsys,
        "eval",
        "--model",
        tiny_llama_dir,
        "--adapter",
        run_dir / "adapter",
        "--data",
        files["chat"],
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "4",
        "--json",
    )
    assert status == 0
    result = json.loads(out)
    assert {"loss", "perplexity", "exact_match", "n"} <= result.keys()
    assert result["n"] == 8
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 0.0 <= result["exact_match"] <= 1.0


def test_eval_json_exact_match_is_null_for_text_data(capsys, tiny_llama_dir, files):
    status, out, _ = cli(
        capsys, "eval", "--model", tiny_llama_dir, "--data", files["text"], "--dtype", "fp32", "--json"
    )
    assert status == 0
    result = json.loads(out)
    assert result["exact_match"] is None and result["n"] == 4 and math.isfinite(result["loss"])


def test_eval_with_strength_zero_equals_the_base_model(capsys, tiny_llama_dir, linear_run, files):
    adapter = linear_run[0] / "adapter"
    common = ["--model", tiny_llama_dir, "--data", files["chat"], "--dtype", "fp32", "--no-exact-match", "--json"]
    base = json.loads(cli(capsys, "eval", *common)[1])
    off = json.loads(cli(capsys, "eval", *common, "--adapter", f"{adapter}:0")[1])
    on = json.loads(cli(capsys, "eval", *common, "--adapter", str(adapter))[1])
    assert off["loss"] == pytest.approx(base["loss"], abs=1e-6)
    assert abs(on["loss"] - base["loss"]) > 1e-3


@pytest.mark.parametrize("raw", [False, True])
def test_generate_matches_greedy_transformers_generation(capsys, tiny_llama_dir, linear_run, raw):
    adapter = linear_run[0] / "adapter"
    model, tokenizer = load_with_adapter(tiny_llama_dir, adapter)
    prompt = "add 3 4"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if raw else chat_ids(tokenizer, prompt)
    expected = greedy_text(model, tokenizer, ids, 5)
    args = [
        "generate",
        "--model",
        tiny_llama_dir,
        "--adapter",
        adapter,
        "--dtype",
        "fp32",
        "--prompt",
        prompt,
        "--max-new-tokens",
        "5",
    ]
    status, out, _ = cli(capsys, *args, *(["--raw"] if raw else []))
    assert status == 0
    assert out.rstrip("\n") == expected


def test_generate_without_prompt_chats_on_stdin(capsys, tiny_llama_dir, linear_run, monkeypatch):
    adapter = linear_run[0] / "adapter"
    model, tokenizer = load_with_adapter(tiny_llama_dir, adapter)
    expected = greedy_text(model, tokenizer, chat_ids(tokenizer, "add 3 4"), 5)
    monkeypatch.setattr(sys, "stdin", io.StringIO("add 3 4\n\n"))
    status, out, err = cli(
        capsys, "generate", "--model", tiny_llama_dir, "--adapter", adapter, "--dtype", "fp32", "--max-new-tokens", "5"
    )
    assert status == 0, err
    assert out.rstrip("\n") == expected


@pytest.mark.parametrize("run_name", ["embed_run", "linear_run"])
def test_merged_model_loads_in_plain_transformers_and_matches_base_plus_adapter(
    request, capsys, tiny_llama_dir, tmp_path, run_name
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = request.getfixturevalue(run_name)[0] / "adapter"
    out_dir = tmp_path / "merged"
    status, _out, err = cli(capsys, "merge", "--model", tiny_llama_dir, "--adapter", adapter, "--out", out_dir)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    assert merged_tokenizer.chat_template
    adapted, tokenizer = load_with_adapter(tiny_llama_dir, adapter)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        assert chat_ids(merged_tokenizer, prompt) == ids
        batch = torch.tensor([ids])
        with torch.no_grad():
            want, got = adapted(input_ids=batch).logits, merged(input_ids=batch).logits
            base_logits = base(input_ids=batch).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert (want - base_logits).abs().max() > 1e-2  # the adapter really changes the model
        assert greedy_text(merged, merged_tokenizer, ids, 8) == greedy_text(adapted, tokenizer, ids, 8)


def test_merge_at_a_strength_matches_the_adapter_loaded_at_that_strength(capsys, tiny_llama_dir, linear_run, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = linear_run[0] / "adapter"
    out_dir = tmp_path / "half"
    status, _, err = cli(capsys, "merge", "--model", tiny_llama_dir, "--adapter", f"{adapter}:0.5", "--out", out_dir)
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    half, tokenizer = load_with_adapter(tiny_llama_dir, adapter, scale=0.5)
    full, _ = load_with_adapter(tiny_llama_dir, adapter)
    batch = torch.tensor([chat_ids(tokenizer, PROMPTS[0])])
    with torch.no_grad():
        got, want, other = merged(input_ids=batch).logits, half(input_ids=batch).logits, full(input_ids=batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - other).abs().max() > 1e-2


def test_merge_of_an_embedding_adapter_unties_the_output_head(capsys, tiny_llama_dir, embed_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "merged"
    status, _, err = cli(
        capsys, "merge", "--model", tiny_llama_dir, "--adapter", embed_run[0] / "adapter", "--out", out_dir
    )
    assert status == 0, err
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)  # the head keeps W0
    assert not torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_merge_refuses_an_existing_output_dir_unless_overwrite(capsys, tiny_llama_dir, linear_run, tmp_path):
    out_dir = tmp_path / "merged"
    args = ["merge", "--model", tiny_llama_dir, "--adapter", linear_run[0] / "adapter", "--out", out_dir]
    assert cli(capsys, *args)[0] == 0
    first = (out_dir / "model.safetensors").read_bytes()
    status, _, err = cli(capsys, *args)
    assert_one_line_error(status, err, "merge", out_dir, "--overwrite")
    status, _, err = cli(
        capsys, *args[:-2], "--adapter", f"{linear_run[0] / 'adapter'}:0.5", "--out", out_dir, "--overwrite"
    )
    assert status == 0, err
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").read_bytes() != first


def test_merge_overwrite_never_deletes_files_loratune_did_not_write(capsys, tiny_llama_dir, linear_run, tmp_path):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    args = ["merge", "--model", tiny_llama_dir, "--adapter", linear_run[0] / "adapter", "--out", out_dir]
    for extra in ([], ["--overwrite"]):
        status, _, err = cli(capsys, *args, *extra)
        assert_one_line_error(status, err, "merge", out_dir)
        assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    assert "keep.txt" in err and "loratune wrote" in err


def expected_adapter_params(model_dir, targets: list[str], r: int) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Embedding):
            total += r * (module.num_embeddings + module.embedding_dim)
    return total


def test_inspect_json_describes_the_adapter(capsys, tiny_llama_dir, embed_run):
    adapter = embed_run[0] / "adapter"
    status, out, _ = cli(capsys, "inspect", adapter, "--json")
    assert status == 0
    info = json.loads(out)
    targets = [*LINEAR_TARGETS, "embed_tokens"]
    assert info["base_model"] == str(tiny_llama_dir)
    assert info["r"] == 4 and info["lora_alpha"] == 8
    assert sorted(info["target_modules"]) == sorted(targets)
    assert info["trainable_params"] == expected_adapter_params(tiny_llama_dir, targets, 4)
    assert info["size_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size


def test_inspect_table_mentions_rank_and_base(capsys, tiny_llama_dir, linear_run):
    status, out, _ = cli(capsys, "inspect", linear_run[0] / "adapter")
    assert status == 0
    assert "base_model" in out and "trainable_params" in out and tiny_llama_dir.name in out


# --- adapter specs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("a:b/dir:0.5", ("a:b/dir", 0.5)),
        ("dir", ("dir", 1.0)),
        ("c:/x", ("c:/x", 1.0)),
        ("runs/x/adapter:0", ("runs/x/adapter", 0.0)),
        ("runs/x/adapter:-1", ("runs/x/adapter", -1.0)),
        ("runs/x/adapter:1e-1", ("runs/x/adapter", 0.1)),
    ],
)
def test_adapter_spec_splits_at_the_last_colon_before_a_number(spec, expected):
    assert adapter_spec(spec) == expected


# --- data ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_config(tiny_llama_dir, files):
    return write_config(
        files["root"] / "preview.yaml", config_dict(tiny_llama_dir, files["chat"], files["root"] / "unused")
    )


def test_data_prints_examples_and_length_statistics(capsys, data_config, files):
    status, out, _ = cli(capsys, "data", data_config, "-n", "2")
    assert status == 0
    assert "example 1 of 8" in out and "example 2 of 8" in out and "example 3 of 8" not in out
    assert f"{files['chat']}:1" in out
    assert "add 0 0" in out  # the first example's prompt
    assert "token lengths" in out and "rows: 8 read, 8 kept" in out
    assert not (files["root"] / "unused").exists()  # a preview writes no run


def test_data_marks_the_trained_spans_when_output_is_not_a_terminal(capsys, data_config):
    # Rich styles vanish when stdout is a pipe or a file; the trained tokens must still be told apart
    # (render_preview's [[...]] markers).
    status, out, _ = cli(capsys, "data", data_config, "-n", "1")
    assert status == 0
    assert "[[0<|im_end|>]]" in out  # the first answer, "0", and its end-of-turn token are trained


# --- errors: one line on stderr, exit status 2 -------------------------------------------------------------


def test_missing_model_path(capsys, tmp_path, files):
    missing = tmp_path / "no-such-model"
    status, _, err = cli(capsys, "eval", "--model", missing, "--data", files["chat"])
    assert_one_line_error(status, err, "eval", missing)


def test_unknown_alias(capsys, files):
    status, _, err = cli(capsys, "generate", "--model", "smollm3-135m", "--prompt", "hi")
    assert_one_line_error(status, err, "generate", "smollm3-135m", "smollm2-135m")


def test_adapter_directory_that_does_not_exist(capsys, tiny_llama_dir, tmp_path, files):
    missing = tmp_path / "no-adapter"
    status, _, err = cli(capsys, "eval", "--model", tiny_llama_dir, "--adapter", missing, "--data", files["chat"])
    assert_one_line_error(status, err, "eval", missing)


def test_directory_that_is_not_an_adapter(capsys, tiny_llama_dir, files):
    status, _, err = cli(
        capsys, "eval", "--model", tiny_llama_dir, "--adapter", tiny_llama_dir, "--data", files["chat"]
    )
    assert_one_line_error(status, err, "eval", "adapter_config.json")


@pytest.fixture(scope="module")
def wider_llama_dir(make_tiny_llama_dir):
    return make_tiny_llama_dir(hidden_size=48)


def test_adapter_trained_on_another_base(capsys, wider_llama_dir, linear_run, files):
    adapter = linear_run[0] / "adapter"
    status, _, err = cli(capsys, "eval", "--model", wider_llama_dir, "--adapter", adapter, "--data", files["chat"])
    assert_one_line_error(status, err, "eval", adapter, "shape")


def test_malformed_data_line_names_file_and_line(capsys, tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(addition_rows(1)[0]) + "\n{not json\n")
    status, _, err = cli(capsys, "eval", "--model", tiny_llama_dir, "--data", bad)
    assert_one_line_error(status, err, "eval", f"{bad}:2")
    config = write_config(tmp_path / "c.yaml", config_dict(tiny_llama_dir, bad, tmp_path / "run"))
    status, _, err = cli(capsys, "train", config, "--no-progress")
    assert_one_line_error(status, err, "train", f"{bad}:2")


def test_unknown_config_key(capsys, tiny_llama_dir, files, tmp_path):
    config = config_dict(tiny_llama_dir, files["chat"], tmp_path / "run")
    config["lora"]["lora_alhpa"] = 8
    status, _, err = cli(capsys, "train", write_config(tmp_path / "c.yaml", config))
    assert_one_line_error(status, err, "train", "lora.lora_alhpa", "lora.lora_alpha")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_set(capsys, tiny_llama_dir, files, tmp_path):
    config = write_config(tmp_path / "c.yaml", config_dict(tiny_llama_dir, files["chat"], tmp_path / "run"))
    status, _, err = cli(capsys, "train", config, "--set", "train.max_step=3")
    assert_one_line_error(status, err, "train", "train.max_step", "train.max_steps")


def test_existing_output_dir(capsys, tiny_llama_dir, files, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "old.txt").write_text("x")
    config = write_config(tmp_path / "c.yaml", config_dict(tiny_llama_dir, files["chat"], run_dir))
    status, _, err = cli(capsys, "train", config)
    assert_one_line_error(status, err, "train", run_dir, "--resume", "--overwrite")


def test_resume_and_overwrite_together_is_a_usage_error(capsys, tmp_path):
    status, _, err = cli(capsys, "train", tmp_path / "c.yaml", "--resume", "--overwrite")
    assert status == 2 and "not allowed with" in err


def test_missing_config_file(capsys, tmp_path):
    status, _, err = cli(capsys, "train", tmp_path / "nope.yaml")
    assert_one_line_error(status, err, "train", tmp_path / "nope.yaml")


def test_merge_without_adapter(capsys, tiny_llama_dir, tmp_path):
    status, _, err = cli(capsys, "merge", "--model", tiny_llama_dir, "--out", tmp_path / "m")
    assert_one_line_error(status, err, "merge", "--adapter")
    assert not (tmp_path / "m").exists()


def test_debug_shows_the_traceback(tmp_path, files):
    with pytest.raises(LoratuneError, match="no-such-model"):
        main(["--debug", "eval", "--model", str(tmp_path / "no-such-model"), "--data", str(files["chat"])])


# --- help ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "verb, options",
    [
        ("train", ["CONFIG", "--set", "--resume", "--overwrite"]),
        ("data", ["CONFIG", "--set"]),
        ("eval", ["--model", "--adapter", "--data", "--json"]),
        ("generate", ["--model", "--adapter", "--prompt", "--max-new-tokens", "--raw"]),
        ("merge", ["--model", "--adapter", "--out"]),
        ("inspect", ["ADAPTER", "--json", "kohya"]),
        ("mix", ["ADAPTER:WEIGHT", "--method", "--format", "--out"]),
        ("convert", ["FILE_OR_DIR", "--to", "--model", "--out", "diffusers"]),
        ("resize", ["ADAPTER", "--energy", "--format"]),
    ],
)
def test_help_of_every_verb(capsys, verb, options):
    status, out, _ = cli(capsys, verb, "--help")
    assert status == 0
    for option in options:
        assert option in out


def test_top_level_help_lists_the_verbs(capsys):
    status, out, _ = cli(capsys, "--help")
    assert status == 0
    for verb in ("train", "data", "eval", "generate", "merge", "inspect", "mix", "convert"):
        assert verb in out


# --- the real executable ---------------------------------------------------------------------------------


def loratune_executable() -> str:
    path = Path(sys.executable).parent / "loratune"
    if not path.exists():
        pytest.skip("the loratune console script is not installed next to this Python")
    return str(path)


def test_executable_reports_a_user_error_in_one_line(wider_llama_dir, linear_run, files):
    # An adapter for another base: a real process shows everything on stderr (warnings included).
    adapter = linear_run[0] / "adapter"
    done = subprocess.run(
        [
            loratune_executable(),
            "eval",
            "--model",
            str(wider_llama_dir),
            "--adapter",
            str(adapter),
            "--data",
            str(files["chat"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("loratune eval: error: ") and str(adapter) in lines[0]


def test_data_reads_only_the_tokenizer_not_the_weights(capsys, make_tiny_llama_dir, files, tmp_path):
    model_dir = make_tiny_llama_dir()
    (model_dir / "model.safetensors").write_bytes(b"not weights: the preview must not need them")
    config = write_config(tmp_path / "c.yaml", config_dict(model_dir, files["chat"], tmp_path / "run"))
    status, out, err = cli(capsys, "data", config, "-n", "1")
    assert status == 0, err
    assert "rows: 8 read" in out
