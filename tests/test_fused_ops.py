"""Lean RMSNorm and SiLU-MLP training ops equal transformers' modules and pass gradcheck."""

import contextlib

import pytest
import torch

import loratune
from loratune import LoraConfig
from loratune.inference.loss import causal_lm_loss_sum
from loratune.layers import LoraLinear
from loratune.layers.fused_linear import DoraLinearFunction
from loratune.train.fused_ops import (
    RMSNormFunction,
    SiluMulDoraDownFunction,
    SiluMulFunction,
    SiluMulLoraDownFunction,
    patch_for_training,
    rope_for_training,
)
from tiny_models import tiny_gpt2, tiny_llama, token_batch


def test_rms_norm_function_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-6), (x, weight))


def test_silu_mul_function_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMulFunction.apply, (gate, up))


@pytest.mark.parametrize("bias", [True, False])
def test_silu_mul_lora_down_function_passes_gradcheck_in_float64(bias):
    torch.manual_seed(0)
    t = dict(dtype=torch.float64, requires_grad=True)
    gate, up = torch.randn(2, 3, 6, **t), torch.randn(2, 3, 6, **t)
    weight = torch.nn.Linear(6, 4, bias=bias, dtype=torch.float64).requires_grad_(False)
    down = LoraLinear(weight)
    b = weight.bias.requires_grad_(True) if bias else None
    A, B = torch.randn(2, 6, **t), torch.randn(4, 2, **t)
    assert torch.autograd.gradcheck(
        lambda g, u, b, A, B: SiluMulLoraDownFunction.apply(g, u, down, b, A, B, 0.7), (gate, up, b, A, B)
    )


def dora_down(bias: bool, strength: float):
    """A float64 DoRA layer around a 6 → 4 Linear, its one term and the leaves gradcheck varies."""
    torch.manual_seed(0)
    weight = torch.nn.Linear(6, 4, bias=bias, dtype=torch.float64).requires_grad_(False)
    down = LoraLinear(weight)
    down.add_adapter("d", 2, 4, init=False, use_dora=True, dtype=torch.float64)
    down.set_active(("d",))
    down.set_strength("d", strength)
    (term,) = down.terms()
    b = weight.bias.requires_grad_(True) if bias else None
    return down, term, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_functions_pass_gradcheck_in_float64(bias, strength):
    down, term, b = dora_down(bias, strength)
    t = dict(dtype=torch.float64, requires_grad=True)
    gate, up, x = torch.randn(2, 3, 6, **t), torch.randn(2, 3, 6, **t), torch.randn(2, 3, 6, **t)
    A, B, m = term.A.detach(), term.B.detach(), term.magnitude
    # The row norms are a constant of DoRA's backward (the paper's §4.3), so A and B cannot vary numerically
    # here; their gradients are checked against autograd through the reference in test_dora.
    assert torch.autograd.gradcheck(
        lambda g, u, b, m: SiluMulDoraDownFunction.apply(g, u, down, term, b, A, B, m), (gate, up, b, m)
    )
    assert torch.autograd.gradcheck(lambda x, b, m: DoraLinearFunction.apply(x, down, term, b, A, B, m), (x, b, m))


def loss_and_grads(patch: bool, dtype=torch.float32, quantize: str | None = None, **lora):
    model = tiny_llama(dtype=dtype)
    if quantize:
        from loratune.models.quantized import quantize_model
        from loratune.quant import QuantSpec

        model = quantize_model(model, QuantSpec(quantize, compute_dtype=dtype))
    torch.manual_seed(1)
    loratune.add_adapter(model, LoraConfig(r=4, init_lora_weights=False, **lora))
    if patch:
        assert patch_for_training(model) == 2 * 4 + 1  # two norms, the MLP and attention per block, the final norm
    model.train()
    ids = token_batch(length=16)
    total, count = causal_lm_loss_sum(model, {"input_ids": ids, "labels": ids})
    (total / count).backward()
    return total.detach() / count, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.usefixtures("kernel_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_rope_gives_transformers_values_and_gradients(dtype):
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 16, generator=generator).to(dtype)  # tokens-major, as the projections give
    k = torch.randn(2, 7, 2, 16, generator=generator).to(dtype)
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64))
    cos, sin = rotary(q, torch.arange(7).expand(2, 7))
    cos, sin = cos.to(dtype), sin.to(dtype)
    grads = [torch.randn(*t.shape, generator=generator).to(dtype) for t in (q, k)]

    def run(rotate):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out_q, out_k = rotate(qq, kk)
        torch.autograd.backward((out_q, out_k), grads)
        return out_q, out_k, qq.grad, kk.grad

    ours = run(lambda a, b: rope_for_training(a, b, cos, sin))
    theirs = run(
        lambda a, b: [t.transpose(1, 2) for t in apply_rotary_pos_emb(a.transpose(1, 2), b.transpose(1, 2), cos, sin)]
    )
    for a, b in zip(ours, theirs, strict=True):
        if dtype == torch.bfloat16:
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same rounding points
        else:
            torch.testing.assert_close(a, b)


