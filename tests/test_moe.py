"""LoRA on the experts of mixture-of-experts models (PEFT's ``target_parameters``).

Every family transformers 5 ships with fused 3-D expert weights that we test (Qwen3-MoE, Mixtral, gpt-oss with its
transposed layout and biases, OLMoE, DeepSeek-V3 with shared experts) as a tiny random model: the grouped expert
path against the reference definition (the module's forward with W + ΔW), adapters crossing to and from the real
PEFT merged and unmerged, merging into the fused weights, mixed-adapter batches, the refusals, and a training run.
"""

from __future__ import annotations

import copy
import json
import math
import queue
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_llama, build_tiny_tokenizer
from loratune.adapters import (
    LoraConfig,
    adapters_of,
    add_adapter,
    expert_report,
    load_adapter,
    merge_adapters,
    mix_adapter_dirs,
    read_adapter,
    save_adapter,
    unmerge_adapters,
)
from loratune.adapters.gguf_export import GgufBase, gguf_lora_tensors
from loratune.adapters.inspect import describe_adapter
from loratune.adapters.peft_format import write_adapter
from loratune.adapters.surgery import lora_layers
from loratune.analysis import adapter_spectrum, compare_adapters, resize_adapter
from loratune.errors import ConfigError, LoratuneError
from loratune.inference.engine import Engine
from loratune.inference.sequence import Finished, SamplingParams, Sequence
from loratune.layers import AdaptedModule, LoraLayer, LoraParameter, execution
from loratune.layers import experts as expert_layers
from loratune.layers.experts import Routed, group_granule, recompute_expert_layers, recompute_in_backward
from loratune.models.merge_4bit import dequantize_model
from loratune.models.quantized import quantize_model
from loratune.models.streamed import load_streamed
from loratune.models.upcycle import upcycle_to_mixtral
from loratune.quant import QuantSpec
from loratune.quant.experts4bit import Experts4bit
from loratune.train import train
from loratune.train.fused_ops import patch_for_training
from run_helpers import addition_rows, write_jsonl
from test_train import make_config
from tiny_models import MOE_KINDS, VOCAB, tiny_moe, token_batch

peft = pytest.importorskip("peft")

