"""DoRA: the layer math against its dense definition, every execution backend against the reference, strength,
merge/unmerge, mixed batches, and interoperability with real PEFT (both ways, Linear, Conv1D, Embedding and
a bitsandbytes 4-bit base; merged and unmerged; one training step)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import loratune
from loratune.errors import ConfigError
from loratune.layers import LoraConv1D, LoraEmbedding, LoraLinear, Routing
from loratune.layers.execution import trace
from test_cli import assert_one_line_error, cli
from tiny_models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

ATOL = 1e-5


# --- the layer --------------------------------------------------------------------------------------------------


def dora_layer(kind: str = "linear", *, strength: float = 1.0, seed: int = 0):
    """A layer with one DoRA adapter "d" (random A, B and magnitude), its frozen base and its dense definition."""
    torch.manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(16, 12)
    elif kind == "conv1d":
        base = tiny_gpt2(seed).transformer.h[0].attn.c_attn
    else:
        base = nn.Embedding(20, 6)
    base.requires_grad_(False)
    wrap = {"linear": LoraLinear, "conv1d": LoraConv1D, "embedding": LoraEmbedding}[kind]
    layer = wrap(copy.deepcopy(base))
    layer.add_adapter("d", 4, 8, init=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].mul_(torch.rand(layer.out_features) + 0.5)
    layer.set_active(("d",))
    layer.set_strength("d", strength)
    return layer, base


def dense_dora_weight(layer, name: str = "d") -> torch.Tensor:
    """``m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c`` formed densely (out × in), the norm detached: the paper's definition."""
    W0 = layer.weight_layout(layer.base_weight)  # out × in
    V = W0 + layer.specs[name].scaling * layer.lora_B[name] @ layer.lora_A[name]
    return layer.lora_magnitude_vector[name][:, None] * V / V.norm(dim=1, keepdim=True).detach()


def dense_output(layer, base, x, strength: float = 1.0):
    W0 = layer.weight_layout(base.weight)
    W = W0 + strength * (dense_dora_weight(layer) - W0)
    if isinstance(base, nn.Embedding):
        return nn.functional.embedding(x, W.T, base.padding_idx)
    bias = base.bias
    return x @ W.T + (0 if bias is None else bias)


def inputs(kind: str, rows: int = 3, length: int = 50):
    if kind == "embedding":
        return torch.randint(0, 20, (rows, length))
    features = 16 if kind == "linear" else 32
    return torch.randn(rows, length, features, requires_grad=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_reference_forward_and_gradients_are_the_dense_definition(kind, strength):
    layer, base = dora_layer(kind, strength=strength)
    x = inputs(kind)
    out = layer.reference_forward(x)
    expected = dense_output(layer, base, x, strength)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    params = [layer.lora_A["d"], layer.lora_B["d"], layer.lora_magnitude_vector["d"]]
    grad = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_fused_training_path_matches_the_reference_with_gradients(kind, strength):
    layer, _ = dora_layer(kind, strength=strength)
    x = inputs(kind)
    with trace() as backends:
        out = layer(x)
    assert backends == ["fused"]
    ref = layer.reference_forward(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    params = [x, layer.lora_A["d"], layer.lora_B["d"], layer.lora_magnitude_vector["d"]]
    grad = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 50])  # one decoding step (the CPU kernel) and a prefill (a plan)
def test_no_grad_plans_match_the_reference_alone_and_in_a_mixed_batch(length):
    layer, _ = dora_layer("linear", strength=0.7)
    layer.add_adapter("plain", 2, 4, init=False)
    x = inputs("linear", rows=4, length=length).detach()
    with torch.no_grad():
        with trace() as backends:
            alone = layer(x)
        assert backends in (["plan"], ["kernel"])
        torch.testing.assert_close(alone, layer.reference_forward(x), atol=1e-6, rtol=1e-5)
        layer.set_routing(Routing(("d", "plain", "__base__", "d")))
        with trace() as backends:
            mixed = layer(x)
        assert backends in (["plan"], ["kernel"])
        torch.testing.assert_close(mixed, layer.reference_forward(x), atol=1e-6, rtol=1e-5)
        layer.set_routing(None)
        for row, name in enumerate(("d", "plain", None, "d")):
            layer.set_active(() if name is None else (name,))
            torch.testing.assert_close(mixed[row], layer(x[row : row + 1])[0], atol=1e-6, rtol=1e-5)


