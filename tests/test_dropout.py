"""Dropout drawn by the compiled kernel: its distribution, determinism, backward, and the attention path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratune.kernels import fused as fused_cpu
from loratune.train.attention import patch_attention
from loratune.train.dropout import KernelDropout, attention, dropout, patch_dropout
from tiny_models import tiny_encoder_dir

pytestmark = pytest.mark.skipif(not fused_cpu.kernel_available(), reason="the compiled kernel is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.usefixtures("kernel_isa")
def test_the_mask_keeps_each_element_with_probability_one_minus_p_and_scales_the_rest(dtype, p):
    x = torch.ones(1_000_003, dtype=dtype)
    out = fused_cpu.dropout(x, p, seed=1234)
    kept = out != 0
    n = x.numel()
    assert abs(int(kept.sum()) - (1 - p) * n) < 5 * (n * p * (1 - p)) ** 0.5  # five standard deviations
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1 / (1 - p), dtype=dtype))
    halves = kept[: n // 2].float().mean(), kept[n // 2 :].float().mean()
    assert abs(halves[0] - halves[1]) < 0.01  # no drift along the tensor
    assert (kept[:-1] & kept[1:]).float().mean() == pytest.approx((1 - p) ** 2, abs=0.01)  # neighbours independent


@pytest.mark.usefixtures("kernel_isa")
def test_the_mask_depends_on_the_seed_only_not_on_the_threads():
    x = torch.randn(300_000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_cpu.dropout(x, 0.3, seed=-7)
        torch.set_num_threads(2)
        two = fused_cpu.dropout(x, 0.3, seed=-7)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert not torch.equal(one, fused_cpu.dropout(x, 0.3, seed=8))


@pytest.mark.usefixtures("kernel_isa")
def test_the_backward_drops_the_same_elements_and_the_generator_seeds_it():
    x = torch.randn(4, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = dropout(x, 0.25)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad != 0, out != 0)
    assert torch.allclose(x.grad[x.grad != 0], torch.tensor(1 / 0.75))
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.25), out)  # torch's generator seeds the kernel
    assert dropout(x, 0.25, training=False) is x


def test_a_patched_model_runs_its_dropout_through_the_kernel_and_is_unchanged_in_eval(tmp_path):
    from transformers import AutoModelForSequenceClassification

    directory = tiny_encoder_dir(tmp_path / "bert")
    reference = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2).eval()
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)
    model.load_state_dict(reference.state_dict())
    assert patch_dropout(model) > 0
    assert patch_attention(model)
    assert any(isinstance(m, KernelDropout) for m in model.modules())
    assert model.config._attn_implementation == "loratune_sdpa"
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 14, 3, 0, 0]])
    mask = (ids != 0).long()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits
        )
    model.train()
    loss = model(input_ids=ids, attention_mask=mask).logits.sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_attention_with_kernel_dropout_averages_to_attention_without_it():
    class Attention(nn.Module):
        is_causal = False

    module = Attention().train()
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=generator) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # the second row's last two keys are padding
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.manual_seed(0)
    mean = sum(attention(module, q, k, v, mask, dropout=0.2)[0] for _ in range(4000)) / 4000
    torch.testing.assert_close(mean, expected, atol=0.03, rtol=0)
    module.eval()  # evaluation (callers pass no dropout then): SDPA itself
    torch.testing.assert_close(attention(module, q, k, v, mask, dropout=0.0)[0], expected)
