"""The compiled training kernels (``kernels/csrc``): RMSNorm and silu(gate)·up, forward and backward, against the
PyTorch arithmetic they replace, on every path a training step takes through them, in every variant this CPU
runs."""

import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from loratune.kernels import fused as fused_cpu
from loratune.kernels import runnable_isas
from loratune.train.fused_ops import RMSNormFunction, SiluMulFunction

# Row widths around the kernels' 16-element vectors: shorter, a tail, exact multiples.
WIDTHS = [1, 7, 16, 33, 576]


def test_the_kernels_are_built_where_ci_and_users_run():
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        pytest.skip("not a platform the project builds on")
    assert fused_cpu._cpu is not None, "reinstall with `pip install -e .`: loratune.kernels._cpu is missing"
    assert runnable_isas()[:2] == ("none", "baseline")


def torch_rms_norm(x, weight, eps):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def torch_rms_norm_backward(grad, x, weight, rstd):
    xhat = x.float() * rstd
    gh = (grad * weight).float()
    return (rstd * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))).to(x.dtype)


def torch_silu_mul_backward(gate, up, grad):
    g = gate.float()
    sig = torch.sigmoid(g)
    d = grad.float()
    return (d * up.float() * sig * (1 + g * (1 - sig))).to(gate.dtype), (d * g * sig).to(up.dtype)


def assert_close(result, expected, scale=None):
    """float32: relative 1e-5; bf16: what float32 sums in another order can change, one bf16 step at most.
    ``scale``: the size of the terms a result is the difference of, where it cancels (RMSNorm's gradient)."""
    scale = expected.float().abs() if scale is None else scale
    if expected.dtype == torch.float32:
        assert ((result - expected).abs() <= 1e-5 * scale + 1e-6).all()
    else:
        assert ((result.float() - expected.float()).abs() <= scale * 2**-7 + 1e-6).all()
        # almost every element rounds identically (not so where the terms cancel)
        assert (result != expected).float().mean() < 0.01 or scale is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.usefixtures("kernel_isa")
def test_rms_norm_forward_and_backward_match_torch(dtype, width):
    torch.manual_seed(width)
    x = torch.randn(3, 5, width, dtype=dtype) * 3
    weight, grad = torch.randn(width, dtype=dtype), torch.randn(3, 5, width, dtype=dtype)
    out, rstd = fused_cpu.rms_norm(x, weight, 1e-5)
    expected_out, expected_rstd = torch_rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype and rstd.shape == (3, 5, 1)
    torch.testing.assert_close(rstd, expected_rstd, rtol=1e-6, atol=0)
    assert_close(out, expected_out)
    assert torch.equal(fused_cpu.rms_norm_with_rstd(x, weight, rstd), out)  # what backward rebuilds: same bits
    terms = (grad.float() * weight.float() * rstd).abs().amax(-1, keepdim=True)
    assert_close(
        fused_cpu.rms_norm_backward(grad, x, weight, rstd), torch_rms_norm_backward(grad, x, weight, rstd), scale=terms
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.usefixtures("kernel_isa")
def test_silu_mul_forward_and_backward_match_torch(dtype, width):
    torch.manual_seed(width)
    gate, up, grad = (torch.randn(4, width, dtype=dtype) * 4 for _ in range(3))
    assert_close(fused_cpu.silu_mul(gate, up), F.silu(gate) * up)
    for result, expected in zip(fused_cpu.silu_mul_backward(gate, up, grad), torch_silu_mul_backward(gate, up, grad)):
        assert_close(result, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_isa")
def test_split_over_threads_gives_the_same_bits(dtype):
    torch.manual_seed(0)
    gate, up, grad = (torch.randn(300, 1000, dtype=dtype) for _ in range(3))
    x, weight = torch.randn(3000, 100, dtype=dtype), torch.randn(100, dtype=dtype)
    results = []
    for threads in (1, 2, 5):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, rstd = fused_cpu.rms_norm(x, weight, 1e-6)
            results.append(
                [
                    fused_cpu.silu_mul(gate, up),
                    *fused_cpu.silu_mul_backward(gate, up, grad),
                    out,
                    rstd,
                    fused_cpu.rms_norm_backward(x, x, weight, rstd),
                ]
            )
        finally:
            torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_isa")
def test_extremes_behave_like_torch(dtype):
    special = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 100.0, -100.0, 0.0, -0.0, 1e-30] * 3, dtype=dtype
    )
    gate, up, grad = special, special.roll(1), special.roll(2)
    expected = F.silu(gate) * up
    result = fused_cpu.silu_mul(gate, up)
    assert torch.equal(result.isnan(), expected.isnan())
    torch.testing.assert_close(result[~expected.isnan()], expected[~expected.isnan()])
    for r, e in zip(fused_cpu.silu_mul_backward(gate, up, grad), torch_silu_mul_backward(gate, up, grad)):
        assert torch.equal(r.isnan(), e.isnan())
        torch.testing.assert_close(r[~e.isnan()], e[~e.isnan()])
    rows = torch.stack([special[:8], torch.zeros(8, dtype=dtype), torch.full((8,), 3e4, dtype=dtype)])
    out, _ = fused_cpu.rms_norm(rows, torch.ones(8, dtype=dtype), 1e-6)
    expected, _ = torch_rms_norm(rows, torch.ones(8, dtype=dtype), 1e-6)
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out[1:], expected[1:])


