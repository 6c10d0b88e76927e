"""The fused, chunked output-projection + cross-entropy equals the plain computation."""

import pytest
import torch
import torch.nn.functional as F

import loratune
from loratune import LoraConfig
from loratune.inference.loss import LinearCrossEntropy, causal_lm_loss_sum, fused_head
from tiny_models import tiny_gpt2, tiny_llama, token_batch


def test_linear_cross_entropy_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h: LinearCrossEntropy.apply(h, weight, targets, 3).double(), (hidden,))


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_loss_and_gradient_equal_the_plain_computation(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (9,))
    fused = LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
    (fused_grad,) = torch.autograd.grad(2.5 * fused, hidden)
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (plain_grad,) = torch.autograd.grad(2.5 * plain, hidden)
    assert (fused - plain).abs() <= 1e-5 * plain.abs()
    assert (fused_grad - plain_grad).abs().max() <= 1e-5


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_model_loss_matches_transformers_loss_with_adapter_gradients(make):
    def run(fused: bool):
        model = make()
        torch.manual_seed(3)
        loratune.add_adapter(model, LoraConfig(r=4, init_lora_weights=False))
        ids = token_batch(length=12)
        labels = ids.clone()
        labels[:, :5] = -100  # a prompt without targets
        attention = torch.ones_like(ids)
        attention[1, -3:] = 0
        labels[1, -3:] = -100
        batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        if fused:
            assert fused_head(model) is not None
            total, count = causal_lm_loss_sum(model, batch, chunk_size=5)
            loss = total / count
        else:
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    fused_loss, fused_grads = run(True)
    plain_loss, plain_grads = run(False)
    assert (fused_loss - plain_loss).abs() <= 1e-5
    for a, b in zip(fused_grads, plain_grads):
        assert (a - b).abs().max() <= 1e-5


def test_a_trained_output_head_uses_the_plain_path():
    model = tiny_llama(tie=False)
    loratune.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert fused_head(model) is None
    ids = token_batch()
    total, count = causal_lm_loss_sum(model, {"input_ids": ids, "labels": ids})
    torch.testing.assert_close(total / count, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("want_grad", [True, False])
@pytest.mark.usefixtures("kernel_isa")
def test_the_compiled_cross_entropy_equals_the_pytorch_operations(monkeypatch, dtype, want_grad):
    """Vocabulary 1003 (not a multiple of the kernel's 16 lanes), large logits, chunks of 5 rows."""
    torch.manual_seed(0)
    hidden = (3 * torch.randn(12, 32)).to(dtype).requires_grad_(want_grad)
    weight = torch.randn(1003, 32).to(dtype)
    targets = torch.randint(0, 1003, (12,))

    def run(kernel: bool):
        monkeypatch.setenv("LORATUNE_NO_KERNEL", "0" if kernel else "1")
        total = LinearCrossEntropy.apply(hidden, weight, targets, 5)
        grad = torch.autograd.grad(total, hidden)[0] if want_grad else None
        return total, grad

    (fused, fused_grad), (plain, plain_grad) = run(True), run(False)
    assert (fused - plain).abs() <= 1e-5 * plain.abs()
    if want_grad:
        assert fused_grad.dtype == dtype
        torch.testing.assert_close(
            fused_grad,
            plain_grad,
            rtol=1e-5 if dtype == torch.float32 else 1e-2,
            atol=1e-6 if dtype == torch.float32 else 1e-3,
        )


def test_a_target_outside_the_vocabulary_is_an_error_not_a_write_past_the_logits():
    from loratune.kernels import fused as fused_cpu

    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    with pytest.raises((IndexError, RuntimeError)):
        LinearCrossEntropy.apply(hidden.requires_grad_(), weight, torch.tensor([1, 20, 2]), 4)
    logits = torch.randn(3, 20)
    before = logits.clone()
    for bad in ([1, 20, 2], [1, -1, 2]):  # the kernel takes raw addresses: it must never see these
        assert fused_cpu.cross_entropy_rows(logits, torch.tensor(bad), want_grad=True) is None
        assert torch.equal(logits, before)
