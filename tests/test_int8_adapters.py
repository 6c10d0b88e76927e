"""int8-compressed adapters: A and B as int8 with a float32 absmax scale per row, in
``adapter_model.int8.safetensors``. loratune loads them transparently; PEFT must refuse them loudly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import loratune
from loratune.adapters import INT8_WEIGHTS_NAME, WEIGHTS_NAME, adapter_slots, lora_layers, read_adapter
from loratune.adapters.inspect import describe_adapter
from loratune.adapters.int8 import SCALE_SUFFIX, dequantize_rows, quantize_rows
from test_cli import cli
from tiny_models import tiny_llama, token_batch

# What int8 storage may change in the logits of the tiny model, relative to what the adapter itself changes
# (‖int8 logits − float32 logits‖ / ‖float32 logits − base logits‖); docs/benchmarks.md reports smollm2-135m.
RELATIVE_LOGIT_ERROR = 0.01
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])


@pytest.fixture
def trained(tmp_path):
    """A tiny Llama with a trained-looking adapter (non-zero B), saved in float32 at tmp_path/fp32."""
    model = loratune.add_adapter(tiny_llama(), loratune.LoraConfig(init_lora_weights=False, **LORA))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, tensor in adapter_slots(model, "default"):
            tensor.mul_(0.1).add_(0.05 * torch.randn(tensor.shape, generator=generator))
    loratune.save_adapter(model, tmp_path / "fp32", base_model_name_or_path="org/tiny")
    return model, tmp_path / "fp32"


def test_quantized_rows_are_within_half_a_scale_of_the_original():
    x = torch.randn(16, 40) * torch.logspace(-4, 1, 16)[:, None]  # rows of very different magnitudes
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert int(q.abs().max()) == 127
    error = (dequantize_rows(q, scale) - x).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all()


def test_a_zero_row_stays_zero():
    x = torch.zeros(3, 5)
    x[1] = torch.arange(5.0)
    q, scale = quantize_rows(x)
    restored = dequantize_rows(q, scale)
    assert torch.equal(restored[0], torch.zeros(5)) and torch.equal(restored[2], torch.zeros(5))


def test_save_with_compress_writes_only_the_int8_file(trained, tmp_path):
    model, _ = trained
    loratune.save_adapter(model, tmp_path / "q", compress="int8")
    assert (tmp_path / "q" / INT8_WEIGHTS_NAME).is_file()
    assert not (tmp_path / "q" / WEIGHTS_NAME).exists()
    with safe_open(str(tmp_path / "q" / INT8_WEIGHTS_NAME), framework="pt") as handle:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        assert handle.get_slice(key).get_dtype() == "I8"
        assert handle.get_slice(key + SCALE_SUFFIX).get_shape() == [32]  # one scale per output row


def test_saving_plain_over_int8_removes_the_int8_file_and_back(trained, tmp_path):
    model, _ = trained
    loratune.save_adapter(model, tmp_path / "x", compress="int8")
    loratune.save_adapter(model, tmp_path / "x")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["adapter_config.json", WEIGHTS_NAME]
    loratune.save_adapter(model, tmp_path / "x", compress="int8")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["adapter_config.json", INT8_WEIGHTS_NAME]


def test_loaded_factors_are_within_the_quantization_error_bound(trained, tmp_path):
    _model, fp32_dir = trained
    loratune.compress_adapter(fp32_dir, tmp_path / "q")
    _, original = read_adapter(fp32_dir)
    with safe_open(str(tmp_path / "q" / INT8_WEIGHTS_NAME), framework="pt") as handle:
        scales = {k.removesuffix(SCALE_SUFFIX): handle.get_tensor(k) for k in handle.keys() if k.endswith(SCALE_SUFFIX)}
    fresh = tiny_llama()
    loratune.load_adapter(fresh, tmp_path / "q")
    loaded = dict(adapter_slots(fresh, "default"))
    assert loaded.keys() == original.keys() == scales.keys()
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        error = (tensor.detach() - original[key]).abs()
        assert (error <= scales[key][:, None] / 2 * (1 + 1e-6)).all(), key
        assert error.max() > 0  # really quantized


def test_int8_adapter_output_stays_within_the_reported_error(trained, tmp_path):
    _model, fp32_dir = trained
    loratune.compress_adapter(fp32_dir, tmp_path / "q")
    ids = token_batch()
    base, plain, compressed = tiny_llama(), tiny_llama(), tiny_llama()
    loratune.load_adapter(plain, fp32_dir)
    loratune.load_adapter(compressed, tmp_path / "q")
    with torch.no_grad():
        reference, exact, approx = (m(input_ids=ids).logits for m in (base, plain, compressed))
    effect = (exact - reference).norm()
    assert effect > 1e-2 * reference.norm()  # the adapter matters
    assert (approx - exact).norm() / effect <= RELATIVE_LOGIT_ERROR


def test_int8_adapter_loads_in_the_requested_dtype(trained, tmp_path):
    _, fp32_dir = trained
    loratune.compress_adapter(fp32_dir, tmp_path / "q")
    model = tiny_llama()
    loratune.load_adapter(model, tmp_path / "q", dtype=torch.bfloat16)
    assert {t.dtype for _, t in adapter_slots(model, "default")} == {torch.bfloat16}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_refuses_an_int8_adapter(trained, tmp_path):
    peft = pytest.importorskip("peft")
    _, fp32_dir = trained
    loratune.compress_adapter(fp32_dir, tmp_path / "q")
    assert (tmp_path / "q" / "adapter_config.json").is_file()  # PEFT gets as far as the weights
    # No adapter_model.safetensors: PEFT falls back to the Hub, which rejects a local path as a repo id.
    with pytest.raises((ValueError, OSError)):
        peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "q"))


def test_inspect_shows_int8_and_its_size(trained, tmp_path):
    _, fp32_dir = trained
    loratune.compress_adapter(fp32_dir, tmp_path / "q")
    plain, compressed = describe_adapter(fp32_dir), describe_adapter(tmp_path / "q")
    assert plain["compression"] is None and compressed["compression"] == "int8"
    assert compressed["dtype"] == "I8 (loads as float32)"
    assert compressed["trainable_params"] == plain["trainable_params"]
    assert compressed["size_bytes"] == (tmp_path / "q" / INT8_WEIGHTS_NAME).stat().st_size
    assert compressed["size_bytes"] < plain["size_bytes"] / 2  # tiny model: headers and scales weigh more


def test_cli_compress_then_inspect(capsys, trained, tmp_path):
    _, fp32_dir = trained
    status, out, err = cli(capsys, "compress", fp32_dir, "--out", tmp_path / "q")
    assert status == 0, err
    assert "smaller" in out
    status, out, _ = cli(capsys, "inspect", tmp_path / "q", "--json")
    info = json.loads(out)
    assert status == 0 and info["compression"] == "int8" and info["base_model"] == "org/tiny"


def test_cli_mix_int8_writes_a_compressed_adapter_that_loads(capsys, trained, tmp_path):
    _, fp32_dir = trained
    status, _, err = cli(capsys, "mix", f"{fp32_dir}:0.5", "--method", "cat", "--int8", "--out", tmp_path / "m")
    assert status == 0, err
    assert not (tmp_path / "m" / WEIGHTS_NAME).exists()
    model = tiny_llama()
    loratune.load_adapter(model, tmp_path / "m")
    assert len(list(lora_layers(model))) == 7  # q, v, down in two blocks + the embedding


# docs/benchmarks.md reports 5.1e-3 for this random adapter on smollm2-135m (5.6e-4 for the demo adapter).
SMOLLM2_RELATIVE_LOGIT_ERROR = 1e-2


@pytest.mark.integration
def test_int8_adapter_on_smollm2_stays_within_the_reported_error(use_loratune_cache, tmp_path):
    model, tokenizer = loratune.load_model("smollm2-135m", dtype="fp32", device="cpu")
    torch.manual_seed(0)
    loratune.add_adapter(model, loratune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), "fp32")
    with torch.no_grad():
        for _, tensor in adapter_slots(model, "fp32"):
            if tensor.shape[1] == 8:  # B (out × r): trained-looking, non-zero
                tensor.normal_(std=0.01)
    loratune.save_adapter(model, tmp_path / "q", "fp32", compress="int8")
    loratune.load_adapter(model, tmp_path / "q", name="int8")
    ids = tokenizer(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt").input_ids
    with torch.no_grad():
        with loratune.disabled_adapters(model):
            base = model(input_ids=ids).logits
        loratune.set_active(model, ["fp32"])
        exact = model(input_ids=ids).logits
        loratune.set_active(model, ["int8"])
        approx = model(input_ids=ids).logits
    assert (exact - base).abs().max() > 0.1  # the adapter matters
    assert (approx - exact).norm() / (exact - base).norm() <= SMOLLM2_RELATIVE_LOGIT_ERROR
