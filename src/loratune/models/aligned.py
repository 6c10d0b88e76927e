"""A CPU model's weights at 64-byte boundaries.

transformers maps a safetensors checkpoint into memory and, where the dtype matches, uses its tensors in place:
each weight then starts wherever the file puts it, which is 8-byte aligned only. A product over many rows (a
prompt's prefill) reads every 64-byte vector of such a weight across two cache lines; on the CPUs measured that
cost a quarter of the few-row kernel's speed at 42 rows (docs/benchmarks.md).

``pad_safetensors_header`` makes a file's data start at a 64-byte boundary (its header padded with spaces, as the
format allows), so that weights whose sizes are multiples of 64 bytes, as a model's are, map aligned: loratune
writes its converted models so. ``align_weights`` copies each weight that is still misaligned once into a fresh,
aligned tensor and gives the file's pages it no longer needs back to the system as it goes, so the process never
holds the model twice.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import torch
from torch import nn

from loratune.files import temp_file_beside

ALIGNMENT = 64
_MADV_DONTNEED = 4


def align_weights(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` that does not start at a 64-byte boundary into an
    aligned tensor of its own (the same ``Parameter`` object, so tied weights stay tied); the number copied.
    The pages of a file mapping that only a copied tensor covered are dropped from the process right after its
    copy (they stay in the page cache); other memory is left to the allocator."""
    mapped = _file_mappings()
    moved = 0
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.device.type != "cpu" or tensor.data_ptr() % ALIGNMENT == 0 or tensor.numel() == 0:
                    continue
                start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
                copy = tensor.detach().clone(memory_format=torch.contiguous_format)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = copy
                else:
                    module._buffers[name] = copy
                moved += 1
                if any(low <= start and start + size <= high for low, high in mapped):
                    _release(start, size)
    return moved


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process mapped from files (Linux's /proc/self/maps; none elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            low, high = (int(part, 16) for part in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


def _release(start: int, size: int) -> None:
    """Drop the whole pages inside [start, start + size) of a file mapping from this process (Linux)."""
    page = mmap.PAGESIZE
    low, high = -(-start // page) * page, (start + size) // page * page
    if high > low:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), ctypes.c_int(_MADV_DONTNEED))


def safetensors_data_offset(path: Path) -> int:
    """Where the tensor data of safetensors file ``path`` starts: 8 bytes of header size, then the header."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
    return 8 + size


def pad_safetensors_header(path: Path) -> bool:
    """Rewrite safetensors file ``path`` (to a temporary name, then renamed over it) with its header padded by
    spaces so that its data starts at a multiple of ``ALIGNMENT``; False when it already does (nothing written).
    """
    start = safetensors_data_offset(path)
    if start % ALIGNMENT == 0:
        return False
    with open(path, "rb") as source:
        source.seek(8)
        header = source.read(start - 8).rstrip(b" ")
        json.loads(header)  # a header this function can read, or it writes nothing
        padded = header + b" " * (-(8 + len(header)) % ALIGNMENT)
        temp = temp_file_beside(path)
        try:
            with open(temp, "wb") as target:
                target.write(struct.pack("<Q", len(padded)) + padded)
                shutil.copyfileobj(source, target, 16 << 20)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    return True
