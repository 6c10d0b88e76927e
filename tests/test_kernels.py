"""The kernels' loader: which variants this machine runs, that choosing one (``use_isa``, ``LORATUNE_KERNEL_ISA``)
takes effect everywhere, that every variant computes the same thing, and that a wrong choice is a one-line
error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from loratune.errors import ConfigError
from loratune.kernels import ISAS, fused, isa, kernel_available, loader, lowrank, runnable_isas, select_isa, use_isa

COMPILED = [name for name in runnable_isas() if name != "none"]
needs_kernels = pytest.mark.skipif(not COMPILED, reason="the compiled kernels are not built")


def test_the_runnable_variants_come_in_order_and_the_default_is_the_best():
    runnable = runnable_isas()
    assert runnable[0] == "none" and list(runnable) == sorted(runnable, key=ISAS.index)
    if loader.compiled is not None:
        assert runnable[1] == "baseline" and set(runnable[1:]) <= set(loader.compiled.BUILT) <= set(ISAS)
        if not os.environ.get("LORATUNE_KERNEL_ISA") and not os.environ.get("LORATUNE_NO_KERNEL"):
            assert isa() == runnable[-1]


@pytest.mark.parametrize("name", runnable_isas())
def test_selecting_a_variant_takes_effect_in_the_loader_the_module_and_the_wrappers(name, monkeypatch):
    monkeypatch.delenv("LORATUNE_NO_KERNEL", raising=False)
    before = isa()
    with use_isa(name):
        assert isa() == name and kernel_available() == (name != "none")
        assert lowrank.kernel_isa() == (None if name == "none" else name)
        if name != "none":
            assert loader.compiled.isa() == name  # the C module's pointers moved too
        x = torch.randn(3, 40)
        assert (fused.silu_mul(x, x) is None) == (name == "none")
        assert (lowrank.raw_kernel() is None) == (name == "none")
    assert isa() == before


@needs_kernels
def test_the_environment_switch_still_turns_every_variant_off(monkeypatch):
    for name in COMPILED:
        with use_isa(name):
            monkeypatch.setenv("LORATUNE_NO_KERNEL", "1")
            assert isa() == "none" and not kernel_available() and lowrank.kernel_isa() is None
            monkeypatch.delenv("LORATUNE_NO_KERNEL")
            assert isa() == name


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_computes_what_the_baseline_does(dtype, monkeypatch):
    """Dropout's mask is integer arithmetic: the same bits everywhere. The rest agrees up to the order of float32
    sums and the last bits of exp."""
    monkeypatch.delenv("LORATUNE_NO_KERNEL", raising=False)
    torch.manual_seed(0)
    x, weight = torch.randn(7, 300).to(dtype), torch.randn(300).to(dtype)
    A, sBt = torch.randn(12, 300) * 0.1, torch.randn(12, 72) * 0.1
    logits, targets = torch.randn(5, 1003).to(dtype) * 4, torch.randint(0, 1003, (5,))

    def run():
        lse_grad = logits.clone()
        return [
            fused.dropout(x, 0.3, seed=11),
            fused.silu_mul(x, x.flip(0)),
            *fused.silu_mul_backward(x, x.flip(0), x.roll(1)),
            *fused.rms_norm(x, weight, 1e-6),
            fused.cross_entropy_rows(lse_grad, targets, want_grad=True),
            lse_grad,
            lowrank.add_low_rank_(x[:, :72].contiguous(), x, A, sBt),
        ]

    with use_isa("baseline"):
        expected = run()
    # each variant is within a step of PyTorch (test_fused_cpu, test_lowrank_kernel): a few steps of each other
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-5, atol=1e-4)
    for name in COMPILED[1:]:
        with use_isa(name):
            results = run()
        assert torch.equal(results[0], expected[0]), name
        for got, want in zip(results[1:], expected[1:]):
            torch.testing.assert_close(got, want, **tolerance)


@needs_kernels
def test_attention_takes_bf16_pairs_only_from_the_variants_that_have_them():
    """The other variants would read pairs of bf16 as float32: the module refuses (here with no work to do)."""
    nothing = [0] * 16 + [1.0, 1, 1, 1]  # 0 tiles; scale, is_bf16, pairs, threads
    for name in COMPILED:
        with use_isa(name):
            if name in ("avx512bf16", "amx"):
                loader.compiled.attention_backward_scores(*nothing)
            else:
                with pytest.raises(ValueError, match="pairs need the avx512bf16 or amx kernels"):
                    loader.compiled.attention_backward_scores(*nothing)


def test_a_wrong_choice_is_a_one_line_error_naming_the_choices(monkeypatch):
    unrunnable = [name for name in ISAS if name not in runnable_isas()]
    cases = [("avx9000", "not a kernel variant; choose one of none, baseline, avx2, avx512, avx512bf16, amx")]
    if unrunnable:
        cases.append((unrunnable[-1], f"this machine runs {', '.join(runnable_isas())}"))
    for value, expected in cases:
        with pytest.raises(ConfigError, match=expected) as error:
            select_isa(value)
        assert "\n" not in str(error.value)
        with pytest.raises(ConfigError, match=expected), use_isa(value):
            pass
    monkeypatch.delenv("LORATUNE_NO_KERNEL", raising=False)
    with use_isa(isa()):  # reading the environment again, in this process, then back to this variant
        for value, expected in cases:
            monkeypatch.setenv("LORATUNE_KERNEL_ISA", value)
            monkeypatch.setattr(loader, "_chosen", None)
            for asked in (kernel_available, isa, lowrank.kernel_isa):  # every time it is asked, not only the first
                with pytest.raises(ConfigError, match=f"LORATUNE_KERNEL_ISA={value}") as error:
                    asked()
                assert "\n" not in str(error.value) and expected in str(error.value)


def run_python(*args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LORATUNE_KERNEL_ISA", "LORATUNE_NO_KERNEL")}
    return subprocess.run([sys.executable, *args], env={**env, **environment}, capture_output=True, text=True)


@pytest.mark.parametrize("name", runnable_isas())
def test_the_environment_variable_selects_the_variant_when_first_read(name, monkeypatch):
    monkeypatch.delenv("LORATUNE_NO_KERNEL", raising=False)
    with use_isa(isa()):
        monkeypatch.setenv("LORATUNE_KERNEL_ISA", name.upper())  # case does not matter
        monkeypatch.setattr(loader, "_chosen", None)  # as in a new process
        assert isa() == name and (name == "none" or loader.compiled.isa() == name)


@pytest.mark.integration  # a new Python process
def test_the_environment_variable_selects_the_variant_in_a_new_process():
    name = "baseline" if "baseline" in runnable_isas() else "none"  # the default only where nothing else runs
    code = "from loratune.kernels import isa, loader; print(isa(), loader.compiled and loader.compiled.isa())"
    result = run_python("-c", code, LORATUNE_KERNEL_ISA=name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [name, name if name != "none" else "None"]


@pytest.mark.integration  # a new Python process
def test_a_wrong_value_still_lets_help_run_and_fails_in_one_line_where_the_kernels_are_used():
    assert run_python("-m", "loratune", "--help", LORATUNE_KERNEL_ISA="avx9000").returncode == 0
    result = run_python("-c", "from loratune.kernels import isa; isa()", LORATUNE_KERNEL_ISA="avx9000")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last.startswith("loratune.errors.ConfigError: LORATUNE_KERNEL_ISA=avx9000 is not a kernel variant; ")