@pytest.mark.usefixtures("kernel_isa")
def test_what_the_kernels_cannot_read_goes_to_torch():
    x = torch.randn(4, 16)
    assert fused_cpu.silu_mul(x.T, x.T) is None  # not contiguous
    assert fused_cpu.silu_mul(x, x.bfloat16()) is None  # dtypes differ
    assert fused_cpu.silu_mul(x.double(), x.double()) is None  # float64: PyTorch's exact arithmetic
    assert fused_cpu.silu_mul(x, x[:3]) is None
    assert fused_cpu.rms_norm(x, torch.ones(15), 1e-6) is None
    assert fused_cpu.rms_norm_backward(x, x, torch.ones(16), torch.ones(4, 1, dtype=torch.float64)) is None
    assert fused_cpu.rms_norm_backward(x, x, torch.ones(16), torch.ones(3, 1)) is None
    if torch.cuda.is_available():
        assert fused_cpu.silu_mul(x.cuda(), x.cuda()) is None


@pytest.mark.usefixtures("kernel_isa")
def test_switched_off_with_the_environment_variable(monkeypatch):
    monkeypatch.setenv("LORATUNE_NO_KERNEL", "1")
    assert not fused_cpu.kernel_available()
    assert fused_cpu.silu_mul(torch.randn(16), torch.randn(16)) is None


@pytest.mark.usefixtures("any_isa")
def test_autograd_functions_give_torch_gradients_in_float32():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 40, requires_grad=True)
    weight = torch.randn(40, requires_grad=True)
    gate, up = torch.randn(2, 9, 70, requires_grad=True), torch.randn(2, 9, 70, requires_grad=True)
    outputs = [RMSNormFunction.apply(x, weight, 1e-6), SiluMulFunction.apply(gate, up)]
    xf = x.float()
    expected = [weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)), F.silu(gate) * up]
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        probe = torch.randn_like(out)
        inputs = (x, weight) if out is outputs[0] else (gate, up)
        got = torch.autograd.grad(out, inputs, probe)
        want = torch.autograd.grad(ref, inputs, probe)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("kernel_isa")
def test_silu_backward_may_write_over_its_inputs(dtype):
    torch.manual_seed(0)
    gate, up, grad = (torch.randn(37, 101, dtype=dtype) for _ in range(3))
    expected = fused_cpu.silu_mul_backward(gate, up, grad)
    gate_copy, grad_copy = gate.clone(), grad.clone()
    result = fused_cpu.silu_mul_backward(gate_copy, up, grad_copy, out=(grad_copy, gate_copy))
    assert result[0] is grad_copy and result[1] is gate_copy
    assert torch.equal(result[0], expected[0]) and torch.equal(result[1], expected[1])
