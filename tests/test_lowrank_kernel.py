"""The compiled CPU kernel for a LoRA layer's update on a few rows (``kernels/csrc/lowrank_body.h``), alone and as
the no-grad path of ``LoraLinear``, in every variant this CPU runs; and the plan cache that decides when it
runs."""

import platform
import sys

import pytest
import torch
from torch import nn

from loratune.kernels import lowrank as lowrank_cpu
from loratune.kernels import runnable_isas
from loratune.kernels.lowrank import add_low_rank_, row_blocks
from loratune.layers import LoraLinear, Routing
from loratune.layers.execution import trace


def test_the_kernel_is_built_where_ci_and_users_run():
    # pip install builds it wherever a C compiler exists; a silent build failure must not pass unnoticed
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        pytest.skip("not a platform the project builds on")
    assert lowrank_cpu._cpu is not None, "reinstall with `pip install -e .`: loratune.kernels._cpu is missing"
    assert lowrank_cpu._cpu.isa() in runnable_isas()[1:]


def reference(out, x, A, sBt):
    """The update in float64: out + (x·Aᵀ)·sBt."""
    return out.double() + (x.double() @ A.double().T) @ sBt.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "rows, d_in, d_out, rank",
    [
        (1, 576, 1536, 8),  # one decoding row of SmolLM2's MLP
        (8, 1536, 576, 8),
        (5, 17, 33, 3),  # every loop has a remainder: rows % 4, in % 16, out % 16, rank % 8
        (4, 16, 16, 8),  # no remainder anywhere
        (3, 1, 1, 1),
        (64, 64, 48, 9),
        (2, 40, 70, 64),
        (1, 8, 20, 1024),  # the largest rank the kernel takes
        (0, 16, 16, 8),  # an empty batch writes nothing
    ],
)
@pytest.mark.usefixtures("kernel_isa")
def test_kernel_matches_a_float64_reference(dtype, rows, d_in, d_out, rank):
    torch.manual_seed(rows * 1000 + d_in + d_out + rank)
    x = torch.randn(rows, d_in).to(dtype)
    out = torch.randn(rows, d_out).to(dtype)
    A, sBt = torch.randn(rank, d_in) / d_in**0.5, torch.randn(rank, d_out) / rank**0.5
    expected = reference(out, x, A, sBt)
    result = add_low_rank_(out.clone(), x, A, sBt)
    if dtype == torch.float32:
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        # float32 arithmetic, one rounding to bf16 at the end: within one bf16 step of the exact value, plus the
        # float32 sums' own error where terms cancel (relative to the terms, not to their small sum)
        terms = out.double().abs() + (x.double() @ A.double().T).abs() @ sBt.double().abs()
        step = expected.abs().clamp_min(1e-30) * 2.0**-8 + terms * 2.0**-20
        assert ((result.double() - expected).abs() <= step).all()


