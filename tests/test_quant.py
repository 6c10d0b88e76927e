"""The 4-bit base layer (``quant.Linear4bit``, bitsandbytes NF4/FP4) and LoRA over it (``LoraLinear``).

References are computed in float32 on the dequantized weight: LoRA over a 4-bit base must be exactly LoRA over
that dense weight (‖out − ref‖/‖ref‖ ≤ 1e-5 in fp32, ≤ 1e-2 in bf16), for outputs and for the gradients of the
input and of both factors.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loratune
from loratune.adapters.peft_keys import factor_keys
from loratune.errors import ConfigError
from loratune.layers import LoraLinear, LoraLinear4bit, lora_class_for
from loratune.quant import Linear4bit, QuantSpec, dequantize_weight, quantize_weight

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
IN, OUT, R = 96, 80, 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def make_layer(dtype=torch.float32, quant_type="nf4", bias=False, seed=0) -> Linear4bit:
    torch.manual_seed(seed)
    weight = torch.randn(OUT, IN) * 0.05
    spec = QuantSpec(quant_type, double_quant=True, compute_dtype=dtype)
    return Linear4bit.from_weight(weight, torch.randn(OUT) * 0.1 if bias else None, spec)


def lora_over(base: nn.Module, seed=1) -> LoraLinear:
    layer = lora_class_for(base)(base)
    torch.manual_seed(seed)
    layer.add_adapter("default", R, 2 * R, init=False)  # non-zero B: the adapter path counts
    layer.set_active(("default",))
    return layer


def reference(x, dense, bias, A, B, scale):
    """float32 LoRA on the dequantized weight."""
    x = x.float()
    out = x @ dense.float().T + scale * (x @ A.float().T) @ B.float().T
    return out if bias is None else out + bias.float()


# --- storage ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantized_weight_is_close_to_the_original(quant_type):
    weight = torch.randn(64, 128)
    packed, state = quantize_weight(weight, QuantSpec(quant_type, compute_dtype=torch.float32))
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() // 2
    assert state.quant_type == quant_type and state.blocksize == 64
    assert rel(dequantize_weight(packed, state), weight) < 0.15


def test_nf4_and_fp4_store_different_codes():
    weight = torch.randn(64, 128)
    nf4, _ = quantize_weight(weight, QuantSpec("nf4"))
    fp4, _ = quantize_weight(weight, QuantSpec("fp4"))
    assert not torch.equal(nf4, fp4)


def test_double_quant_stores_about_half_a_byte_per_parameter():
    weight = torch.randn(512, 512)
    double = Linear4bit.from_weight(weight, None, QuantSpec("nf4", double_quant=True))
    single = Linear4bit.from_weight(weight, None, QuantSpec("nf4", double_quant=False))
    per_param = double.storage_bytes() / weight.numel()
    assert 0.51 < per_param < 0.53  # 4 bits + 8-bit absmax per 64 + float32 per 256 blocks
    assert single.storage_bytes() / weight.numel() == pytest.approx(0.5 + 4 / 64, rel=1e-3)  # float32 absmax


def test_dequantized_weight_comes_in_the_compute_dtype():
    layer = make_layer(torch.bfloat16)
    assert layer.dequantized_weight().dtype == torch.bfloat16
    assert layer.dequantized_weight(torch.float32).dtype == torch.float32


@pytest.mark.parametrize("bad", [torch.zeros(8, 8, dtype=torch.int8), torch.zeros(64), torch.zeros(2, 4, 8)])
def test_weight_that_cannot_be_quantized_raises_config_error_naming_it(bad):
    with pytest.raises(ConfigError, match="layers.0.q_proj.weight"):
        quantize_weight(bad, QuantSpec(), name="layers.0.q_proj.weight")


def test_unknown_quant_type_raises_config_error():
    with pytest.raises(ConfigError, match="nf4"):
        QuantSpec("int4")


def test_quantized_layer_round_trips_through_a_safetensors_state_dict(tmp_path):
    layer = make_layer(bias=True)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = Linear4bit(IN, OUT, True, layer.spec)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    assert torch.equal(fresh.weight, layer.weight)
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())
    assert torch.equal(fresh.bias, layer.bias)


def test_state_dict_uses_the_bitsandbytes_key_names():
    keys = set(make_layer().state_dict())
    assert keys == {
        "weight",
        "weight.absmax",
        "weight.quant_map",
        "weight.nested_absmax",
        "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4",
    }


def test_casting_the_module_to_another_dtype_leaves_the_quantized_weight_unchanged():
    layer = make_layer()
    before = layer.dequantized_weight()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8
    assert torch.equal(layer.dequantized_weight(), before)


# --- the 4-bit layer alone -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_linear_forward_and_input_gradient_match_the_dequantized_weight(dtype):
    layer = make_layer(dtype, bias=True)
    x = torch.randn(3, 5, IN, dtype=dtype, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    dense = layer.dequantized_weight(torch.float32)
    x_ref = x.detach().float().requires_grad_()
    ref = x_ref @ dense.T + layer.bias.float()
    ref.backward(grad.float())
    assert out.dtype == dtype
    assert rel(out, ref) <= TOLERANCE[dtype]
    assert rel(x.grad, x_ref.grad) <= TOLERANCE[dtype]
    assert layer.weight.grad is None


# --- LoRA over the 4-bit layer ---------------------------------------------------------------------------------------


def test_lora_wraps_a_4bit_linear_as_a_linear_layer_with_the_peft_key_names():
    layer = lora_over(make_layer())
    assert isinstance(layer, LoraLinear4bit) and isinstance(layer, LoraLinear) and not layer.embedding
    assert factor_keys("m", layer.embedding) == ("base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight")
    assert layer.lora_A["default"].shape == (R, IN) and layer.lora_B["default"].shape == (OUT, R)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_4bit_forward_matches_lora_over_the_dequantized_weight(dtype, bias):
    layer = lora_over(make_layer(dtype, bias=bias))
    x = torch.randn(2, 7, IN, dtype=dtype)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    ref = reference(
        x,
        layer.base_layer.dequantized_weight(torch.float32),
        layer.base_layer.bias,
        A,
        B,
        layer.specs["default"].scaling,
    )
    out = layer(x)
    assert out.dtype == dtype
    assert rel(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_4bit_gradients_of_input_and_factors_match_an_fp32_reference(dtype):
    layer = lora_over(make_layer(dtype)).train()
    x = torch.randn(2, 7, IN, dtype=dtype, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)

    A = layer.lora_A["default"].detach().clone().requires_grad_()
    B = layer.lora_B["default"].detach().clone().requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    reference(
        x_ref, layer.base_layer.dequantized_weight(torch.float32), None, A, B, layer.specs["default"].scaling
    ).backward(grad.float())
    assert rel(x.grad, x_ref.grad) <= TOLERANCE[dtype]
    assert rel(layer.lora_A["default"].grad, A.grad) <= TOLERANCE[dtype]
    assert rel(layer.lora_B["default"].grad, B.grad) <= TOLERANCE[dtype]
    assert layer.lora_A["default"].grad.dtype == torch.float32  # factor grads in the factors' own dtype


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_dense_weight_is_kept_between_forward_and_backward(dropout):
    layer = lora_class_for(make_layer(torch.bfloat16))(make_layer(torch.bfloat16))
    layer.add_adapter("default", R, 2 * R, init=False, lora_dropout=dropout)
    layer.set_active(("default",))
    layer.train()
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = torch.randn(4, IN, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    out.sum().backward()
    assert saved_shapes, "the graph saved nothing: the check would be vacuous"
    assert all(shape not in ((OUT, IN), (IN, OUT)) for shape, _ in saved_shapes), saved_shapes


def test_lora_4bit_with_two_active_adapters_adds_both():
    layer = lora_over(make_layer())
    torch.manual_seed(2)
    layer.add_adapter("second", R, R, init=False)
    layer.set_active(("default", "second"))
    x = torch.randn(5, IN)
    dense = layer.base_layer.dequantized_weight(torch.float32)
    ref = reference(x, dense, None, layer.lora_A["default"], layer.lora_B["default"], layer.specs["default"].scaling)
    ref = ref + layer.specs["second"].scaling * (x @ layer.lora_A["second"].T) @ layer.lora_B["second"].detach().T
    assert rel(layer(x), ref) <= 1e-5


def test_base_only_runs_the_4bit_base_without_adapters():
    layer = lora_over(make_layer())
    layer.set_base_only(True)
    x = torch.randn(5, IN)
    assert torch.allclose(layer(x), layer.base_layer(x))


# --- what a 4-bit base refuses ----------------------------------------------------------------------------------------


def test_in_place_merge_on_a_4bit_layer_refuses_pointing_to_loratune_merge():
    layer = lora_over(make_layer())
    with pytest.raises(ConfigError, match="loratune merge.*--requantize"):
        layer.merge("default")
    assert not layer.state.merged


def test_pissa_on_a_4bit_layer_refuses():
    layer = lora_class_for(make_layer())(make_layer())
    with pytest.raises(ConfigError, match="PiSSA.*4 bits"):
        layer.add_adapter("default", R, R, init="pissa")


def test_model_merge_over_4bit_layers_refuses_and_changes_nothing():
    from loratune.models.quantized import quantize_model
    from tiny_models import tiny_llama

    model = tiny_llama()
    model.lm_head = nn.Linear(32, 96, bias=False)  # an untied plain Linear that LoRA also adapts
    quantize_model(model, QuantSpec(compute_dtype=torch.float32), unquantized=["embeddings", "norms", "output_head"])
    loratune.add_adapter(model, loratune.LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    head_before = model.lm_head.base_layer.weight.detach().clone()
    with pytest.raises(ConfigError, match="loratune merge"):
        loratune.merge(model)
    assert torch.equal(model.lm_head.base_layer.weight, head_before)
    assert not loratune.adapters.merged_adapters(model)


def test_a_trainable_bias_in_another_dtype_gets_its_gradient_in_its_own_dtype():
    layer = lora_over(make_layer(torch.bfloat16, bias=True)).train()
    layer.base_layer.bias.data = layer.base_layer.bias.data.float()
    layer.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    layer(x).sum().backward()
    assert layer.base_layer.bias.grad.dtype == torch.float32
    assert torch.allclose(layer.base_layer.bias.grad, torch.full((OUT,), 3.0))
