"""Reading safetensors checkpoints one tensor at a time, for loading models bigger than the memory their
full-precision weights would take.

``safetensors.safe_open`` memory-maps the file; every page a read touches then counts towards the process's
resident memory until the file is closed, so reading a shard through it costs its whole size in RSS. Here each
tensor is read with plain file reads into its own buffer: peak memory is one tensor, and the page cache
(which the kernel can drop) is not charged to the process.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from loratune.errors import ModelNotFoundError

# safetensors dtype names -> torch dtypes (the ones torch has)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory: the shards its index lists, or its single file.

    Raises ``ModelNotFoundError`` when the directory has no safetensors weights (e.g. only pickle ``.bin``).
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{model_dir}: shards listed in {INDEX_NAME} are missing: {', '.join(missing[:3])}"
            )
        return [model_dir / n for n in names]
    if (model_dir / SINGLE_NAME).is_file():
        return [model_dir / SINGLE_NAME]
    raise ModelNotFoundError(
        f"{model_dir} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); 4-bit loading reads safetensors "
        "only — convert the checkpoint to safetensors first"
    )


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict without ``__metadata__``) of safetensors file ``path``."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of safetensors file ``path``, in file order, each read into fresh memory.

    Raises ``ModelNotFoundError`` for a tensor whose dtype torch cannot represent.
    """
    path = Path(path)
    start, header = read_header(path)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    with path.open("rb", buffering=0) as handle:
        for name, entry in entries:
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ModelNotFoundError(
                    f"{path.name}: tensor {name} has dtype {entry['dtype']}, which torch cannot read"
                )
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            view, done = memoryview(buffer.numpy()), 0
            while done < len(view):  # readinto may return fewer bytes than asked
                got = handle.readinto(view[done:])
                if not got:
                    raise ModelNotFoundError(f"{path}: file ends inside tensor {name}; the checkpoint is truncated")
                done += got
            yield name, buffer.view(dtype).reshape(entry["shape"])
