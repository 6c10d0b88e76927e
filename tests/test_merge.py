"""``loratune merge`` keeps the base's stored precision and agrees with PEFT; verbs that take an adapter
default ``--model`` to the base it records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune.models.base_config import model_name_for
from run_helpers import addition_rows, write_jsonl
from test_cli import assert_one_line_error, cli

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def stored_as(model_dir: Path, dtype: torch.dtype, out: Path) -> Path:
    """A copy of the model directory with its weights stored in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(out)
    return out


def peft_adapter(model_dir: Path, out: Path, dtype=torch.float32):
    """A PEFT adapter with non-zero B on the model at ``model_dir``, saved at ``out``; returns the PEFT model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    model.save_pretrained(out)
    return model


def test_an_fp32_base_merged_with_a_peft_adapter_equals_peft_merge_and_unload(capsys, tiny_llama_dir, tmp_path):
    model = peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    expected = model.merge_and_unload().state_dict()
    status, _, err = cli(
        capsys, "merge", "--model", tiny_llama_dir, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged"
    )
    assert status == 0, err
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}
    changed = 0
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-4, rtol=0)
        changed += not torch.equal(tensor, load_file(tiny_llama_dir / "model.safetensors").get(key, tensor))
    assert changed >= 2 * len(TARGETS)  # the adapted weights really moved


@pytest.mark.parametrize(
    "stored, asked, written",
    [
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float32, "bf16", torch.bfloat16),
        (torch.bfloat16, "fp32", torch.float32),
    ],
)
def test_merge_writes_the_stored_dtype_unless_asked_and_never_rounds_through_another(
    capsys, tiny_llama_dir, tmp_path, stored, asked, written
):
    base_dir = stored_as(tiny_llama_dir, stored, tmp_path / "base")
    peft_adapter(base_dir, tmp_path / "adapter")
    extra = ["--out-dtype", asked] if asked else []
    status, out, err = cli(
        capsys, "merge", "--model", base_dir, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged", *extra
    )
    assert status == 0, err
    assert str(written).removeprefix("torch.") in out
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {written}
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(written).removeprefix("torch.")
    # the float32 merge of the stored weights, rounded once into the written dtype
    base = {k: v.float() for k, v in load_file(base_dir / "model.safetensors").items()}
    reference = (
        peft.PeftModel.from_pretrained(
            __import__("transformers").AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
            str(tmp_path / "adapter"),
        )
        .merge_and_unload()
        .state_dict()
    )
    for key, tensor in merged.items():
        want = reference[key].to(written)
        assert (tensor.float() - want.float()).abs().max() <= 2 * torch.finfo(written).eps * want.float().abs().max()
        assert base[key].shape == tensor.shape


def test_without_model_verbs_use_the_base_the_adapter_records(capsys, tiny_llama_dir, tmp_path):
    peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(3))
    status, with_model, err = cli(
        capsys,
        "eval",
        "--model",
        tiny_llama_dir,
        "--adapter",
        tmp_path / "adapter",
        "--data",
        data,
        "--json",
        "--no-exact-match",
    )
    assert status == 0, err
    status, without, err = cli(
        capsys, "eval", "--adapter", tmp_path / "adapter", "--data", data, "--json", "--no-exact-match"
    )
    assert status == 0, err
    assert json.loads(without) == json.loads(with_model)
    status, _, err = cli(capsys, "merge", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert status == 0, err
    status, _out, err = cli(
        capsys, "generate", "--adapter", tmp_path / "adapter", "--prompt", "add 1 2", "--max-new-tokens", "3"
    )
    assert status == 0, err


def test_adapters_of_different_bases_without_model_is_one_line(capsys, tiny_llama_dir, make_tiny_llama_dir, tmp_path):
    peft_adapter(tiny_llama_dir, tmp_path / "one")
    other = make_tiny_llama_dir(seed=1)
    peft_adapter(other, tmp_path / "two")
    data = write_jsonl(tmp_path / "d.jsonl", addition_rows(3))
    status, _, err = cli(capsys, "eval", "--adapter", tmp_path / "one", "--adapter", tmp_path / "two", "--data", data)
    assert_one_line_error(status, err, "eval", "different base models", "--model")


def test_a_recorded_base_that_is_gone_says_to_pass_model(capsys, tiny_llama_dir, tmp_path):
    peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    status, _, err = cli(capsys, "merge", "--adapter", tmp_path / "adapter", "--out", tmp_path / "m")
    assert_one_line_error(status, err, "merge", "moved-away", "--model")


def test_the_built_in_models_hub_id_maps_to_its_alias():
    assert model_name_for("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert model_name_for("/models/mine") == "/models/mine"


def test_the_library_merge_refuses_an_output_before_loading_anything(tmp_path, tiny_llama_dir):
    from loratune.errors import ConfigError
    from loratune.models.merge import merge_to_directory

    peft_adapter(tiny_llama_dir, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="taken"):
        merge_to_directory(tmp_path / "no-such-model", [(tmp_path / "adapter", 1.0)], tmp_path / "taken")