ATOL = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def lora(kind: str, **overrides) -> LoraConfig:
    """All-linear rank-4 LoRA with random B, so that every expert factor changes the output. DeepSeek-V3's shared
    experts are left out where PEFT must judge: PEFT reads their Linears as expert projections (peft#3711)."""
    extra = {"exclude_modules": r".*shared_experts.*"} if kind == "deepseek_v3" else {}
    return LoraConfig(**{"r": 4, "init_lora_weights": False, **extra, **overrides})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def reference_logits(model, ids):
    """Logits with every adapted experts module run by its reference definition (``W + ΔW`` in its own forward)."""
    modules = [m for m in model.modules() if isinstance(m, AdaptedModule)]
    for module in modules:
        module.forward = module.reference_forward
    try:
        return model(ids).logits
    finally:
        for module in modules:
            del module.forward


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_grouped_expert_path_equals_the_reference_in_outputs_and_gradients(kind):
    model = tiny_moe(kind)
    add_adapter(model, lora(kind))
    ids = token_batch(batch=3)
    with execution.trace() as ran:
        fast = model(ids).logits
    assert "experts" in ran
    fast_grads = torch.autograd.grad(fast.square().sum(), [p for p in model.parameters() if p.requires_grad])
    reference = reference_logits(model, ids)
    reference_grads = torch.autograd.grad(reference.square().sum(), [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(fast, reference, atol=ATOL, rtol=1e-5)
    for a, b in zip(fast_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (fast - logits(tiny_moe(kind), ids)).abs().max() > 1e-2  # the adapter does change the output


def test_padded_expert_groups_route_and_combine_every_copy_once():
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 5, (23, 2), generator=generator)
    weights = torch.rand(23, 2, generator=generator)
    plain, padded = Routed(index, weights, 5), Routed(index, weights, 5, granule=4)
    assert all(c % 4 == 0 for c in padded.counts) and sum(padded.counts) > sum(plain.counts) == 46
    assert padded.offsets.tolist() == torch.tensor(padded.counts).cumsum(0).tolist()
    # each group holds its expert's copies, then weightless padding
    for e, (start, end) in enumerate(zip([0, *padded.offsets[:-1].tolist()], padded.offsets.tolist(), strict=True)):
        assert (padded.experts[start:end] == e).all()
    hidden = torch.randn(23, 6, generator=generator)
    out = hidden.index_select(0, padded.tokens) * (1 + padded.experts.unsqueeze(1))  # a per-expert function
    expected = plain.combine(hidden.index_select(0, plain.tokens) * (1 + plain.experts.unsqueeze(1)))
    torch.testing.assert_close(padded.combine(out), expected)


def test_expert_groups_are_padded_only_for_half_precision_cpu_products_of_large_groups():
    cpu = torch.device("cpu")
    assert group_granule(4096, 16, torch.bfloat16, cpu) == 64  # a training batch: a quarter of 256, at most 64
    assert group_granule(16384, 128, torch.float16, cpu) == 32
    assert group_granule(4096, 64, torch.bfloat16, cpu) == 16
    assert group_granule(16, 16, torch.bfloat16, cpu) == 1  # decoding a few tokens
    assert group_granule(4096, 16, torch.float32, cpu) == 1  # fp32 products are not oneDNN's
    assert group_granule(4096, 16, torch.bfloat16, torch.device("meta")) == 1


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_padded_expert_groups_compute_the_same_outputs_and_gradients(kind, monkeypatch):
    model = tiny_moe(kind)
    add_adapter(model, lora(kind))
    ids = token_batch(batch=3)
    trained = [p for p in model.parameters() if p.requires_grad]

    def run(granule):
        monkeypatch.setattr(expert_layers, "group_granule", lambda *_: granule)
        out = model(ids).logits
        return out, torch.autograd.grad(out.square().sum(), trained)

    (padded, padded_grads), (plain, plain_grads) = run(8), run(1)
    torch.testing.assert_close(padded, plain, atol=ATOL, rtol=1e-5)
    for a, b in zip(padded_grads, plain_grads, strict=True):  # the same sums, in another order
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def saved_bytes_and_grads(model, ids, recompute: bool):
    """(bytes the forward keeps for backward, gradients of every trainable parameter) of one training step."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with recompute_in_backward(recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).logits.square().sum()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = sum(size for pointer, size in saved.items() if pointer not in weights)
    return kept, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_recomputing_expert_blocks_in_backward_keeps_less_and_changes_no_gradient(kind):
    model = tiny_moe(kind)
    add_adapter(model, lora(kind))
    model.train()
    ids = token_batch(batch=3)
    kept, grads = saved_bytes_and_grads(model, ids, recompute=False)
    kept_recomputing, grads_recomputing = saved_bytes_and_grads(model, ids, recompute=True)
    for a, b in zip(grads, grads_recomputing, strict=True):
        assert torch.equal(a, b)
    assert kept_recomputing < 0.75 * kept


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_recomputing_moe_layers_keeps_less_than_recomputing_expert_blocks_and_changes_no_gradient(kind):
    model = tiny_moe(kind)
    add_adapter(model, lora(kind))
    model.train()
    ids = token_batch(batch=3)
    kept_blocks, grads = saved_bytes_and_grads(model, ids, recompute=True)
    assert recompute_expert_layers(model) == model.config.num_hidden_layers
    kept_layers, grads_layers = saved_bytes_and_grads(model, ids, recompute=False)
    for a, b in zip(grads, grads_layers, strict=True):
        assert torch.equal(a, b)
    assert kept_layers < 0.5 * kept_blocks


def test_recompute_expert_layers_leaves_a_dense_model_alone():
    model = build_tiny_llama(VOCAB)
    assert recompute_expert_layers(model) == 0
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_all_linear_adapts_every_expert_stack_and_not_the_router(kind):
    model = tiny_moe(kind)
    add_adapter(model, LoraConfig(r=4))
    entry = adapters_of(model)["default"]
    stacks = {key.rpartition(".")[2] for key in entry.parameter_paths}
    assert stacks == {"gate_up_proj", "down_proj"}
    assert len(entry.parameter_paths) == 2 * 2  # two stacks in each of the two blocks
    assert not any(path.endswith(("router", "gate")) for path in entry.lora_paths)
    assert "LoRA on down_proj, gate_up_proj of 2 of 2 MoE blocks" in expert_report(model)


def test_a_target_list_without_experts_is_reported_in_one_line():
    model = tiny_moe("qwen3_moe")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = expert_report(model)
    assert report.startswith("experts: NOT adapted") and "target_parameters" in report


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_expert_adapter_loads_in_peft_with_the_same_logits_merged_and_unmerged(kind, tmp_path):
    model = tiny_moe(kind)
    add_adapter(model, lora(kind))
    ids = token_batch()
    ours = logits(model, ids)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"experts.gate_up_proj", "experts.down_proj"}
    theirs = peft.PeftModel.from_pretrained(tiny_moe(kind), tmp_path)
    torch.testing.assert_close(logits(theirs, ids), ours, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), ids), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_peft_expert_adapter_loads_here_with_the_same_logits_merged_and_unmerged(kind, tmp_path):
    saving = peft.get_peft_model(
        tiny_moe(kind),
        peft.LoraConfig(
            r=4, target_modules=["q_proj", "o_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
        ),
    )
    randomise(saving)
    ids = token_batch()
    theirs = logits(saving, ids)
    saving.save_pretrained(tmp_path)
    model = tiny_moe(kind)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), theirs, atol=ATOL, rtol=0)
    merge_adapters(model)
    torch.testing.assert_close(logits(model, ids), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])  # out × in and in × out expert layouts
def test_merge_writes_into_the_fused_weights_and_unmerge_restores_them(kind):
    model = tiny_moe(kind, dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts  # the original module: it stays the owner of the fused weights
    before = experts.gate_up_proj.detach().clone()
    add_adapter(model, lora(kind))
    ids = token_batch()
    unmerged = logits(model, ids).float()
    merge_adapters(model)
    assert experts.gate_up_proj.dtype == torch.bfloat16
    assert not torch.equal(experts.gate_up_proj, before)
    with execution.trace() as ran:
        merged = logits(model, ids).float()
    assert "experts" not in ran  # nothing left to add at run time
    torch.testing.assert_close(merged, unmerged, atol=0.1, rtol=0.05)  # bf16 weights, rounded once
    unmerge_adapters(model)
    assert (experts.gate_up_proj.float() - before.float()).abs().max() <= 2e-2


@pytest.mark.parametrize("granule", [1, 8])
def test_mixed_batch_rows_on_experts_equal_one_adapter_at_a_time(granule, monkeypatch):
    monkeypatch.setattr(expert_layers, "group_granule", lambda *_: granule)
    model = tiny_moe("mixtral")
    add_adapter(model, lora("mixtral"), name="a")
    add_adapter(model, lora("mixtral"), name="b")
    randomise(model)
    ids = token_batch(batch=3)
    names = ["a", "b", "__base__"]
    with torch.no_grad(), execution.trace() as ran:
        mixed = model(ids, adapter_names=names).logits
    assert "experts" in ran
    for row, name in enumerate(names):
        with torch.no_grad():
            alone = model(ids[row : row + 1], adapter_names=[name]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout=0.1 cannot apply to parameter updates"),
        ({"use_dora": True}, "DoRA is not supported on parameters"),
        ({"target_parameters": ["experts.up_proj_typo"]}, "matches no parameter of this model"),
        ({"target_modules": ["experts"], "target_parameters": None}, "target_parameters"),
    ],
)
def test_what_cannot_apply_to_experts_is_refused_in_one_line_and_leaves_the_model_as_it_was(overrides, message):
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        add_adapter(model, LoraConfig(r=4, **overrides))
    assert not any(isinstance(m, (LoraLayer, AdaptedModule)) for m in model.modules())


def test_saving_warns_when_peft_would_read_shared_expert_linears_as_experts(tmp_path):
    model = tiny_moe("deepseek_v3")
    add_adapter(model, LoraConfig(r=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(model, tmp_path)
    assert any("huggingface/peft#3711" in str(w.message) for w in caught)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.shared_experts.gate_proj" in config["target_modules"]  # full paths: kept as modules


def moe_run_files(kind: str, tmp_path):
    """(a tiny ``kind`` MoE saved with a tokenizer, eight training rows) for a training run."""
    tokenizer = build_tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_moe(kind, vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, write_jsonl(tmp_path / "train.jsonl", addition_rows(8))


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_training_run_on_an_moe_trains_the_experts_and_saves_them_for_peft(kind, tmp_path):
    model_dir, data = moe_run_files(kind, tmp_path)
    lines = []
    shared = {"exclude_modules": ".*shared_experts.*"} if kind == "deepseek_v3" else {}  # as in lora(): peft#3711
    config = make_config(model_dir, data, tmp_path / "run", train={"max_steps": 3}, lora=shared)
    train(config, progress=False, log=lines.append)
    assert any(line.startswith("experts: LoRA on down_proj, gate_up_proj of 2 of 2") for line in lines)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"experts.gate_up_proj", "experts.down_proj"}
    tensors = load_file(adapter / "adapter_model.safetensors")
    expert_B = [t for k, t in tensors.items() if "experts" in k and "lora_B" in k]
    assert expert_B and all(t.abs().max() > 0 for t in expert_B)  # B starts at zero: the experts were trained
    peft.PeftModel.from_pretrained(tiny_moe(kind, vocab=len(build_tiny_tokenizer())), adapter)  # and PEFT loads them


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_qlora_on_an_moe_trains_the_experts_over_4bit_stacks(kind, tmp_path):
    model_dir, data = moe_run_files(kind, tmp_path)
    lines = []
    config = make_config(
        model_dir, data, tmp_path / "run", model={"quantize": "nf4", "dtype": "fp32"}, train={"max_steps": 3}
    )
    summary = train(config, progress=False, log=lines.append)
    assert any(line.startswith("experts: LoRA on down_proj, gate_up_proj of 2 of 2") for line in lines)
    assert math.isfinite(summary["final_loss"])
    assert any(line.endswith("stored in 4 bits (nf4))") for line in lines)
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    expert_B = [t for k, t in tensors.items() if "experts" in k and "lora_B" in k]
    assert expert_B and all(t.abs().max() > 0 for t in expert_B)


def test_an_upcycled_dense_model_computes_what_the_dense_model_computes():
    dense = build_tiny_llama(VOCAB, seed=3).eval()
    moe = upcycle_to_mixtral(dense, experts=4, top_k=2)
    ids = token_batch(batch=3, length=12)
    routed = moe.model.layers[0].mlp.gate(moe.model.embed_tokens(ids))[2]
    assert routed.unique().numel() > 2  # the random router spreads tokens over the experts
    torch.testing.assert_close(logits(moe, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)
    add_adapter(moe, lora("mixtral"))
    assert (logits(moe, ids) - logits(dense, ids)).abs().max() > 1e-2  # and its experts train apart


def test_upcycling_refuses_what_it_cannot_build():
    with pytest.raises(ConfigError, match="top_k must be between 1 and the number of experts"):
        upcycle_to_mixtral(build_tiny_llama(VOCAB), experts=2, top_k=3)
    with pytest.raises(ConfigError, match="from a Llama or Mistral model"):
        upcycle_to_mixtral(tiny_moe("qwen3_moe"))


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_the_lean_norm_and_mlp_ops_apply_to_moe_families_and_change_nothing(kind):
    plain, patched = tiny_moe(kind), tiny_moe(kind)
    add_adapter(plain, lora(kind))
    randomise(plain)
    add_adapter(patched, lora(kind))
    patched.load_state_dict(plain.state_dict())
    assert patch_for_training(patched) >= 2 * 2 + 1  # two norms per block and the final one, at least
    ids = token_batch(batch=2)
    losses, grads = [], []
    for model in (plain, patched):
        model.train()
        losses.append(model(ids, labels=ids).loss)
        grads.append(torch.autograd.grad(losses[-1], [p for p in model.parameters() if p.requires_grad]))
    assert (losses[0] - losses[1]).abs() <= 1e-5 * losses[0].abs()  # as tests/test_fused_ops.py asks of Llama
    for a, b in zip(*grads, strict=True):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


def expert_deltas(model, name: str = "default") -> dict[str, torch.Tensor]:
    """Every adapted parameter's ΔW (stacks: E × out × in) under adapter ``name``."""
    return {
        path: layer.delta_weight(name)
        for path, layer in lora_layers(model)
        if isinstance(layer, LoraParameter) and name in layer.lora_A
    }


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_mixing_expert_adapters_mixes_each_expert_and_peft_reads_the_result(method, tmp_path):
    model = tiny_moe("qwen3_moe")
    for name in ("a", "b"):
        add_adapter(model, lora("qwen3_moe"), name=name)
        save_adapter(model, tmp_path / name, name=name)
    rank = {"rank": 8} if method == "svd" else {}
    result = mix_adapter_dirs([(tmp_path / "a", 1.0), (tmp_path / "b", 0.5)], tmp_path / "mixed", method, **rank)
    assert set(result.config.target_parameters) == {"experts.gate_up_proj", "experts.down_proj"}
    mixed = tiny_moe("qwen3_moe")
    load_adapter(mixed, tmp_path / "mixed")
    a, b, ours = expert_deltas(model, "a"), expert_deltas(model, "b"), expert_deltas(mixed)
    assert len(ours) == 4 and ours.keys() == a.keys()
    for path, delta in ours.items():
        wanted = a[path] + 0.5 * b[path]
        if method == "linear":  # (√1·A_a + √.5·A_b)(√1·B_a + √.5·B_b): not the sum, but the same for both
            continue
        torch.testing.assert_close(delta, wanted, atol=1e-5, rtol=1e-4)  # rank 8 = 4 + 4 holds the sum exactly
    ids = token_batch(batch=2)
    theirs = peft.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), tmp_path / "mixed")
    torch.testing.assert_close(logits(theirs, ids), logits(mixed, ids), atol=ATOL, rtol=1e-5)


