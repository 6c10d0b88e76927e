"""QLoRA end to end: training over a 4-bit base (``model.quantize``), the adapter it writes (ordinary PEFT format,
loads over the full-precision base and in PEFT over a bitsandbytes 4-bit base), and ``loratune merge`` over a
4-bit base (dequantize + float32 merge, or explicit re-quantization with its error reported)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import load_file

import loratune
from loratune.cli.main import main
from loratune.errors import ConfigError
from loratune.quant import Linear4bit
from run_helpers import addition_rows, config_dict, write_config, write_jsonl

IDS = torch.tensor([[1, 40, 41, 42, 7, 9, 60, 2]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def train_run(model_dir, root, name, quantize):
    data = write_jsonl(root / "chat.jsonl", addition_rows(8))
    config = write_config(
        root / f"{name}.yaml",
        config_dict(
            model_dir,
            data,
            root / name,
            model={"quantize": quantize, "dtype": "fp32", "compute_dtype": "fp32"},
            lora={"target_modules": "all-linear"},
            train={"max_steps": 4, "lr": 0.05},
        ),
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["train", str(config), "--no-progress"])
    assert status == 0, out.getvalue()
    return root / name


@pytest.fixture(scope="module")
def model_dir(make_tiny_llama_dir):
    """The tiny Llama made 64 wide: bitsandbytes' CPU kernels (used by PEFT's 4-bit base) need whole blocks of
    64 input features."""
    return make_tiny_llama_dir(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def qlora_run(model_dir, tmp_path_factory):
    return train_run(model_dir, tmp_path_factory.mktemp("qlora"), "nf4", "nf4")


@pytest.fixture(scope="module")
def qlora_model(model_dir, qlora_run):
    """The 4-bit base (fp32 compute) with the trained adapter: what training saw."""
    model, _ = loratune.load_model(model_dir, quantize="nf4", dtype="fp32", compute_dtype="fp32")
    loratune.load_adapter(model, qlora_run / "adapter")
    return model.eval()


def test_qlora_run_records_the_4bit_options_in_its_config(qlora_run):
    import yaml

    model = yaml.safe_load((qlora_run / "config.yaml").read_text())["model"]
    assert model["quantize"] == "nf4" and model["double_quant"] is True
    assert model["unquantized_modules"] == ["embeddings", "output_head", "norms"]


def test_qlora_adapter_has_the_same_keys_and_shapes_as_a_lora_adapter(qlora_run, model_dir, tmp_path):
    lora_run = train_run(model_dir, tmp_path, "plain", None)
    q = load_file(qlora_run / "adapter" / "adapter_model.safetensors")
    p = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in q.items()} == {k: v.shape for k, v in p.items()}
    assert json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_qlora_training_changed_the_4bit_model(qlora_model, model_dir):
    base, _ = loratune.load_model(model_dir, quantize="nf4", dtype="fp32", compute_dtype="fp32")
    assert rel(logits(qlora_model), logits(base)) > 0.05


def test_qlora_adapter_over_the_full_precision_base_behaves_the_same_up_to_quantization_error(
    qlora_model, qlora_run, model_dir
):
    full, _ = loratune.load_model(model_dir, dtype="fp32")
    loratune.load_adapter(full, qlora_run / "adapter")
    base, _ = loratune.load_model(model_dir, dtype="fp32")
    error = rel(logits(full), logits(qlora_model))
    assert error < 0.25  # of the order of the 4-bit base's own error
    assert error < rel(logits(base), logits(qlora_model))  # closer than the base without the adapter


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_qlora_adapter_loads_in_peft_over_a_bitsandbytes_4bit_base(qlora_model, qlora_run, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=bnb, dtype=torch.float32, device_map="cpu"
    )
    peft_model = PeftModel.from_pretrained(base, str(qlora_run / "adapter")).eval()
    # Same NF4 codes from the same float32 weights; bitsandbytes' CPU kernel rounds the block scales to bf16,
    # hence agreement to ~1e-2 rather than float rounding — still far below what the adapter changes (> 0.05).
    assert rel(logits(peft_model), logits(qlora_model)) < 0.02


# --- merge over a 4-bit base -----------------------------------------------------------------------------------


def test_merge_over_a_4bit_base_matches_the_unmerged_4bit_model(capsys, qlora_model, qlora_run, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert (
        main(
            [
                "merge",
                "--model",
                str(model_dir),
                "--quantize",
                "nf4",
                "--adapter",
                str(qlora_run / "adapter"),
                "--out",
                str(out),
                "--out-dtype",
                "fp32",
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert rel(logits(merged), logits(qlora_model)) <= 1e-5


def test_merge_over_a_4bit_base_writes_the_float32_merge_rounded_to_bf16_by_default(qlora_run, model_dir, tmp_path):
    merge = ["merge", "--model", str(model_dir), "--quantize", "nf4", "--adapter", str(qlora_run / "adapter")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*merge, "--out", str(tmp_path / "bf16")]) == 0
        assert main([*merge, "--out", str(tmp_path / "fp32"), "--out-dtype", "fp32"]) == 0
    bf16, fp32 = load_file(tmp_path / "bf16" / "model.safetensors"), load_file(tmp_path / "fp32" / "model.safetensors")
    assert bf16.keys() == fp32.keys()
    for key in fp32:
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bf16[key], fp32[key].to(torch.bfloat16)), key


def test_requantized_merge_loads_in_4bit_and_reports_the_error_it_adds(capsys, qlora_run, model_dir, tmp_path):
    import re

    merge = ["merge", "--model", str(model_dir), "--quantize", "nf4", "--adapter", str(qlora_run / "adapter")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*merge, "--out", str(tmp_path / "fp32"), "--out-dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main([*merge, "--out", str(tmp_path / "nf4"), "--requantize"]) == 0
    printed = capsys.readouterr().out
    reported = float(re.search(r"relative weight error of ([0-9.]+)", printed).group(1))
    assert "the size of the merged adapter change" in printed

    requantized, _ = loratune.load_model(tmp_path / "nf4", quantize="nf4", dtype="fp32")
    merged = load_file(tmp_path / "fp32" / "model.safetensors")
    layers = {p: m for p, m in requantized.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 14
    err = sum(
        float((m.dequantized_weight(torch.float32) - merged[f"{p}.weight"]).norm()) ** 2 for p, m in layers.items()
    )
    ref = sum(float(merged[f"{p}.weight"].norm()) ** 2 for p in layers)
    assert reported == pytest.approx((err / ref) ** 0.5, abs=1e-4)
    assert 0 < reported < 0.15


def test_a_model_stored_in_4bits_refuses_to_load_unquantized(qlora_run, model_dir, tmp_path):
    out = tmp_path / "requantized"
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "merge",
                    "--model",
                    str(model_dir),
                    "--quantize",
                    "nf4",
                    "--adapter",
                    str(qlora_run / "adapter"),
                    "--out",
                    str(out),
                    "--requantize",
                ]
            )
            == 0
        )
    with pytest.raises(ConfigError, match="stored in 4 bits.*quantize='nf4'"):
        loratune.load_model(out)


def test_requantize_without_a_4bit_base_is_a_one_line_error(capsys, qlora_run, model_dir, tmp_path):
    capsys.readouterr()
    status = main(
        [
            "merge",
            "--model",
            str(model_dir),
            "--adapter",
            str(qlora_run / "adapter"),
            "--out",
            str(tmp_path / "x"),
            "--requantize",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--quantize nf4" in err[0]


def test_config_rejects_unquantized_modules_without_norms(model_dir, tmp_path):
    from loratune.train import load_config, train

    data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(4))
    config = write_config(
        tmp_path / "c.yaml",
        config_dict(
            model_dir, data, tmp_path / "run", model={"quantize": "nf4", "unquantized_modules": ["embeddings"]}
        ),
    )
    with pytest.raises(ConfigError, match="norms"):
        train(load_config(config), progress=False, log=lambda line: None)


def test_gradient_checkpointing_over_a_4bit_base_gives_the_same_adapter(model_dir, tmp_path):
    def run(name, checkpointing):
        data = write_jsonl(tmp_path / "chat.jsonl", addition_rows(8))
        config = write_config(
            tmp_path / f"{name}.yaml",
            config_dict(
                model_dir,
                data,
                tmp_path / name,
                model={"quantize": "nf4", "dtype": "fp32", "compute_dtype": "fp32"},
                train={"max_steps": 2, "lr": 0.05, "gradient_checkpointing": checkpointing},
            ),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", str(config), "--no-progress"]) == 0
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")

    plain, checkpointed = run("plain", False), run("checkpointed", True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batches_work_over_a_4bit_base(model_dir, qlora_run):
    model, _ = loratune.load_model(model_dir, quantize="nf4", dtype="fp32", compute_dtype="fp32")
    loratune.load_adapter(model, qlora_run / "adapter", name="a")
    loratune.load_adapter(model, qlora_run / "adapter", name="b", scale=-1.0)
    ids = IDS.repeat(3, 1)
    loratune.set_active(model, "a")  # one active adapter: the fused 4-bit path, which must yield to the rows
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["b", "__base__", "a"]).logits.float()
        loratune.set_active(model, "a")
        only_a = logits(model)
        loratune.set_active(model, "b")
        only_b = logits(model)
        with loratune.disabled_adapters(model):
            base = logits(model)
    for row, expected in enumerate([only_b, base, only_a]):
        torch.testing.assert_close(mixed[row], expected[0], rtol=1e-5, atol=1e-5)
    assert rel(only_a, base) > 1e-3
