"""Every execution backend against the reference: the one test matrix.

{Linear, Conv1D, Embedding, 4-bit} × {LoRA, DoRA} × {training, no-grad few rows, no-grad many rows, mixed batch
in training, mixed batch without grad} × {fp32, bf16} × {kernel, no kernel}: the output (and, with autograd, the
gradients of the input, the factors and DoRA's magnitude) equals ``reference_forward``'s, and the backend that ran
(``execution.trace``) is the one the design says, so a fast path that silently falls back cannot pass for one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune.kernels.lowrank import kernel_available
from loratune.layers import LoraLinear, Routing, lora_class_for
from loratune.layers.execution import trace
from loratune.layers.fused_linear import LoraLinearFunction
from loratune.quant import Linear4bit, QuantSpec

IN, OUT, VOCAB = 48, 40, 64
KINDS = ["linear", "conv1d", "embedding", "4bit"]
MODES = ["training", "few-rows", "many-rows", "mixed-training", "mixed-no-grad"]
ROUTING = ("b", "__base__", "a", "b")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_base(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(IN, OUT, dtype=dtype)
    if kind == "conv1d":
        conv = Conv1D(OUT, IN)
        nn.init.normal_(conv.bias)
        return conv.to(dtype)
    if kind == "embedding":
        return nn.Embedding(VOCAB, OUT, dtype=dtype)
    return Linear4bit.from_linear(nn.Linear(IN, OUT), QuantSpec("nf4", compute_dtype=dtype))


def make_layer(kind: str, dtype: torch.dtype, variant: str = "lora"):
    """Adapters "a" (DoRA in the "dora" variant) and "b" (rsLoRA at strength 0.7)."""
    base = make_base(kind, dtype).requires_grad_(False)
    layer = lora_class_for(base)(base)
    torch.manual_seed(1)
    layer.add_adapter("a", 4, 8, init=False, use_dora=variant == "dora")
    layer.add_adapter("b", 2, 6, init=False, use_rslora=True)
    layer.set_strength("b", 0.7)
    with torch.no_grad():
        for name in ("a", "b"):
            layer.lora_A[name].normal_()  # an embedding's A starts at zero
        if variant == "dora":
            layer.lora_magnitude_vector["a"].mul_(torch.rand(OUT) + 0.5)
    return layer


def make_input(kind: str, dtype: torch.dtype, rows: int, positions: int) -> torch.Tensor:
    torch.manual_seed(2)
    if kind == "embedding":
        return torch.randint(0, VOCAB, (rows, positions))
    return torch.randn(rows, positions, IN, dtype=dtype)


def expected_backend(kind: str, mode: str, kernel: bool, variant: str = "lora") -> str:
    if kind == "embedding" or (variant == "dora" and mode == "mixed-training"):
        return "reference"
    return {"training": "fused", "mixed-training": "stacked", "many-rows": "plan"}.get(
        mode, "kernel" if kernel else "plan"
    )


def ran(layer, x: torch.Tensor) -> str:
    """The backend that actually computed ``layer(x)`` (in the current grad mode)."""
    with trace() as backends:
        layer(x)
    assert len(backends) == 1
    return backends[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_equals_the_reference(monkeypatch, kind, variant, mode, dtype, kernel):
    if kernel and not kernel_available():
        pytest.skip("the compiled kernel is not built here")
    if not kernel:
        monkeypatch.setenv("LORATUNE_NO_KERNEL", "1")
    layer = make_layer(kind, dtype, variant)
    mixed = mode.startswith("mixed")
    rows, positions = {"few-rows": (1, 3), "many-rows": (2, 100)}.get(mode, (len(ROUTING), 2) if mixed else (2, 5))
    x = make_input(kind, dtype, rows, positions)
    if mixed:
        layer.set_routing(Routing(ROUTING))
    else:
        layer.set_active(("a", "b") if mode == "many-rows" else ("a",))
    grad = mode in ("training", "mixed-training")
    layer.train(grad)
    with torch.set_grad_enabled(grad):
        if not grad:
            with trace() as backends:
                out = layer(x)
            assert backends == [expected_backend(kind, mode, kernel, variant)]
            ref = layer.reference_forward(x)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert relative(out, ref) <= TOLERANCE[dtype]
            return
        factors = [
            layer.lora_A["a"],
            layer.lora_B["a"],
            layer.lora_A["b"],
            layer.lora_B["b"],
            *layer.lora_magnitude_vector.values(),
        ]
        leaves = [x.requires_grad_()] if x.is_floating_point() else []
        for factor in factors:
            factor.requires_grad_(True)
        with trace() as backends:
            out = layer(x)
        assert backends == [expected_backend(kind, mode, kernel, variant)]
        upstream = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves + factors, upstream, allow_unused=True)
        ref = layer.reference_forward(x)
        ref_grads = torch.autograd.grad(ref, leaves + factors, upstream, allow_unused=True)
    assert out.dtype == ref.dtype and relative(out, ref) <= TOLERANCE[dtype]
    for got, want in zip(grads, ref_grads):
        if want is None:
            assert got is None or not got.any()
            continue
        assert got.dtype == want.dtype and relative(got, want) <= TOLERANCE[dtype]


# --- what the backends promise beyond the output ----------------------------------------------------------


def test_dropout_in_training_and_a_trainable_base_take_the_reference():
    layer = make_layer("linear", torch.float32)
    layer.set_active(("a",))
    x = torch.randn(2, IN)
    layer.train()
    assert ran(layer, x) == "fused"
    layer.add_adapter("dropped", 2, 2, lora_dropout=0.1)
    layer.set_active(("dropped",))
    assert ran(layer, x) == "reference"
    layer.eval()
    assert ran(layer, x) == "fused"
    layer.set_active(("a",))
    layer.base_layer.weight.requires_grad_(True)  # the fused path gives the base weight no gradient
    assert ran(layer, x) == "reference"
    with torch.no_grad():
        assert ran(layer, x) in ("kernel", "plan")


def test_a_subclass_of_linear_runs_as_it_is():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    base = Scaled(IN, OUT).requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("a", 2, 2)
    layer.set_active(("a",))
    x = torch.randn(3, IN)
    assert ran(layer, x) == "reference"
    torch.testing.assert_close(layer(x), 2 * nn.functional.linear(x, base.weight, base.bias))


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_function_passes_gradcheck_in_float64(bias):
    torch.manual_seed(0)
    base = nn.Linear(5, 4, bias=bias, dtype=torch.float64).requires_grad_(False)
    layer = LoraLinear(base)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    b = base.bias.requires_grad_(True) if bias else None
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b, A, B: LoraLinearFunction.apply(x, layer, b, A, B, 1.7), (x, b, A, B))


def test_the_fused_path_keeps_no_copy_of_the_base_weight():
    layer = make_layer("linear", torch.bfloat16)
    layer.set_active(("a",))
    layer.train()
    x = torch.randn(2, 16, IN, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert saved, "nothing was saved: the check would be vacuous"
    weight = layer.base_layer.weight
    assert not any(t.shape in (weight.shape, weight.T.shape) for t in saved)
    assert sum(t.numel() for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()) < x.numel()


@pytest.mark.parametrize("positions", [1, 40])  # the kernel's few rows, and the plain products
@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_rerouted_batch_after_batch_equals_the_reference(kind, variant, positions):
    """A server's batches: the same layer sees routing after routing (rows join, leave, mix at weights)."""
    layer = make_layer(kind, torch.float32, variant)
    routings = [
        ("b", "__base__", "a", "b"),
        ("a", "b", "b"),
        ("b", "a"),
        ((("a", 0.5), ("b", 2.0)), "b", ()),
        ("b", "b", "a", "__base__", "a"),
        ("b", "__base__", "a", "b"),
    ]
    for names in routings:
        layer.set_routing(Routing(names))
        x = make_input(kind, torch.float32, len(names), positions)
        with torch.no_grad():
            assert relative(layer(x), layer.reference_forward(x)) <= TOLERANCE[torch.float32], names


def test_a_batch_that_does_not_fit_the_routing_is_one_clear_error():
    from loratune.errors import ConfigError

    for kind in KINDS:
        layer = make_layer(kind, torch.float32)
        layer.set_routing(Routing(ROUTING))
        x = make_input(kind, torch.float32, 3, 2)
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(ConfigError, match="4 names but the batch has 3 rows"):
                layer(x)