@pytest.mark.usefixtures("kernel_isa")
def test_kernel_rounds_like_torch_and_keeps_nan_and_inf():
    torch.manual_seed(0)
    x = torch.randn(6, 96, dtype=torch.bfloat16)
    out = torch.randn(6, 80, dtype=torch.bfloat16)
    out[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    A, sBt = torch.randn(8, 96) * 0.1, torch.randn(8, 80) * 0.1
    delta = torch.nn.functional.linear(x.float(), A) @ sBt
    expected = out.clone()
    expected.add_(delta)  # what the PyTorch path computes: float32 sum, rounded to nearest even
    result = add_low_rank_(out.clone(), x, A, sBt)
    assert torch.equal(result.isnan(), expected.isnan())
    finite = ~expected.isnan()
    # summation order may differ from the BLAS; at most a few elements land on the other side of a tie
    assert (result[finite] != expected[finite]).sum() <= 3
    assert torch.equal(result[0, 1:3], expected[0, 1:3])


@pytest.mark.usefixtures("kernel_isa")
def test_kernel_refuses_what_it_cannot_read():
    x, out = torch.randn(2, 16), torch.randn(2, 8)
    A, sBt = torch.randn(4, 16), torch.randn(4, 8)
    with pytest.raises(ValueError, match="shapes or layout"):
        add_low_rank_(out, x.T.contiguous().T, A, sBt)  # non-contiguous x
    with pytest.raises(ValueError, match="shapes or layout"):
        add_low_rank_(out, torch.randn(3, 16), A, sBt)  # rows differ
    with pytest.raises(ValueError, match="shapes or layout"):
        add_low_rank_(out.bfloat16(), x, A, sBt)  # dtypes differ
    with pytest.raises(ValueError, match="float32"):
        add_low_rank_(out, x, A.double(), sBt)
    with pytest.raises(ValueError, match="float32"):
        add_low_rank_(out.half(), x.half(), A, sBt)  # fp16 activations take the PyTorch path
    with pytest.raises(ValueError, match="float32"):
        add_low_rank_(out, x, torch.randn(4, 32)[:, ::2], sBt)  # non-contiguous A
    too_many = lowrank_cpu.MAX_RANK + 1
    with pytest.raises(ValueError, match=f"rank ≤ {lowrank_cpu.MAX_RANK}"):
        add_low_rank_(out, x, torch.randn(too_many, 16), torch.randn(too_many, 8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.usefixtures("kernel_isa")
def test_kernel_gives_each_group_of_rows_its_own_block_of_the_factors(dtype):
    torch.manual_seed(1)
    groups, per_group, d_in, d_out = 4, 3, 40, 24  # e.g. 4 prompts of 3 positions each
    A, sBt = torch.randn(11, d_in) * 0.2, torch.randn(11, d_out) * 0.2  # stacked ranks 5, 2 and 4
    mask = torch.zeros(groups, 11)
    for g, (start, stop) in enumerate([(0, 5), (5, 7), (0, 0), (7, 11)]):  # group 2: no adapter
        mask[g, start:stop] = 1
    blocks = row_blocks(mask)
    assert blocks.tolist() == [[0, 5], [5, 2], [0, 0], [7, 4]]
    x = torch.randn(groups * per_group, d_in).to(dtype)
    out = torch.randn(groups * per_group, d_out).to(dtype)
    result = add_low_rank_(out.clone(), x, A, sBt, blocks)
    row_mask = mask.repeat_interleave(per_group, dim=0).double()
    expected = out.double() + ((x.double() @ A.double().T) * row_mask) @ sBt.double()
    tolerance = 1e-5 if dtype == torch.float32 else 2.0**-8
    assert ((result.double() - expected).abs() <= tolerance * expected.abs().clamp_min(1)).all()
    assert torch.equal(result[2 * per_group : 3 * per_group], out[2 * per_group : 3 * per_group])


@pytest.mark.usefixtures("kernel_isa")
def test_kernel_refuses_blocks_outside_the_factors():
    x, out = torch.randn(4, 16), torch.randn(4, 8)
    A, sBt = torch.randn(6, 16), torch.randn(6, 8)
    with pytest.raises(ValueError, match="outside the factors"):
        add_low_rank_(out, x, A, sBt, torch.tensor([[0, 6], [4, 3]]))
    with pytest.raises(ValueError, match="outside the factors"):
        add_low_rank_(out, x, A, sBt, torch.tensor([[-1, 2], [0, 1]]))
    with pytest.raises(ValueError, match="dividing the 4 rows"):
        add_low_rank_(out, x, A, sBt, torch.tensor([[0, 1], [0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="int64"):
        add_low_rank_(out, x, A, sBt, torch.tensor([[0, 1], [0, 1]], dtype=torch.int32))


@pytest.mark.usefixtures("kernel_isa")
def test_mixed_batch_rows_take_the_kernel_and_match_their_own_adapter():
    torch.manual_seed(2)
    layer = LoraLinear(nn.Linear(72, 40, dtype=torch.bfloat16))
    layer.add_adapter("a", r=6, lora_alpha=12, init=False)
    layer.add_adapter("b", r=3, lora_alpha=3, init=False)
    layer.eval()
    x = torch.randn(4, 2, 72, dtype=torch.bfloat16)
    names = ["b", "__base__", "a", "b"]
    with torch.no_grad():
        layer.set_routing(Routing(tuple(names)))
        mixed, backend = ran(layer, x)
        assert backend == "kernel"
        layer.set_routing(None)
        for i, name in enumerate(names):
            layer.set_active(() if name == "__base__" else (name,))
            torch.testing.assert_close(mixed[i], layer(x[i : i + 1])[0], rtol=1e-2, atol=1e-2)
        layer.set_active(())
        assert torch.equal(mixed[1], layer.base_layer(x[1]))  # no adapter: the base output, untouched


def ran(layer, x) -> tuple[torch.Tensor, str]:
    """``layer(x)`` and the backend that computed it."""
    with trace() as backends:
        out = layer(x)
    return out, backends[0]


def lora_layer(dtype, bias, seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(72, 40, bias=bias, dtype=dtype))
    layer.add_adapter("a", r=6, lora_alpha=12, init=False)
    layer.set_active(("a",))
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 72), (8, 1, 72), (64, 72), (3, 5, 72)])
@pytest.mark.usefixtures("kernel_isa")
def test_layer_takes_the_kernel_and_agrees_with_the_pytorch_path(monkeypatch, dtype, bias, shape):
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        out, backend = ran(lora_layer(dtype, bias), x)
        assert backend == "kernel"  # few rows on a CPU
        monkeypatch.setenv("LORATUNE_NO_KERNEL", "1")
        expected, backend = ran(lora_layer(dtype, bias), x)
        assert backend == "plan"
    assert out.shape == expected.shape and out.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert (out != expected).float().mean() < 0.01  # the same float32 sum, rounded once; rare ties differ
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.usefixtures("kernel_isa")
def test_layer_leaves_many_rows_and_non_contiguous_inputs_to_pytorch():
    layer = lora_layer(torch.bfloat16, bias=False)
    with torch.no_grad():
        many = torch.randn(65, 72, dtype=torch.bfloat16)
        assert ran(layer, many)[1] == "plan"  # a prompt's rows: bf16 products
        strided = torch.randn(4, 144, dtype=torch.bfloat16)[:, ::2]  # rows of 72 with a stride of 144
        (by_plan, plan), (by_kernel, kernel) = ran(layer, strided), ran(layer, strided.contiguous())
        assert (plan, kernel) == ("plan", "kernel")
        torch.testing.assert_close(by_plan, by_kernel, rtol=0, atol=0)


def test_no_grad_output_follows_strengths_training_mode_and_moves():
    layer = lora_layer(torch.float32, bias=False)
    x = torch.randn(3, 72)
    with torch.no_grad():
        base = layer.base_layer(x)
        full = layer(x)
        layer.set_strength("a", 0.0)
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)
        layer.set_strength("a", 1.0)
        torch.testing.assert_close(layer(x), full, rtol=0, atol=0)
        layer.train()
        torch.testing.assert_close(layer(x), full, rtol=0, atol=0)
        layer.to(torch.float64)
        out = layer(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, full.double(), rtol=1e-6, atol=1e-6)
        layer.lora_B["a"].zero_()  # an in-place change of a moved factor
        torch.testing.assert_close(layer(x.double()), layer.base_layer(x.double()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "rows, d_in, d_out, rank, grouped",
    [
        (1, 576, 1536, 8, False),  # a decoding row
        (42, 576, 1536, 8, False),  # a prompt's rows
        (7, 40, 300, 5, False),  # rows % 4, spans over threads that are no multiple of eight columns
        (64, 48, 260, 200, False),  # more of h than fits the kernel's stack: h on the heap
        (12, 40, 264, 11, True),  # a mixed-adapter batch: each group of rows its own block of the factors
    ],
)
@pytest.mark.usefixtures("kernel_isa")
def test_the_update_spread_over_threads_has_the_bits_of_one_thread(dtype, rows, d_in, d_out, rank, grouped):
    # lora_rows (one LoRA layer's output in one call) and add_low_rank with threads add h·sBt by spans of output
    # columns on every thread: bit for bit the product followed by add_low_rank on one thread
    from loratune.kernels import rows as rows_kernel

    torch.manual_seed(rows + d_out + rank)
    x = torch.randn(rows, d_in).to(dtype)
    weight, bias = torch.randn(d_out, d_in).to(dtype), torch.randn(d_out).to(dtype)
    A, sBt = torch.randn(rank, d_in) / d_in**0.5, torch.randn(rank, d_out) / rank**0.5
    blocks = torch.tensor([[0, 5], [5, 0], [2, 9], [0, 11]]) if grouped else None
    is_bf16 = int(dtype == torch.bfloat16)
    expected = torch.empty(rows, d_out, dtype=dtype)
    lowrank_cpu._cpu.linear_rows(
        expected.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), rows, d_in, d_out, is_bf16, 1
    )
    expected_base = expected.clone()
    add_low_rank_(expected, x, A, sBt, blocks, threads=1)
    for threads in (1, 2, 3):
        out = torch.empty(rows, d_out, dtype=dtype)
        rows_kernel.raw_lora()(
            *(out.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), rows, d_in, d_out),
            *(is_bf16, A.data_ptr(), sBt.data_ptr(), rank),
            *(0 if blocks is None else blocks.data_ptr(), rows // len(blocks) if grouped else 1, threads),
        )
        assert torch.equal(out, expected), threads
        # the update alone, spread the same way where the rows are many
        spread = add_low_rank_(out.copy_(expected_base), x, A, sBt, blocks, threads=threads)
        assert torch.equal(spread, expected), threads
