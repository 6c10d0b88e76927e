"""Training attention (forward through the CPU flash kernel, backward from batched products and the compiled
scores pass) equals PyTorch's SDPA, and a patched model trains exactly as transformers' SDPA model does."""

import pytest
import torch
import torch.nn.functional as F

import loratune
from loratune import LoraConfig
from loratune.inference.loss import causal_lm_loss_sum
from loratune.kernels import fused as fused_cpu
from loratune.train.attention import AttentionFunction, _additive_mask, attention, patch_attention
from tiny_models import tiny_encoder_dir, tiny_llama, token_batch

pytestmark = pytest.mark.skipif(not fused_cpu.kernel_available(), reason="the compiled kernels are not built")


def inputs(dtype, batch=2, heads=6, kv_heads=2, length=40, head_dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(batch, heads, length, head_dim, generator=generator)).to(dtype).requires_grad_()
    k = (2 * torch.randn(batch, kv_heads, length, head_dim, generator=generator)).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
    return q, k, v, grad


def masks(kind, batch=2, length=40):
    generator = torch.Generator().manual_seed(1)
    if kind == "bool":  # random keys hidden, each query still sees itself
        return (torch.rand(batch, 1, length, length, generator=generator) > 0.3) | torch.eye(length, dtype=torch.bool)
    if kind == "padding":  # the second row's last 9 tokens are padding, causal otherwise
        mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
        mask[1, :, :, -9:] = False
        mask[1, :, -9:, :] = torch.eye(length, dtype=torch.bool)[-9:]  # padding queries see themselves (no NaN rows)
        return mask
    if kind == "float":
        return torch.randn(batch, 1, length, length, generator=generator)
    if kind == "per-head":  # one float mask per query head (the 6 of ``inputs``)
        return torch.randn(batch, 6, length, length, generator=generator)
    return None


