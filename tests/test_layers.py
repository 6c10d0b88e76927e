"""The LoRA math on single layers: initialisation, scaling, forward, dtypes, merge, PiSSA."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune.errors import ConfigError
from loratune.layers import LoraConv1D, LoraEmbedding, LoraLinear, lora_class_for, lora_scaling


def make_linear(seed=0, d_in=64, d_out=48, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, dtype=dtype)


def test_default_init_is_kaiming_uniform_a_and_zero_b():
    layer = LoraLinear(make_linear(d_in=256))
    layer.add_adapter("a", r=16, lora_alpha=32)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    bound = 1 / math.sqrt(256)  # Kaiming-uniform with a=√5: sqrt(6 / ((1 + 5) · fan_in))
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.9 * bound  # uses the whole range, not a smaller one
    assert torch.count_nonzero(B) == 0


def test_gaussian_init_has_std_one_over_r():
    layer = LoraLinear(make_linear(d_in=512, d_out=8))
    layer.add_adapter("a", r=4, lora_alpha=8, init="gaussian")
    std = layer.lora_A["a"].std().item()
    assert std == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["a"]) == 0


def test_embedding_init_is_zero_a_and_normal_b():
    layer = LoraEmbedding(nn.Embedding(50, 16))
    layer.add_adapter("a", r=4, lora_alpha=8)
    assert torch.count_nonzero(layer.lora_A["a"]) == 0
    assert layer.lora_B["a"].std().item() == pytest.approx(1.0, rel=0.3)


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert lora_scaling(8, 16, use_rslora=False) == 2.0
    assert lora_scaling(16, 16, use_rslora=True) == 4.0
    layer = LoraLinear(make_linear())
    layer.add_adapter("plain", r=4, lora_alpha=8)
    layer.add_adapter("rs", r=4, lora_alpha=8, use_rslora=True)
    assert {n: s.scaling for n, s in layer.specs.items()} == {"plain": 2.0, "rs": 4.0}


def test_fresh_adapter_output_is_bit_identical_to_base():
    base = make_linear()
    x = torch.randn(3, 5, 64)
    expected = base(x)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=8, lora_alpha=16)
    layer.set_active(("a",))
    assert torch.equal(layer(x), expected)


def test_forward_equals_base_plus_scaled_low_rank_product():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=4, lora_alpha=12, init=False)
    layer.set_active(("a",))
    x = torch.randn(7, 64)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    expected = layer.base_layer(x) + 3.0 * x @ (B @ A).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_lora_input_only():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=4, lora_alpha=8, lora_dropout=0.5, init=False)
    layer.set_active(("a",))
    layer.train()
    x = torch.randn(4, 64)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    A, B = layer.lora_A["a"], layer.lora_B["a"]
    torch.testing.assert_close(out, layer.base_layer(x) + 2.0 * dropped @ (B @ A).T, rtol=1e-5, atol=1e-5)


def test_float32_adapter_on_bf16_base_returns_bf16_and_trains_in_float32():
    layer = LoraLinear(make_linear(dtype=torch.bfloat16))
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    layer.set_active(("a",))
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.lora_A["a"].dtype == torch.float32
    assert layer.lora_A["a"].grad.dtype == torch.float32
    assert layer.lora_B["a"].grad is not None
    assert x.grad.dtype == torch.bfloat16
    ref = layer.base_layer(x).float() + 2.0 * x.float() @ (layer.lora_B["a"] @ layer.lora_A["a"]).T
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_only_active_adapters_act_and_their_outputs_add_up():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    layer.add_adapter("b", r=2, lora_alpha=2, init=False)
    x = torch.randn(5, 64)
    base = layer.base_layer(x)
    layer.set_active(("a",))
    only_a = layer(x) - base
    layer.set_active(("b",))
    only_b = layer(x) - base
    layer.set_active(("a", "b"))
    torch.testing.assert_close(layer(x) - base, only_a + only_b, rtol=1e-5, atol=1e-5)
    layer.set_active(())
    assert torch.equal(layer(x), base)


def test_strength_scales_the_delta_linearly():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    layer.set_active(("a",))
    x = torch.randn(5, 64)
    delta = layer(x) - layer.base_layer(x)
    for strength in (0.0, 0.5, 1.5, -1.0):
        layer.set_strength("a", strength)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), strength * delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoraLinear(make_linear()),
        lambda: LoraConv1D(Conv1D(48, 64)),
        lambda: LoraEmbedding(nn.Embedding(64, 48)),
    ],
    ids=["linear", "conv1d", "embedding"],
)
def test_merge_matches_unmerged_output_and_unmerge_restores_weight(make):
    torch.manual_seed(0)
    layer = make()
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    layer.set_active(("a",))
    x = torch.randint(0, 64, (3, 6)) if isinstance(layer, LoraEmbedding) else torch.randn(3, 6, 64)
    before = layer(x)
    original = layer.base_layer.weight.detach().clone()
    layer.merge("a")
    torch.testing.assert_close(layer(x), before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(layer.base_layer.weight, original)
    layer.unmerge("a")
    assert (layer.base_layer.weight - original).abs().max() <= 1e-6
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merging_twice_warns_and_adds_once():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    layer.merge("a")
    once = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge("a")
    assert torch.equal(layer.base_layer.weight, once)


def test_safe_merge_refuses_non_finite_weights_and_changes_nothing():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    with torch.no_grad():
        layer.lora_B["a"][0, 0] = float("inf")
    original = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="adapter 'a'.*non-finite"):
        layer.merge("a", safe=True)
    assert torch.equal(layer.base_layer.weight, original)
    assert "a" not in layer.state.merged_names


def test_merge_in_bf16_computes_in_float32_and_unmerge_is_within_bf16_rounding():
    layer = LoraLinear(make_linear(dtype=torch.bfloat16))
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    original = layer.base_layer.weight.detach().clone()
    expected = (original.float() + layer.delta_weight("a")).to(torch.bfloat16)
    layer.merge("a")
    assert torch.equal(layer.base_layer.weight, expected)
    layer.unmerge("a")
    eps = torch.finfo(torch.bfloat16).eps
    assert ((layer.base_layer.weight.float() - original.float()).abs() <= 2 * eps * original.float().abs() + 1e-3).all()


@pytest.mark.parametrize("make", [lambda: LoraLinear(make_linear()), lambda: LoraConv1D(Conv1D(48, 64))])
def test_pissa_residual_plus_adapter_reconstructs_original_weight(make):
    torch.manual_seed(0)
    layer = make()
    original = layer.base_layer.weight.detach().clone()
    layer.add_adapter("p", r=8, lora_alpha=16, init="pissa")
    reconstructed = layer.base_layer.weight.detach() + layer.delta_weight("p")
    assert (reconstructed - original).abs().max() <= 1e-5
    # The adapter holds the top-r singular directions: its delta has rank r and carries the largest values.
    singular = torch.linalg.svdvals(original if isinstance(layer, LoraLinear) else original.T)
    delta_singular = torch.linalg.svdvals(layer.delta_weight("p"))
    torch.testing.assert_close(delta_singular[:8], singular[:8], rtol=1e-4, atol=1e-5)


def test_inactive_pissa_adapter_leaves_the_original_function():
    layer = LoraLinear(make_linear())
    x = torch.randn(4, 64)
    expected = layer.base_layer(x)
    layer.add_adapter("p", r=8, lora_alpha=16, init="pissa")
    layer.set_active(())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.set_active(("p",))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_removing_a_pissa_adapter_restores_the_original_weight():
    layer = LoraLinear(make_linear())
    original = layer.base_layer.weight.detach().clone()
    layer.add_adapter("p", r=8, lora_alpha=16, init="pissa")
    layer.remove_adapter("p")
    assert (layer.base_layer.weight - original).abs().max() <= 1e-5


def test_pissa_on_embeddings_is_refused_with_a_clear_error():
    layer = LoraEmbedding(nn.Embedding(10, 8))
    with pytest.raises(ConfigError, match="PiSSA.*embeddings"):
        layer.add_adapter("p", r=2, lora_alpha=4, init="pissa")


def test_duplicate_adapter_name_on_a_layer_is_refused():
    layer = LoraLinear(make_linear())
    layer.add_adapter("a", r=2, lora_alpha=4)
    with pytest.raises(ConfigError, match="'a' already exists"):
        layer.add_adapter("a", r=2, lora_alpha=4)


def test_lora_class_for_supported_and_unsupported_modules():
    assert lora_class_for(nn.Linear(2, 2)) is LoraLinear
    assert lora_class_for(Conv1D(2, 2)) is LoraConv1D
    assert lora_class_for(nn.Embedding(2, 2)) is LoraEmbedding
    assert lora_class_for(nn.LayerNorm(2)) is None


# --- the no-grad fast path (cached factors) follows every change of the layer ---------------------------


def reference_output(layer, x):
    """base(x) + Σ_active s·strength·B·A·x, computed from scratch in float32."""
    out = layer.base_layer(x.float()).float() if x.dtype == torch.float32 else layer.base_layer(x).float()
    for name in layer.state.active:
        if name in layer.specs and layer.state.merged_scale(name) is None:
            A, B = layer.lora_A[name].float(), layer.lora_B[name].float()
            out = out + layer.effective_scale(name) * x.float() @ (B @ A).T
    return out


def two_adapter_layer(dtype=torch.float32):
    layer = LoraLinear(make_linear(dtype=dtype))
    layer.add_adapter("a", r=4, lora_alpha=8, init=False)
    layer.add_adapter("b", r=2, lora_alpha=8, init=False)
    layer.set_active(("a",))
    return layer


def test_no_grad_output_follows_in_place_factor_updates_strength_and_switches():
    layer, x = two_adapter_layer(), torch.randn(5, 64)
    with torch.no_grad():
        layer(x)  # builds the cached plan
        layer.lora_B["a"].mul_(3.0)  # e.g. an optimizer step
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
        layer.set_strength("a", 0.25)
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
        layer.set_active(("b",))
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
        layer.merge("b")
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
        layer.unmerge("b")
        layer.remove_adapter("b")
        layer.add_adapter("b", r=3, lora_alpha=3, init=False)  # same name, new factors
        torch.testing.assert_close(layer(x), reference_output(layer, x), rtol=1e-5, atol=1e-5)
        layer.set_base_only(True)
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 64, 65, 300])
def test_bf16_no_grad_path_matches_the_float32_reference_for_few_and_many_rows(rows):
    layer = two_adapter_layer(torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = reference_output(layer, x)
    assert (out.float() - reference).norm() / reference.norm() < 1e-2


def test_no_grad_and_grad_paths_agree():
    layer, x = two_adapter_layer(), torch.randn(2, 3, 64)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x).detach(), rtol=1e-5, atol=1e-6)
