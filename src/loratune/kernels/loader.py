"""The one loader of loratune's compiled CPU kernels (``loratune.kernels._cpu``, built by ``pip install`` from
``csrc/``) and the choice of the instruction set they run with.

Every kernel is compiled once per instruction set, a *variant*: ``baseline`` (any CPU), ``avx2`` (AVX2 + FMA),
``avx512`` (AVX-512 F/BW/VL/DQ), ``avx512bf16`` (AVX-512 with AVX512-BF16's pair products) and ``amx``
(``avx512bf16`` with attention's products in AMX tiles, where Linux grants them). ``none`` is no kernel: the
callers run the PyTorch operations the kernels replace. The best variant this CPU runs is the default;
``LORATUNE_KERNEL_ISA`` names another, read once, when a kernel is first asked for (so that a wrong value is an
error of the command that uses the kernels, not of ``loratune --help``). ``LORATUNE_NO_KERNEL=1`` means ``none``
and is read at every call. ``use_isa`` switches within a process: the tests run every kernel once per variant
this machine runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from loratune.errors import ConfigError

try:
    from loratune.kernels import _cpu as compiled
except ImportError:  # built without a C compiler: the callers run the same arithmetic in PyTorch
    compiled = None

ISAS = ("none", "baseline", "avx2", "avx512", "avx512bf16", "amx")
ENVIRONMENT = "LORATUNE_KERNEL_ISA"
_chosen: str | None = None  # the variant in use ("none" or the compiled module's), once the environment is read


def runnable_isas() -> tuple[str, ...]:
    """The variants this machine can run, in the order of ``ISAS``: ``none``, then those that were built and that
    this CPU executes (``baseline`` wherever the kernels were built)."""
    return ("none", *compiled.RUNNABLE) if compiled is not None else ("none",)


def kernel_available() -> bool:
    """True when the compiled kernels run: built, a variant other than ``none`` chosen and ``LORATUNE_NO_KERNEL``
    not set. Raises ConfigError when ``LORATUNE_KERNEL_ISA`` names a variant this machine cannot run."""
    return (_chosen or _from_environment()) != "none" and os.environ.get("LORATUNE_NO_KERNEL", "") in ("", "0")


def isa() -> str:
    """The variant the kernels run with now: one of ``runnable_isas()``, ``none`` when they are off."""
    return _chosen if kernel_available() else "none"


def select_isa(name: str) -> None:
    """Runs the kernels as variant ``name`` from now on, in this process. Raises ConfigError (one line, naming
    the choices) for a name that is no variant or one this machine cannot run."""
    global _chosen
    _check(name, f"kernel variant {name!r}")
    if name != "none":
        compiled.select(name)  # runnable, so it takes
    _chosen = name


@contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Runs the kernels as variant ``name`` inside the block, as before it afterwards (tests, benchmarks)."""
    global _chosen
    before = _chosen or _from_environment()
    compiled_before = compiled.isa() if compiled is not None else None
    select_isa(name)
    try:
        yield name
    finally:
        if compiled_before is not None:
            compiled.select(compiled_before)
        _chosen = before


def _from_environment() -> str:
    """The variant ``LORATUNE_KERNEL_ISA`` names, selected (the best one this CPU runs when it is unset)."""
    global _chosen
    wanted = os.environ.get(ENVIRONMENT, "").strip().lower()
    if wanted:
        _check(wanted, f"{ENVIRONMENT}={wanted}")
        select_isa(wanted)
    else:
        _chosen = compiled.isa() if compiled is not None else "none"
    return _chosen


def _check(name: str, what: str) -> None:
    if name not in ISAS:
        raise ConfigError(f"{what} is not a kernel variant; choose one of {', '.join(ISAS)}")
    runnable = runnable_isas()
    if name not in runnable:
        if compiled is None:
            why = "the compiled kernels are not built (reinstall loratune with a C compiler)"
        elif name in compiled.BUILT:
            why = "this CPU cannot run it"
        else:
            why = "this build of the kernels does not include it (the compiler could not target it)"
        raise ConfigError(f"{what}: {why}; this machine runs {', '.join(runnable)}")