def sdpa(q, k, v, grad, mask, causal, scale, dtype):
    """Output and q/k/v gradients from PyTorch's SDPA (keys and values repeated per group) in ``dtype``."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    mask = mask.to(dtype) if mask is not None and mask.dtype != torch.bool else mask
    out = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask, is_causal=causal, scale=scale
    )
    out.backward(grad.to(dtype))
    return [out, q.grad, k.grad, v.grad]


def ours(q, k, v, grad, mask, causal, scale):
    out = AttentionFunction.apply(q, k, v, _additive_mask(mask, q.dtype), causal, scale)
    out.backward(grad)
    return [out, q.grad, k.grad, v.grad]


CASES = [("none", True), ("none", False), ("bool", False), ("padding", False), ("float", False), ("per-head", False)]
# (query length, head_dim): query rows per key/value head not a multiple of 4 or 16, keys not of 16; head_dim 64
# with rows in 16s is the shape the AMX tiles take where the CPU has them
SHAPES = [(40, 16), (41, 16), (48, 64)]


@pytest.mark.parametrize("length,head_dim", SHAPES)
@pytest.mark.parametrize("kind,causal", CASES)
@pytest.mark.usefixtures("kernel_isa")
def test_float32_output_and_gradients_equal_sdpa(kind, causal, length, head_dim):
    q, k, v, grad = inputs(torch.float32, length=length, head_dim=head_dim)
    mask = masks(kind, length=length)
    expected = sdpa(q, k, v, grad, mask, causal, 0.25, torch.float64)
    for name, got, want in zip(("out", "q", "k", "v"), ours(q, k, v, grad, mask, causal, 0.25), expected):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), name


@pytest.mark.parametrize("length,head_dim", SHAPES)
@pytest.mark.parametrize("kind,causal", CASES)
@pytest.mark.usefixtures("kernel_isa")
def test_bf16_gradients_are_as_close_to_exact_as_sdpa_in_bf16(kind, causal, length, head_dim):
    q, k, v, grad = inputs(torch.bfloat16, length=length, head_dim=head_dim)
    mask = masks(kind, length=length)
    exact = sdpa(q, k, v, grad, mask, causal, 0.125, torch.float64)
    theirs = sdpa(q, k, v, grad, mask, causal, 0.125, torch.bfloat16)
    for name, got, flash, want in zip(("out", "q", "k", "v"), ours(q, k, v, grad, mask, causal, 0.125), theirs, exact):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).norm() <= 1.1 * (flash.double() - want).norm() + 1e-6, name


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.usefixtures("kernel_isa")
def test_large_bf16_scores_keep_float32_accuracy(head_dim):
    """Scores rounded to bf16 before the exponent would cost a few percent of each probability."""
    q, k, v, grad = inputs(torch.bfloat16, length=64, head_dim=head_dim, seed=3)
    with torch.no_grad():
        q.mul_(4)
    exact = sdpa(q, k, v, grad, None, True, 0.125, torch.float64)
    got = ours(q, k, v, grad, None, True, 0.125)
    flash = sdpa(q, k, v, grad, None, True, 0.125, torch.bfloat16)
    for a, b, c in zip(got[1:], flash[1:], exact[1:]):
        assert (a.double() - c).norm() <= 1.1 * (b.double() - c).norm()


@pytest.mark.usefixtures("kernel_isa")
def test_a_query_row_that_sees_no_key_gets_zero_output_and_gradients_as_in_sdpa():
    q, k, v, grad = inputs(torch.float32, length=16)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    mask[1, :, 5] = False
    got, expected = ours(q, k, v, grad, mask, False, 0.25), sdpa(q, k, v, grad, mask, False, 0.25, torch.float32)
    assert got[0][1, :, 5].abs().max() == 0 and got[1][1, :, 5].abs().max() == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def loss_and_grads(patch: bool, dtype=torch.float32, padded=False):
    model = tiny_llama(dtype=dtype)
    torch.manual_seed(1)
    loratune.add_adapter(model, LoraConfig(r=4, init_lora_weights=False))
    if patch:
        assert patch_attention(model)
        assert model.config._attn_implementation == "loratune_sdpa"
    model.train()
    ids = token_batch(length=16)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][1, -5:] = 0
        batch["labels"][1, -5:] = -100
    total, count = causal_lm_loss_sum(model, batch)
    (total / count).backward()
    return total.detach() / count, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.usefixtures("kernel_isa")
def test_a_patched_llama_gives_transformers_loss_and_adapter_gradients_in_float32(padded):
    patched_loss, patched = loss_and_grads(True, padded=padded)
    plain_loss, plain = loss_and_grads(False, padded=padded)
    assert (patched_loss - plain_loss).abs() <= 1e-5 * plain_loss.abs()
    assert len(patched) == len(plain) == 2 * 7 * 2
    for a, b in zip(patched, plain):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-8


@pytest.mark.usefixtures("kernel_isa")
def test_a_patched_bf16_llama_is_as_close_to_float32_as_transformers_bf16():
    def error(grads, reference):
        return sum((a.float() - b).norm() for a, b in zip(grads, reference)) / sum(b.norm() for b in reference)

    _, reference = loss_and_grads(False, torch.float32)
    _, patched = loss_and_grads(True, torch.bfloat16)
    _, plain = loss_and_grads(False, torch.bfloat16)
    assert error(patched, reference) <= 1.1 * error(plain, reference)


def test_evaluation_and_generation_of_a_patched_model_are_sdpa_itself():
    model, reference = tiny_llama(), tiny_llama()
    patch_attention(model)
    ids = token_batch(length=12)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    generated = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference.generate(ids[:, :5], max_new_tokens=4, do_sample=False))


def test_an_encoder_with_padding_and_attention_dropout_still_trains(tmp_path):
    """A bidirectional encoder's padding mask goes through the new backward; with attention dropout the
    call goes to the dropout kernel's attention instead."""
    from transformers import AutoModelForSequenceClassification

    directory = tiny_encoder_dir(tmp_path / "bert")
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    grads = {}
    for patch in (True, False):
        torch.manual_seed(0)  # the classifier head is new
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=2, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0
        )
        if patch:
            assert patch_attention(model)
        model.train()
        model(input_ids=ids, attention_mask=mask).logits.square().sum().backward()
        grads[patch] = [p.grad for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):  # (the key bias's gradient is zero but for rounding)
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)  # attention dropout 0.1
    assert patch_attention(model)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_calls_it_cannot_take_go_to_sdpa():
    class Attention(torch.nn.Module):
        is_causal, num_key_value_groups = True, 3

    module = Attention().train()
    q, k, v, _ = inputs(torch.float32, length=8)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True
    ).transpose(1, 2)
    with torch.no_grad():  # no gradients wanted
        torch.testing.assert_close(attention(module, q, k, v, None)[0], expected)
    out = attention(module, q, k, v, None, dropout=0.0)[0]
    torch.testing.assert_close(out, expected)
    cropped = attention(module, q[:, :, :5], k, v, None)[0]  # fewer queries than keys: SDPA's own alignment
    torch.testing.assert_close(
        cropped,
        F.scaled_dot_product_attention(
            q[:, :, :5], k[:, :, :5].repeat_interleave(3, 1), v[:, :, :5].repeat_interleave(3, 1), is_causal=True
        ).transpose(1, 2),
    )
