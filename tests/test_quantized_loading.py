"""4-bit loading (``load_model(..., quantize="nf4")``): checkpoints stream tensor by tensor into ``Linear4bit``
layers, giving exactly what quantizing the fully loaded model gives; what stays unquantized; bad checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.errors import ConfigError, LoratuneError, ModelNotFoundError
from loratune.models import load_model
from loratune.models.quantized import modules_to_quantize, quantize_model, quantized_summary
from loratune.quant import Linear4bit, QuantSpec, checkpoint_files, iter_tensors

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny Llama (untied head) saved in several safetensors shards."""
    from conftest import build_tiny_llama

    model = build_tiny_llama(len(tiny_tokenizer), tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(directory, max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(directory)
    return directory


def quantized_layers(model) -> dict[str, Linear4bit]:
    return {p: m for p, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_sharded_fixture_really_has_several_shards(sharded_dir):
    assert len(checkpoint_files(sharded_dir)) > 2


def test_iter_tensors_reads_the_same_tensors_as_safetensors(sharded_dir):
    for file in checkpoint_files(sharded_dir):
        expected = load_file(file)
        got = dict(iter_tensors(file))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_streaming_a_sharded_checkpoint_equals_quantizing_the_loaded_model(sharded_dir, quant_type):
    streamed, _ = load_model(sharded_dir, quantize=quant_type, dtype="fp32", compute_dtype="fp32")
    loaded, _ = load_model(sharded_dir, dtype="fp32")
    quantize_model(loaded, QuantSpec(quant_type, compute_dtype=torch.float32))
    a, b = quantized_layers(streamed), quantized_layers(loaded)
    assert a.keys() == b.keys() and len(a) == 14
    for path in a:
        assert torch.equal(a[path].weight, b[path].weight), path
        sa, sb = a[path].quant_state, b[path].quant_state
        assert torch.equal(sa.absmax, sb.absmax) and torch.equal(sa.state2.absmax, sb.state2.absmax), path
    for (name, p), (_, q) in zip(streamed.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name


def test_4bit_model_output_stays_close_to_the_full_precision_model(tiny_llama_dir):
    quantized, _ = load_model(tiny_llama_dir, quantize="nf4", dtype="fp32", compute_dtype="fp32")
    full, _ = load_model(tiny_llama_dir, dtype="fp32")
    ids = torch.tensor([[1, 5, 9, 20, 30, 7, 11]])
    with torch.no_grad():
        a, b = quantized(ids).logits, full(ids).logits
    error = float((a - b).norm() / b.norm())
    assert 0 < error < 0.25


def test_embeddings_head_and_norms_stay_unquantized_and_tied(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, quantize="nf4", dtype="fp32")
    assert {p.rsplit(".", 1)[-1] for p in quantized_layers(model)} == LINEARS
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.norm.weight.dtype == torch.float32


def test_compute_dtype_defaults_to_the_auto_dtype_policy(tiny_llama_dir):
    from loratune.models import resolve_dtype

    model, _ = load_model(tiny_llama_dir, quantize="nf4", dtype="fp32")
    assert {m.spec.compute_dtype for m in quantized_layers(model).values()} == {resolve_dtype("auto")}


def test_double_quant_can_be_turned_off(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, quantize="nf4", dtype="fp32", double_quant=False)
    assert not any(m.quant_state.nested for m in quantized_layers(model).values())


def test_named_unquantized_modules_stay_in_the_model_dtype(tiny_llama_dir):
    model, _ = load_model(
        tiny_llama_dir,
        quantize="nf4",
        dtype="fp32",
        unquantized_modules=["embeddings", "output_head", "norms", "down_proj"],
    )
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)


def test_leaving_out_the_output_head_quantizes_it(sharded_dir):
    model, _ = load_model(sharded_dir, quantize="nf4", dtype="fp32", unquantized_modules=["embeddings", "norms"])
    assert isinstance(model.lm_head, Linear4bit)


def test_unquantized_modules_without_norms_raise_config_error(tiny_llama_dir):
    with pytest.raises(ConfigError, match="norms"):
        load_model(tiny_llama_dir, quantize="nf4", unquantized_modules=["embeddings", "output_head"])


def test_quantized_summary_counts_the_storage_of_every_4bit_layer(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, quantize="nf4", dtype="fp32")
    summary = quantized_summary(model)
    assert summary["layers"] == 14
    assert summary["parameters"] == sum(m.in_features * m.out_features for m in quantized_layers(model).values())
    assert summary["bytes"] == sum(m.storage_bytes() for m in quantized_layers(model).values())
    assert summary["bytes_per_parameter"] == summary["bytes"] / summary["parameters"]


# --- checkpoints that cannot be loaded in 4 bits ---------------------------------------------------------------------


def _rewrite(model_dir, tmp_path, change):
    """A copy of ``model_dir`` whose single safetensors file went through ``change(tensors)``."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    tensors = load_file(copy / "model.safetensors")
    change(tensors)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def test_integer_linear_weight_raises_config_error_naming_the_tensor(tiny_llama_dir, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = _rewrite(tiny_llama_dir, tmp_path, lambda t: t.update({name: t[name].to(torch.int8)}))
    with pytest.raises(ConfigError, match=f"{name}.*int8"):
        load_model(bad, quantize="nf4")


def test_linear_weight_of_the_wrong_shape_raises_naming_it(tiny_llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _rewrite(tiny_llama_dir, tmp_path, lambda t: t.update({name: t[name][:, :16].contiguous()}))
    with pytest.raises(LoratuneError, match=f"{name}.*does not match"):
        load_model(bad, quantize="nf4")


def test_missing_and_unknown_tensors_are_named(tiny_llama_dir, tmp_path):
    def change(tensors):
        tensors["model.layers.0.extra.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")

    bad = _rewrite(tiny_llama_dir, tmp_path, change)
    with pytest.raises(LoratuneError, match="missing.*gate_proj.*no place for.*extra"):
        load_model(bad, quantize="nf4")


def test_directory_without_safetensors_raises_model_not_found(tiny_llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(copy, quantize="nf4")


def test_modules_to_quantize_skips_the_output_head_by_default(tiny_llama_dir):
    full, _ = load_model(tiny_llama_dir, dtype="fp32")
    paths = modules_to_quantize(full)
    assert "lm_head" not in paths and len(paths) == 14


def test_parameter_report_counts_4bit_weights_as_their_full_parameter_count(tiny_llama_dir):
    import loratune
    from loratune.adapters import parameter_report

    full, _ = load_model(tiny_llama_dir, dtype="fp32")
    quantized, _ = load_model(tiny_llama_dir, quantize="nf4", dtype="fp32")
    config = loratune.LoraConfig(r=2)
    loratune.add_adapter(full, config)
    loratune.add_adapter(quantized, config)
    assert parameter_report(quantized).total == parameter_report(full).total
    assert parameter_report(quantized).trainable == parameter_report(full).trainable
