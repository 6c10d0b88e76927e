"""Decoding's kernels in every variant this CPU runs: the few-row linear product (``kernels/csrc/linear_rows_body.h``)
where it applies and where it gives way to PyTorch, a LoRA layer's whole output in one call, RoPE; and decoding's
lean modules (``inference.lean``) that use them, judged by the model's own outputs."""

import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import loratune
from loratune.inference.decode import inference
from loratune.inference.lean import decoding_kernels
from loratune.kernels import fused, rows
from loratune.layers import LoraLinear, Routing
from loratune.layers.execution import plan_for
from loratune.train.fused_ops import patch_for_training
from tiny_models import tiny_llama, tiny_llama_family, token_batch


@pytest.fixture
def in_decoding():
    """Inside ``rows.decoding()``, where products of a few rows take the kernel."""
    with rows.decoding():
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "n_rows, d_in, d_out",
    [
        (1, 576, 1536),  # one decoding row of SmolLM2's MLP
        (2, 1536, 576),
        (16, 64, 128),  # the most bf16 rows it takes
        (64, 24, 40),  # the most float32 rows it takes
        (3, 19, 7),  # remainders everywhere: an odd row, in % 8, out % 4
        (5, 8, 4),
        (1, 1, 1),
        (2, 3, 130),  # spans over threads that are no multiple of four rows of W
        (7, 1003, 13),  # a wide input taken in parts: an odd row, in % 8, out % 4
        (64, 700, 8),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_kernel_matches_a_float64_reference(dtype, n_rows, d_in, d_out, bias):
    fewest, most = rows.row_range(dtype)
    n_rows = min(max(n_rows, fewest), most)
    torch.manual_seed(n_rows * 1000 + d_in + d_out)
    x = torch.randn(n_rows, d_in).to(dtype)
    weight = (torch.randn(d_out, d_in) / d_in**0.5).to(dtype)
    b = torch.randn(d_out).to(dtype) if bias else None
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    result = rows.product(x, weight, b)
    assert result is not None and result.dtype == dtype and result.shape == (n_rows, d_out)
    if dtype == torch.float32:
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        # float32 sums, one rounding to bf16 at the end: within one bf16 step of the exact value
        step = expected.abs().clamp_min(1e-30) * 2.0**-8
        assert ((result.double() - expected).abs() <= step).all()


@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_a_wide_input_taken_in_parts_sums_as_one_row_alone_does():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(9, 1541), torch.randn(21, 1541), torch.randn(21)
    together = rows.product(x, weight, bias)  # several rows of a wide input: taken in parts
    alone = torch.cat([rows.product(x[i : i + 1], weight, bias) for i in range(9)])  # one row: in one pass
    assert torch.equal(together, alone)  # the same sums in the same order, bit for bit


@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_leading_dimensions_are_kept_and_threads_agree():
    torch.manual_seed(0)
    x, weight = torch.randn(2, 3, 40), torch.randn(300, 40)
    one = torch.get_num_threads()
    result = rows.product(x, weight)
    torch.set_num_threads(1)
    try:
        alone = rows.product(x, weight)
    finally:
        torch.set_num_threads(one)
    assert result.shape == (2, 3, 300)
    assert torch.equal(result, alone)  # each output is one row's sum, whichever thread computes it
    torch.testing.assert_close(result, F.linear(x, weight))


@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_where_the_kernel_gives_way_to_pytorch():
    torch.manual_seed(0)
    weight, x = torch.randn(8, 16), torch.randn(2, 16)
    many = rows.row_range(torch.float32)[1] + 1
    refused = {
        **(
            {}
            if rows.takes_in_spans(many, torch.float32)
            else {"more rows than it takes": (torch.randn(many, 16), weight)}
        ),
        "float64": (x.double(), weight.double()),
        "more bf16 rows than it takes": (
            torch.randn(rows.row_range(torch.bfloat16)[1] + 1, 16).bfloat16(),
            weight.bfloat16(),
        ),
        "a strided x": (torch.randn(16, 2).T, weight),
        "an input that needs its gradient": (x.clone().requires_grad_(), weight),
        "a weight that needs its gradient": (x, weight.clone().requires_grad_()),
        "no rows": (torch.randn(0, 16), weight),
    }
    for why, (inputs, w) in refused.items():
        assert rows.product(inputs, w) is None, why
        torch.testing.assert_close(rows.linear(inputs, w), F.linear(inputs, w))
    with torch.no_grad():  # without autograd, a trainable weight is just a weight
        assert rows.product(x, weight.clone().requires_grad_()) is not None
    assert rows.product(x, weight, torch.randn(8).double()) is None  # a bias in another dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_batch_invariant_rows_of_any_number_take_the_kernel_each_row_the_bits_it_has_alone(dtype):
    # BLAS rounds a row differently by how many rows come with it; inside batch_invariant() a batch changes nothing
    torch.manual_seed(0)
    weight, bias = torch.randn(70, 40).to(dtype), torch.randn(70).to(dtype)
    most = rows.row_range(dtype)[1]
    x = torch.randn(2 * most + 5, 40).to(dtype)
    spans = rows.takes_in_spans(len(x), dtype)  # float32 on AVX-512: in spans anyway, faster than BLAS there
    assert (rows.product(x, weight, bias) is not None) == spans  # (else BLAS's products, faster on many rows)
    with rows.batch_invariant():
        assert rows.invariant()
        together = rows.product(x, weight, bias)
        assert together is not None
        for i in (0, 1, most - 1, most, 2 * most + 4):
            assert torch.equal(together[i], rows.product(x[i : i + 1], weight, bias)[0]), i
    assert not rows.invariant()
    expected = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(together.float(), expected, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_a_batch_invariant_lora_layer_gives_each_row_of_a_prompt_batch_the_bits_it_has_alone(dtype):
    torch.manual_seed(1)
    layer = LoraLinear(torch.nn.Linear(40, 70, bias=True).to(dtype))
    for name, rank in (("a", 4), ("b", 8)):
        layer.add_adapter(name, r=rank, lora_alpha=8, init=False)
    layer.set_active(("a", "b"))
    names = ("a", "b", "__base__", "a", (("a", 0.5), ("b", -0.3)))  # the last: a weighted mix
    x = torch.randn(len(names), 40, 40).to(dtype)  # five prompts of 40 tokens: 200 rows, more than few
    with torch.no_grad(), rows.batch_invariant():
        layer.set_routing(Routing(names))
        together = layer(x)
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
        assert torch.equal(layer(strided), together)
        for i, name in enumerate(names):
            layer.set_routing(Routing((name,)))
            assert torch.equal(together[i], layer(x[i : i + 1])[0]), name
            assert torch.equal(together[i, :3], layer(x[i : i + 1, :3])[0]), name  # a prompt's start, read alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "queries, cols, dim",
    [(5, 9, 40), (70, 100, 64)],  # short, any head size; long (keys four runs of 16 at a time), SmolLM2's heads
)
@pytest.mark.usefixtures("kernel_isa")
def test_a_prompts_attention_matches_pytorchs_and_no_row_depends_on_its_batch(dtype, queries, cols, dim):
    torch.manual_seed(2)
    rows_, q_heads, kv_heads = 3, 6, 2
    query = torch.randn(rows_, queries, q_heads, dim).to(dtype)
    key, value = (torch.randn(rows_, kv_heads, cols, dim).to(dtype) for _ in range(2))
    allowed = torch.ones(queries, cols, dtype=torch.bool).tril(cols - queries).repeat(rows_, 1, 1)
    allowed[1, :, :3] = False  # row 1 left-padded by three columns
    allowed[1, 0, :] = False  # and its first query a padding position: zeros
    out = fused.rows_attention(query, key, value, allowed, 0.125)
    expected = F.scaled_dot_product_attention(
        query.transpose(1, 2).double(),
        key.double().repeat_interleave(q_heads // kv_heads, 1),
        value.double().repeat_interleave(q_heads // kv_heads, 1),
        attn_mask=allowed[:, None],
        scale=0.125,
    ).transpose(1, 2)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out[:, 1:].double(), expected[:, 1:], **tolerance)
    assert not out[1, 0].any()
    # row 1 alone, without its padding columns, one query at a time, and inside a cache buffer with room to grow
    unpadded = allowed[1:2, :, 3:].contiguous()
    alone = fused.rows_attention(query[1:2], key[1:2, :, 3:], value[1:2, :, 3:], unpadded, 0.125)
    assert torch.equal(alone[0, 1:], out[1, 1:])
    for t in range(1, queries):
        single = allowed[1:2, t : t + 1].contiguous()
        one = fused.rows_attention(query[1:2, t : t + 1], key[1:2], value[1:2], single, 0.125)
        assert torch.equal(one[0, 0], out[1, t])
    roomy_key, roomy_value = (torch.zeros(rows_, kv_heads, cols + 7, dim, dtype=dtype) for _ in range(2))
    roomy_key[:, :, :cols], roomy_value[:, :, :cols] = key, value
    roomy = fused.rows_attention(query, roomy_key[:, :, :cols], roomy_value[:, :, :cols], allowed, 0.125)
    assert torch.equal(roomy, out)
    assert fused.rows_attention(query, key.transpose(2, 3), value, allowed, 0.125) is None  # a layout it cannot read


@pytest.mark.usefixtures("in_decoding")
def test_switched_off_kernels_leave_it_to_pytorch(monkeypatch):
    monkeypatch.setenv("LORATUNE_NO_KERNEL", "1")
    assert rows.product(torch.randn(1, 8), torch.randn(4, 8)) is None


@pytest.mark.usefixtures("kernel_isa")
def test_only_decoding_takes_the_kernel_and_a_fresh_adapter_stays_the_base_there():
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    assert rows.product(x, weight) is None  # outside decoding(): BLAS's bits, as every other product
    with rows.decoding():
        assert rows.product(x, weight) is not None
        other = []
        worker = threading.Thread(target=lambda: other.append(rows.product(x, weight)))
        worker.start()
        worker.join()
        assert other == [None]  # another thread is not decoding
    assert not rows.active()
    # while generating too, a fresh adapter (B = 0) computes exactly what its base computes
    base, adapted = tiny_llama(seed=6), tiny_llama(seed=6)
    loratune.add_adapter(adapted, loratune.LoraConfig(r=4, target_modules="all-linear"))
    ids = token_batch(seed=3, batch=1, length=5)
    with inference(base), inference(adapted):
        assert torch.equal(_decode_logits(adapted, ids), _decode_logits(base, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows", [1, 3, 16])
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.usefixtures("kernel_isa", "in_decoding")
def test_a_lora_layer_in_one_call_equals_its_product_and_update_apart(dtype, n_rows, routed):
    torch.manual_seed(n_rows)
    layer = LoraLinear(torch.nn.Linear(40, 70, bias=True).to(dtype))
    for name, rank in (("a", 4), ("b", 8)):
        layer.add_adapter(name, r=rank, lora_alpha=8, init=False)
    layer.set_active(("a", "b") if routed else ("a",))
    if routed:  # a server's mixed batch: each row its own adapter (or none)
        layer.set_routing(Routing(tuple(("a", "b", "__base__")[i % 3] for i in range(n_rows))))
    x = torch.randn(n_rows, 1, 40).to(dtype)
    with torch.no_grad():
        whole = layer(x)
        plan = plan_for(layer, x)
        assert plan.whole is not None  # (it runs where rows.takes the rows: not one bf16 row)
        plan.whole = None  # the same plan, its product and update in two calls
        apart = plan.run_kernel(x)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(whole, apart, **tolerance)
    torch.testing.assert_close(whole.double(), layer.reference_forward(x).double(), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 40, 64])  # half a head: the one-by-one rest only, both, whole vectors only
@pytest.mark.usefixtures("kernel_isa")
def test_rope_has_transformers_bits(dtype, dim):
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 6, dim).to(dtype), torch.randn(2, 5, 2, dim).to(dtype)
    positions = torch.arange(5)[None].float() + torch.tensor([[0.0], [7.0]])
    frequencies = positions[..., None] / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.cat([frequencies, frequencies], dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    rotated_q, rotated_k = fused.rope(q, k, cos, sin)
    assert torch.equal(rotated_q.transpose(1, 2), expected_q) and torch.equal(rotated_k.transpose(1, 2), expected_k)
    assert fused.rope(q, k, cos[:1], sin[:1]) is None  # broadcast positions: transformers' code runs instead
    assert fused.rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15]) is None  # an odd head size


def _decode_logits(model, ids, steps: int = 3) -> torch.Tensor:
    """The logits of a few greedy steps over the KV cache (the decoding regime: one row per step)."""
    out = model(input_ids=ids, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=next_ids, cache=out.cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits)


@pytest.mark.usefixtures("kernel_isa")
def test_decoding_kernels_give_the_model_its_own_outputs_and_leave_no_trace():
    model = tiny_llama(seed=3)
    loratune.add_adapter(model, loratune.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    ids = token_batch(seed=1, batch=1, length=6)
    model.eval()
    with torch.no_grad():
        expected = _decode_logits(model, ids)
    with inference(model):
        patched = {name for name, module in model.named_modules() if "forward" in module.__dict__}
        result = _decode_logits(model, ids)
    # the head, the Linears no adapter wraps, every RMSNorm and MLP took the kernels' forward
    assert "lm_head" in patched and "model.layers.0.self_attn.k_proj" in patched
    assert "model.norm" in patched and "model.layers.1.mlp" in patched and "model.layers.0.self_attn" in patched
    assert "model.layers.0.self_attn.q_proj" not in patched  # a LoRA layer: its base product takes the kernel
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert not any("forward" in module.__dict__ for module in model.modules())


@pytest.mark.parametrize(
    "make",
    [
        # the window reaches the attention
        lambda: tiny_llama_family(MistralConfig, MistralForCausalLM, sliding_window=4),
        lambda: tiny_llama_family(Qwen2Config, Qwen2ForCausalLM),
        lambda: tiny_llama_family(Qwen3Config, Qwen3ForCausalLM),  # per-head q/k norms before RoPE
    ],
    ids=["mistral", "qwen2", "qwen3"],
)
def test_every_family_with_llamas_attention_decodes_as_transformers_does(make):
    model = make()
    ids = token_batch(seed=2, batch=2, length=7)
    with torch.no_grad():
        expected = _decode_logits(model, ids, steps=6)
    with inference(model):
        assert "forward" in model.model.layers[0].self_attn.__dict__
        result = _decode_logits(model, ids, steps=6)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_a_model_patched_for_training_keeps_its_lean_ops_while_decoding():
    model = tiny_llama(seed=4)
    patch_for_training(model)
    own = {name: module.forward for name, module in model.named_modules() if "forward" in module.__dict__}
    with decoding_kernels(model) as patched:
        assert all(model.get_submodule(name).forward is forward for name, forward in own.items())
        # the Linears took the kernels; the norms, MLPs and attentions kept training's (its RoPE is the same kernel)
        assert patched == sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    assert {name for name, module in model.named_modules() if "forward" in module.__dict__} == set(own)


def test_a_model_off_the_cpu_keeps_its_own_forward():
    model = tiny_llama(seed=7).to("meta")  # the kernels are CPU code: a model elsewhere is left as it is
    with decoding_kernels(model) as patched:
        assert patched == 0 and rows.active()
    assert not any("forward" in module.__dict__ for module in model.modules())