def test_rank_resize_compare_and_inspect_see_every_expert(tmp_path):
    model = tiny_moe("qwen3_moe")
    add_adapter(model, lora("qwen3_moe"))
    stack = next(layer for _, layer in lora_layers(model) if isinstance(layer, LoraParameter))
    with torch.no_grad():  # expert 1 of one stack never trained: its B columns stay zero
        stack.lora_B["default"].view(stack.out_features, 4, 4)[:, :, 1] = 0
    save_adapter(model, tmp_path / "adapter")
    config, tensors = read_adapter(tmp_path / "adapter")
    original = expert_deltas(model)

    spectrum = adapter_spectrum(config, tensors)
    experts = [m for m in spectrum["modules"] if m["name"].endswith("]")]
    assert len(experts) == 2 * 2 * 4 and {m["r"] for m in experts} == {4}  # 2 blocks × 2 stacks × 4 experts

    resized = resize_adapter(config, tensors, rank=2)
    write_adapter(tmp_path / "resized", resized.config, resized.tensors)
    smaller = tiny_moe("qwen3_moe")
    load_adapter(smaller, tmp_path / "resized")
    for path, delta in expert_deltas(smaller).items():
        for e in range(4):
            S = torch.linalg.svdvals(original[path][e].double())
            assert torch.linalg.matrix_rank(delta[e].double(), atol=1e-5) <= 2
            error = (delta[e].double() - original[path][e].double()).norm()
            assert error == pytest.approx(float(S[2:].square().sum().sqrt()), rel=1e-4, abs=1e-6)  # Eckart–Young

    same = [m for m in compare_adapters((config, tensors), (config, tensors))["modules"] if m["name"].endswith("]")]
    assert len(same) == 16 and all(m["phi_top"] == pytest.approx(1.0) for m in same)

    info = describe_adapter(tmp_path / "adapter")
    assert info["ranks"] == [4] and info["target_parameters"]
    assert info["experts"].startswith("4 stacks of 4 experts") and "1 experts unchanged" in info["experts"]


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_gguf_export_writes_each_expert_as_llama_cpps_expert_indexed_lora(kind, tmp_path):
    model = tiny_moe(kind)
    add_adapter(model, lora(kind, lora_alpha=12))
    save_adapter(model, tmp_path / "adapter")
    config, tensors = read_adapter(tmp_path / "adapter")
    base = GgufBase.from_config({**model.config.to_dict(), "architectures": [type(model).__name__]})
    exported = gguf_lora_tensors(tensors, config, base)
    scale = exported.alpha / 4  # llama.cpp's alpha / r, r read from lora_b
    width = base.expert_width
    for path, delta in expert_deltas(model).items():  # E × out × in (both families store experts out × in)
        block = path.split(".")[2]
        if path.endswith("gate_up_proj"):
            halves = {"ffn_gate_exps": delta[:, :width], "ffn_up_exps": delta[:, width:]}
        else:
            halves = {"ffn_down_exps": delta}
        for name, wanted in halves.items():
            a = torch.from_numpy(exported.tensors[f"blk.{block}.{name}.weight.lora_a"])  # E × r × in
            b = torch.from_numpy(exported.tensors[f"blk.{block}.{name}.weight.lora_b"])  # E × out × r
            assert a.shape == (4, 4, wanted.shape[2]) and b.shape == (4, wanted.shape[1], 4)
            torch.testing.assert_close(scale * b @ a, wanted, atol=1e-6, rtol=1e-5)
    assert sum(name.endswith("lora_a") for name in exported.tensors) == 2 * (4 + 3)  # attention + 3 expert tensors


