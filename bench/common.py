"""Shared by the benchmark scripts (run as ``python bench/NAME.py``, so this imports as ``common``)."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

import loratune
from loratune.adapters import lora_layers


def random_adapter(model_name: str, path: Path, *, dtype: str = "fp32", seed: int = 0, std: float = 0.01) -> Path:
    """Save, at ``path``, an r=8 all-linear adapter whose B is drawn from N(0, std) (so it changes the output,
    like a trained one does) and return ``path``."""
    model, _ = loratune.load_model(model_name, dtype=dtype, device="cpu")
    torch.manual_seed(seed)
    loratune.add_adapter(model, loratune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=std)
    return loratune.save_adapter(model, path)


def peak_rss_mib() -> float:
    """This process's peak RSS (MiB). On Linux the memory map's own mark (VmHWM): ``ru_maxrss`` carries the
    parent's RSS at the fork over ``exec``, so a child started from a large parent would report at least that."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
