"""The lean LoRA-linear autograd function equals the general path and passes gradcheck."""

import pytest
import torch
from torch import nn

from loratune.layers import LoraLinear
from loratune.layers.fused_linear import LoraLinearFunction


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_function_passes_gradcheck_in_float64(bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t, 1.7), (x, weight, b, A, B))


def two_layers(dtype):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 24, dtype=dtype).requires_grad_(False))
    layer.add("a", r=4, lora_alpha=12, init=False)
    layer.active = ("a",)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_equals_the_general_path_in_output_and_gradients(dtype):
    layer = two_layers(dtype)
    x = torch.randn(3, 7, 32, dtype=dtype, requires_grad=True)
    assert layer._single_fusable_adapter(x) == "a"
    fused = layer(x)
    grads_fused = torch.autograd.grad(fused.float().square().sum(), (x, layer.lora_A["a"], layer.lora_B["a"]))
    general = super(LoraLinear, layer).forward(x)
    grads_general = torch.autograd.grad(general.float().square().sum(), (x, layer.lora_A["a"], layer.lora_B["a"]))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert fused.dtype == dtype
    assert (fused.float() - general.float()).norm() <= tolerance * general.float().norm()
    for a, b in zip(grads_fused, grads_general):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).norm() <= tolerance * b.float().norm()


def test_fused_path_keeps_no_copy_of_the_base_weight():
    layer = two_layers(torch.bfloat16)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    weight = layer.base_layer.weight
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert weight.untyped_storage().data_ptr() in storages  # saved by reference
    assert not any(t.shape == weight.T.shape and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
                   for t in saved)
    assert sum(t.numel() for t in saved if t.untyped_storage().data_ptr() not in
               {weight.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}) < x.numel()


def test_dropout_and_several_adapters_take_the_general_path():
    layer = two_layers(torch.float32)
    layer.add("b", r=2, lora_alpha=2, lora_dropout=0.1)
    x = torch.randn(2, 32)
    layer.active = ("a", "b")
    assert layer._single_fusable_adapter(x) is None
    layer.active = ("b",)
    layer.train()
    assert layer._single_fusable_adapter(x) is None
    layer.eval()
    assert layer._single_fusable_adapter(x) == "b"


@pytest.mark.parametrize("rows", [3, 200], ids=["decode-sized", "prefill-sized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_equals_the_general_path(rows, dtype):
    layer = two_layers(dtype)
    x = torch.randn(1, rows, 32, dtype=dtype)
    with torch.no_grad():
        fast = layer(x)
        general = super(LoraLinear, layer).forward(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert fast.dtype == dtype
    assert (fast.float() - general.float()).norm() <= tolerance * general.float().norm()


def test_inference_cache_follows_changes_to_the_factors():
    layer = two_layers(torch.bfloat16)
    x = torch.randn(1, 200, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B["a"].mul_(2.0)  # an in-place update bumps the version: the cached cast must refresh
        after = layer(x)
        general = super(LoraLinear, layer).forward(x)
    assert not torch.equal(before, after)
    assert (after.float() - general.float()).norm() <= 2e-2 * general.float().norm()