def test_strength_scales_the_weight_change_so_zero_is_the_base():
    layer, base = dora_layer("linear", strength=0.0)
    x = inputs("linear").detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x))
        layer.set_strength("d", 1.0)
        assert (layer(x) - base(x)).abs().max() > 1e-2  # not vacuous


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_merge_gives_the_unmerged_output_and_unmerge_restores_the_weight(kind):
    layer, base = dora_layer(kind, strength=0.8)
    x = inputs(kind)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge("d")
        torch.testing.assert_close(layer(x), unmerged, atol=2e-6, rtol=1e-5)
        layer.unmerge("d")
        torch.testing.assert_close(layer.base_weight, base.weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-6)


def test_a_dora_adapter_merges_first_and_unmerges_last_beside_plain_lora():
    model = tiny_llama(0)
    loratune.add_adapter(model, loratune.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "plain")
    loratune.add_adapter(
        model, loratune.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False), "dora"
    )
    ids = token_batch(1)
    loratune.set_active(model, ["plain", "dora"])
    original = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with torch.no_grad():
        expected = model(ids).logits
        loratune.merge(model)
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        loratune.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, original, atol=1e-6, rtol=0)
    layer = model.model.layers[0].self_attn.q_proj
    layer.merge("plain")
    with pytest.raises(ConfigError, match="merge the DoRA adapter first"):
        layer.merge("dora")
    with pytest.raises(ConfigError, match="unmerge them first"), torch.no_grad():
        layer.set_active(("dora",))
        layer(torch.randn(1, 2, 32))


def test_dora_with_a_pissa_start_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="use_dora cannot start from"):
        loratune.LoraConfig(use_dora=True, init_lora_weights="pissa")


# --- PEFT interoperability --------------------------------------------------------------------------------------


def untied_llama(seed: int = 0):
    return tiny_llama(seed, tie=False)  # PEFT merging into a tied embedding would change the output head too