def test_training_rope_leaves_other_angles_to_transformers():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    cos, sin = torch.rand(1, 3, 8), torch.rand(1, 3, 8)  # halves that differ: not transformers' form
    assert rope_for_training(q, k, cos, sin) is None


@pytest.mark.usefixtures("any_isa")
def test_patched_model_gives_the_same_loss_and_adapter_gradients_in_float32():
    patched_loss, patched_grads = loss_and_grads(True)
    plain_loss, plain_grads = loss_and_grads(False)
    assert (patched_loss - plain_loss).abs() <= 1e-5 * plain_loss.abs()
    for a, b in zip(patched_grads, plain_grads):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_patched_dora_model_gives_the_same_loss_and_adapter_gradients(quantize):
    patched_loss, patched_grads = loss_and_grads(True, quantize=quantize, use_dora=True)
    plain_loss, plain_grads = loss_and_grads(False, quantize=quantize, use_dora=True)
    assert (patched_loss - plain_loss).abs() <= 1e-5 * plain_loss.abs()
    assert len(patched_grads) == 2 * 7 * 3  # A, B and m of 7 modules in 2 blocks
    for a, b in zip(patched_grads, plain_grads):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


@pytest.mark.usefixtures("any_isa")
def test_patched_bf16_model_is_as_close_to_float32_as_the_plain_bf16_model():
    def error(grads, reference):
        return sum((a.float() - b).norm() for a, b in zip(grads, reference)) / sum(b.norm() for b in reference)

    reference_loss, reference = loss_and_grads(False, torch.float32)
    patched_loss, patched = loss_and_grads(True, torch.bfloat16)
    plain_loss, plain = loss_and_grads(False, torch.bfloat16)
    assert abs(patched_loss - reference_loss) <= 1.5 * abs(plain_loss - reference_loss) + 1e-3
    assert error(patched, reference) <= 1.5 * error(plain, reference)


def test_other_architectures_are_left_alone():
    assert patch_for_training(tiny_gpt2()) == 0


def test_patched_model_with_4bit_down_proj_gives_the_same_loss_and_adapter_gradients():
    patched_loss, patched_grads = loss_and_grads(True, quantize="nf4")
    plain_loss, plain_grads = loss_and_grads(False, quantize="nf4")
    assert (patched_loss - plain_loss).abs() <= 1e-5 * plain_loss.abs()
    assert len(patched_grads) == 2 * 7 * 2
    for a, b in zip(patched_grads, plain_grads):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


@pytest.mark.usefixtures("any_isa")
def test_norm_recipes_keep_no_activation_alive_in_a_recomputed_layer():
    """Inside a checkpointed layer nothing saves the norm's output; its recipe must not keep the norm's input
    (the residual stream after attention) alive until backward, or checkpointing saves nothing."""
    import weakref

    from loratune.train.fused_ops import recompute_norm_outputs

    model = tiny_llama()
    loratune.add_adapter(model, LoraConfig(r=4))
    patch_for_training(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inputs = []
    norm = model.model.layers[1].post_attention_layernorm
    norm.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    ids = token_batch(length=16)
    with recompute_norm_outputs():
        total, count = causal_lm_loss_sum(model, {"input_ids": ids, "labels": ids})
        assert inputs[0]() is None  # forward done, the graph alive: the layer's inside is gone
        (total / count).backward()
    assert len(inputs) == 2  # and it ran again in backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("any_isa")
def test_recomputing_norm_outputs_gives_the_same_bits_and_keeps_no_norm_output(dtype):
    import weakref

    from loratune.train.fused_ops import recompute_norm_outputs

    def run(recompute: bool):
        model = tiny_llama(dtype=dtype)
        torch.manual_seed(1)
        loratune.add_adapter(model, LoraConfig(r=4, init_lora_weights=False))
        patch_for_training(model)
        model.train()
        outputs = []
        norm = model.model.layers[1].input_layernorm  # feeds q/k/v, which keep their input for grad A
        norm.register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
        ids = token_batch(length=16)
        with recompute_norm_outputs() if recompute else contextlib.nullcontext():
            total, count = causal_lm_loss_sum(model, {"input_ids": ids, "labels": ids})
        kept = outputs[0]() is not None  # while the graph (and what it saved) is alive
        (total / count).backward()
        return total.detach(), [p.grad for p in model.parameters() if p.requires_grad], kept

    loss, grads, kept = run(True)
    plain_loss, plain_grads, plain_kept = run(False)
    assert plain_kept and not kept
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