def test_gguf_export_of_an_architecture_llama_cpp_has_no_mapping_for_is_one_line(tmp_path):
    model = tiny_moe("gpt_oss")
    with pytest.raises(ConfigError, match="does not support the base architecture 'GptOssForCausalLM'"):
        GgufBase.from_config({**model.config.to_dict(), "architectures": [type(model).__name__]})


NF4 = QuantSpec(quant_type="nf4", compute_dtype=torch.float32)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_a_4bit_moe_streams_in_expert_by_expert_as_quantizing_it_in_memory_would(kind, tmp_path):
    original = tiny_moe(kind)
    original.save_pretrained(tmp_path)  # experts one tensor each (gpt-oss: fused), as checkpoints on the Hub
    ids = token_batch(batch=3)
    streamed = load_streamed(tmp_path, NF4, torch.float32)
    stacks = [p for p in streamed.parameters() if isinstance(p, Experts4bit)]
    assert len(stacks) == 4 and all(p.complete for p in stacks)
    in_memory = quantize_model(tiny_moe(kind), NF4)
    assert torch.equal(logits(streamed, ids), logits(in_memory, ids))
    dequantize_model(in_memory)  # float weights equal to what the 4-bit ones stand for
    assert not any(isinstance(p, Experts4bit) for p in in_memory.parameters())
    torch.testing.assert_close(logits(streamed, ids), logits(in_memory, ids), atol=ATOL, rtol=1e-5)
    assert (logits(streamed, ids) - logits(original, ids)).abs().max() > 1e-3  # the experts are 4-bit
    # a float load streams the per-expert tensors into the fused stacks too (as FSDP loads)
    assert torch.equal(logits(load_streamed(tmp_path, None, torch.float32), ids), logits(original, ids))