CASES = {
    "linear": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "embedding": (untied_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])),
    "conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "rslora_patterns": (
        tiny_llama,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["k_proj", "up_proj"],
            rank_pattern={"up_proj": 2},
            alpha_pattern={"k_proj": 3},
        ),
    ),
}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(model, seed: int = 7, size: float = 0.1) -> None:
    """Stand-in for training: noise on every trainable tensor (A, B and the magnitudes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(size * torch.randn(param.shape, generator=generator))


def assert_close_logits(ours, theirs, base):
    assert (theirs - base).abs().max() > 1e-3, "the adapter does not change the logits; the test is vacuous"
    difference = (ours - theirs).abs().max().item()
    assert difference <= ATOL, f"max abs logit difference {difference:.3g} > {ATOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_adapter_loads_in_loratune_with_the_same_logits_merged_and_unmerged(case, tmp_path):
    build, lora = CASES[case]
    source = peft.get_peft_model(build(0), peft.LoraConfig(use_dora=True, init_lora_weights=False, **lora))
    perturb(source)
    source.eval()
    ids = token_batch(1)
    expected = logits(source, ids)
    source.save_pretrained(tmp_path, save_embedding_layers=False)
    model = build(0)
    base = logits(model, ids)
    loratune.load_adapter(model, tmp_path)
    assert loratune.adapters.read_adapter_config(tmp_path).use_dora
    assert_close_logits(logits(model, ids), expected, base)
    loratune.merge(model)
    merged_peft = source.merge_and_unload()
    assert_close_logits(logits(model, ids), logits(merged_peft, ids), base)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loratune_dora_adapter_loads_in_peft_with_the_same_logits_merged_and_unmerged(case, tmp_path):
    build, lora = CASES[case]
    model = loratune.add_adapter(build(0), loratune.LoraConfig(use_dora=True, init_lora_weights=False, **lora))
    perturb(model)
    model.eval()
    ids = token_batch(1)
    expected = logits(model, ids)
    loratune.save_adapter(model, tmp_path)
    base_model = build(0)
    base = logits(base_model, ids)
    loaded = peft.PeftModel.from_pretrained(base_model, str(tmp_path)).eval()
    assert loaded.peft_config["default"].use_dora
    assert_close_logits(logits(loaded, ids), expected, base)
    loratune.merge(model)
    assert_close_logits(logits(model, ids), logits(loaded.merge_and_unload(), ids), base)


def test_loratune_writes_peft_dora_keys_and_shapes(tmp_path):
    build, lora = CASES["embedding"]
    peft.get_peft_model(build(0), peft.LoraConfig(use_dora=True, **lora)).save_pretrained(
        tmp_path / "peft", save_embedding_layers=False
    )
    loratune.save_adapter(loratune.add_adapter(build(0), loratune.LoraConfig(use_dora=True, **lora)), tmp_path / "ours")
    from safetensors.torch import load_file

    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in ours)
    for key in theirs:  # a fresh DoRA adapter starts with the base's row norms, in both libraries
        if key.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(ours[key], theirs[key])


def test_dora_training_steps_equal_peft_s(tmp_path):
    build, lora = CASES["linear"]
    start = peft.get_peft_model(build(0), peft.LoraConfig(use_dora=True, init_lora_weights=False, **lora))
    perturb(start)
    start.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(0), str(tmp_path), is_trainable=True).train()
    ours = build(0).requires_grad_(False).train()  # only the adapter trains: the fused path runs
    loratune.load_adapter(ours, tmp_path, trainable=True)
    layer = ours.model.layers[0].self_attn.q_proj
    with trace() as backends:
        layer(torch.randn(1, 2, layer.in_features))
    assert backends == ["fused"]
    ids = token_batch(2, batch=3, length=12)
    losses = []
    for model in (theirs, ours):
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (32 * 4 + 4 * 32 + 32) + 2 * (
            16 * 4 + 4 * 32 + 16
        ) + 2 * (32 * 4 + 4 * 64 + 32)  # q, v, down: A, B and m in 2 blocks, nothing else
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses.append([])
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[-1].append(loss.item())
    for theirs_loss, ours_loss in zip(*losses):
        assert abs(ours_loss - theirs_loss) <= 1e-5 * abs(theirs_loss)
    updated_p = peft.get_peft_model_state_dict(theirs)
    updated_o = loratune.adapters.adapter_state(ours, "default")
    assert updated_o.keys() == updated_p.keys() and len(updated_o) == 18  # A, B, m on 3 modules in 2 blocks
    before = read_tensors(tmp_path)
    for key, value in updated_p.items():
        assert (value - before[key]).abs().max() > 1e-4  # the steps moved it: not vacuous
        assert ((updated_o[key] - value).norm() / value.norm()).item() <= 1e-5, key


def read_tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


# --- over a 4-bit base (QDoRA) ----------------------------------------------------------------------------------

QDORA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def four_bit_llama(library: str):
    """The tiny Llama, 64 wide (bitsandbytes' CPU kernels need whole blocks of 64), with the DoRA targets stored in
    NF4 (double quantization, float32 compute): as loratune's ``Linear4bit`` or bitsandbytes' (for PEFT). Both
    quantize the same float32 weights with bitsandbytes, so they hold the same codes."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    from loratune.quant import Linear4bit, QuantSpec

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in QDORA_TARGETS:
            if library == "loratune":
                quantized = Linear4bit.from_linear(module, QuantSpec("nf4", True, torch.float32))
            else:
                quantized = bnb.nn.Linear4bit(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    compute_dtype=torch.float32,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                quantized.weight = bnb.nn.Params4bit(
                    module.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                quantized = quantized.to("cpu")  # quantizes
                # bitsandbytes repacks a CPU layer for inference on its first no-grad call, rounding the block
                # scales to bf16; keep its exact dequantization so that the comparison measures DoRA
                quantized.support_avx512bf16_for_cpu = False
            model.set_submodule(path, quantized)
    return model


def test_both_4bit_bases_hold_the_same_weights():
    from bitsandbytes.functional import dequantize_4bit

    ours, theirs = four_bit_llama("loratune"), four_bit_llama("bitsandbytes")
    ours_q, theirs_q = ours.model.layers[1].mlp.down_proj, theirs.model.layers[1].mlp.down_proj
    torch.testing.assert_close(
        ours_q.dequantized_weight(torch.float32),
        dequantize_4bit(theirs_q.weight.data, theirs_q.weight.quant_state),
        atol=0,
        rtol=0,
    )


def test_qdora_adapters_give_peft_s_logits_both_ways(tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=QDORA_TARGETS)
    ids = token_batch(1)
    source = peft.get_peft_model(
        four_bit_llama("bitsandbytes"), peft.LoraConfig(use_dora=True, init_lora_weights=False, **lora)
    )
    perturb(source)
    source.eval()
    source.save_pretrained(tmp_path / "from_peft")
    ours = four_bit_llama("loratune")
    base = logits(ours, ids)
    loratune.load_adapter(ours, tmp_path / "from_peft")
    assert_close_logits(logits(ours, ids), logits(source, ids), base)

    trained = loratune.add_adapter(
        four_bit_llama("loratune"), loratune.LoraConfig(use_dora=True, init_lora_weights=False, **lora)
    )
    perturb(trained, seed=11)
    loratune.save_adapter(trained.eval(), tmp_path / "from_loratune")
    loaded = peft.PeftModel.from_pretrained(four_bit_llama("bitsandbytes"), str(tmp_path / "from_loratune")).eval()
    assert_close_logits(logits(loaded, ids), logits(trained, ids), base)


def test_qdora_magnitudes_start_from_the_dequantized_weight_as_in_peft(tmp_path):
    lora = dict(r=4, lora_alpha=8, target_modules=QDORA_TARGETS)
    peft.get_peft_model(four_bit_llama("bitsandbytes"), peft.LoraConfig(use_dora=True, **lora)).save_pretrained(
        tmp_path / "peft"
    )
    loratune.save_adapter(
        loratune.add_adapter(four_bit_llama("loratune"), loratune.LoraConfig(use_dora=True, **lora)), tmp_path / "ours"
    )
    theirs, ours = read_tensors(tmp_path / "peft"), read_tensors(tmp_path / "ours")
    magnitudes = [k for k in theirs if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 6
    for key in magnitudes:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6)


def test_a_qdora_adapter_merged_into_the_dequantized_base_gives_the_4bit_model_s_logits(tmp_path):
    from loratune.models.merge_4bit import dequantize_model

    lora = loratune.LoraConfig(r=4, lora_alpha=8, target_modules=QDORA_TARGETS, use_dora=True, init_lora_weights=False)
    trained = loratune.add_adapter(four_bit_llama("loratune"), lora)
    perturb(trained)
    loratune.save_adapter(trained.eval(), tmp_path)
    ids = token_batch(1)
    merged = four_bit_llama("loratune")
    base = logits(merged, ids)
    dequantize_model(merged)  # what `loratune merge` does over a 4-bit base
    loratune.load_adapter(merged, tmp_path)
    loratune.merge(merged)
    assert_close_logits(logits(merged, ids), logits(trained, ids), base)


# --- the adapter tools ------------------------------------------------------------------------------------------


@pytest.fixture
def dora_adapter(tiny_llama_dir, tmp_path):
    model, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    loratune.add_adapter(
        model, loratune.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    )
    perturb(model)
    return loratune.save_adapter(model, tmp_path / "dora")


def test_inspect_says_an_adapter_is_dora_and_counts_its_magnitudes(capsys, dora_adapter):
    status, out, _ = cli(capsys, "inspect", dora_adapter, "--json")
    report = json.loads(out)
    assert status == 0 and report["use_dora"] is True
    assert report["trainable_params"] == 2 * (4 * 32 + 32 * 4 + 32) + 2 * (4 * 32 + 16 * 4 + 16)  # A, B, m of q, v


def test_an_int8_compressed_dora_adapter_keeps_its_magnitudes_exactly(capsys, dora_adapter, tiny_llama_dir, tmp_path):
    status, _, err = cli(capsys, "compress", dora_adapter, "--out", tmp_path / "int8")
    assert status == 0, err
    full, small = (loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")[0] for _ in range(2))
    loratune.load_adapter(full, dora_adapter)
    loratune.load_adapter(small, tmp_path / "int8")
    for (_, a), (_, b) in zip(loratune.adapters.lora_layers(full), loratune.adapters.lora_layers(small)):
        torch.testing.assert_close(
            b.lora_magnitude_vector["default"], a.lora_magnitude_vector["default"], atol=0, rtol=0
        )
    ids = token_batch(1)
    assert (logits(small, ids) - logits(full, ids)).abs().max() < 1e-2


@pytest.mark.parametrize("verb", ["mix", "export-gguf"])
def test_tools_undefined_for_dora_refuse_it_in_one_line(capsys, verb, dora_adapter, tiny_llama_dir, tmp_path):
    if verb == "mix":
        args = ["mix", f"{dora_adapter}:0.5", f"{dora_adapter}:0.5", "--method", "linear", "--out", tmp_path / "mixed"]
    else:
        args = ["export-gguf", dora_adapter, "--model", tiny_llama_dir, "--out", tmp_path / "a.gguf"]
    status, _, err = cli(capsys, *args)
    assert_one_line_error(status, err, verb, "DoRA")
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_loratune_merge_writes_a_model_that_gives_the_dora_adapter_s_logits(
    capsys, strength, dora_adapter, tiny_llama_dir, tmp_path
):
    from transformers import AutoModelForCausalLM

    status, _, err = cli(
        capsys,
        "merge",
        "--model",
        tiny_llama_dir,
        "--adapter",
        f"{dora_adapter}:{strength}",
        "--out",
        tmp_path / "merged",
    )
    assert status == 0, err
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    adapted, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    loratune.load_adapter(adapted, dora_adapter, scale=strength)
    base, _ = loratune.load_model(str(tiny_llama_dir), dtype="fp32", device="cpu")
    ids = token_batch(1)
    assert_close_logits(logits(merged, ids), logits(adapted, ids), logits(base, ids))
