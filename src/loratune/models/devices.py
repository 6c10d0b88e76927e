"""Where a model runs and in which dtype: the one place that decides both.

``resolve_device`` picks the device, ``resolve_dtype`` the compute dtype for that device. Every layer that
needs "auto" resolved calls these, so the policy lives here only.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from loratune.errors import ConfigError

# Accepted spellings of a dtype, as they appear in configs and on the command line.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# CPU flags that mean bf16 matmuls run natively rather than being emulated through float32.
_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512/AMX, aarch64 "bf16"


def resolve_device(device: str | torch.device | None = None) -> str:
    """Return the device to load a model on, as a string torch understands ("cpu", "cuda", "cuda:1", ...).

    ``None`` or ``"auto"`` picks ``"cuda"`` when a CUDA GPU is available, else ``"cpu"``. An explicit device
    is returned as given (normalised to a string).

    Raises ``ConfigError`` when the string is not a device torch knows, or names CUDA on a machine without it.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    # Fail here with one clear line instead of deep inside the first .to(device).
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available; use device 'auto' or 'cpu'")
    return str(parsed)


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """Return the torch dtype to load a model in.

    ``None`` or ``"auto"`` gives ``torch.bfloat16`` when ``device`` (resolved with ``resolve_device``)
    supports bf16 natively — a CUDA GPU with ``torch.cuda.is_bf16_supported()``, or a CPU with bf16
    instructions (AVX512-BF16 / AMX-BF16 / Arm BF16) — and ``torch.float32`` otherwise.
    Strings "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32" (any case) and torch dtypes are accepted.

    Raises ``ConfigError`` naming the valid values for anything else.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ConfigError(f"unsupported dtype {dtype}; use one of: {_valid_dtype_names()}")
        return dtype
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return torch.bfloat16 if _supports_bf16(resolve_device(device)) else torch.float32
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.strip().lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use one of: {_valid_dtype_names()}")


def _valid_dtype_names() -> str:
    return ", ".join(["auto", *DTYPE_NAMES])


def _supports_bf16(device: str) -> bool:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_native_bf16()
    # mps, xpu, ...: stay on the safe side until someone measures them.
    return False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Return True when the CPU executes bf16 arithmetic natively (not emulated through float32).

    torch's ``get_cpu_capability()`` reports only the vector ISA level ("AVX512" even on CPUs with
    AVX512-BF16), so the Linux CPU flags are read as well. Elsewhere (macOS, Windows) this returns False.
    """
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return any(flag in value.split() for flag in _NATIVE_BF16_CPU_FLAGS)
    return False


def model_device(model) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