def test_a_checkpoint_without_some_experts_is_refused_naming_them(tmp_path):
    tiny_moe("qwen3_moe").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if ".experts.3." not in k}  # expert 3 of every block is gone
    save_file(kept, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for spec in (NF4, None):
        with pytest.raises(LoratuneError, match=r"tensors missing from the checkpoint: model\.layers\.0\.mlp\.experts"):
            load_streamed(tmp_path, spec, torch.float32)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_lora_on_4bit_experts_computes_and_learns_what_it_would_on_their_dequantized_weights(kind):
    quantized = quantize_model(tiny_moe(kind), NF4)
    dequantized = copy.deepcopy(quantized)
    dequantize_model(dequantized)
    ids = token_batch(batch=3)
    results = []
    for model in (quantized, dequantized):
        torch.manual_seed(0)  # the same random factors on both
        add_adapter(model, lora(kind))
        model.train()
        with execution.trace() as ran:
            out = model(ids).logits
        assert "experts" in ran
        grads = torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])
        results.append((out, grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="stored in 4 bits, so an adapter cannot be merged into them in place"):
        merge_adapters(quantized)


def test_the_serving_engine_runs_expert_adapters_per_row_as_each_alone(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = tiny_moe("qwen3_moe", vocab=len(tokenizer))
    for name in ("a", "b"):
        add_adapter(model, lora("qwen3_moe"), name=name)
    randomise(model)
    prompts = [tokenizer.encode(text) for text in ("add 1 2", "add 3 4 and 5", "the date")]
    requests = [(0, {"a": 1.0}), (1, {"b": 1.0}), (2, {}), (0, {"b": 1.0}), (1, {"a": 0.5, "b": 0.5})]

    def generate(batch):
        done = queue.Queue()

        def sink(event):
            if isinstance(event, Finished):
                done.put(event)

        seqs = [
            Sequence(prompts[p], adapters, SamplingParams(6), tokenizer, frozenset(), sink) for p, adapters in batch
        ]
        engine = Engine(model, max_batch=8)
        for seq in seqs:
            engine.submit(seq)
        engine.start()
        try:
            for _ in seqs:
                done.get(timeout=60)
        finally:
            engine.stop()
        return [seq.tokens for seq in seqs]

    together = generate(requests)
    alone = [generate([request])[0] for request in requests]
    assert together == alone
    assert together[0] != together[3]  # the rows did run different experts' adapters


def test_an_int8_compressed_expert_adapter_loads_with_nearly_the_same_logits(tmp_path):
    model = tiny_moe("gpt_oss")
    add_adapter(model, lora("gpt_oss"))
    ids = token_batch()
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "int8", compress="int8")
    loaded = tiny_moe("gpt_oss")
    load_adapter(loaded, tmp_path / "int8")
    assert set(adapters_of(loaded)["default"].parameter_paths) == set(adapters_of(model)["default"].parameter_paths)
    got = logits(loaded, ids)
    assert (got - expected).abs().max() <= 0.02 * (expected - logits(tiny_moe("gpt_oss"), ids)).abs().max()
