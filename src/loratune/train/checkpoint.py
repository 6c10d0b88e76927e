"""Training checkpoints: ``checkpoints/step-N/`` with what the run trains (the adapter, or a full fine-tune's
weights), the optimizer state, the RNG states and the
trainer's position, tensors in safetensors and the rest in JSON (no pickle).

A checkpoint is written into a hidden temporary directory and renamed when complete, so a crash never
leaves a half-written ``step-N``; only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loratune.errors import LoratuneError
from loratune.files import read_safetensors, temp_dir_beside, writing
from loratune.outputs import publish_dir, remove_written
from loratune.train.distributed import shard_like, whole_tensor

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
OBJECTIVE_FILE = "objective.safetensors"  # the objective's own state, when it has one (GRPO's unused rollouts)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars, stored = {}, {}, set()
    for index, values in state["state"].items():
        # bitsandbytes' 8-bit optimizers keep their quantized moments in one nested dict per parameter
        flat = {
            f"{key}.{inner}" if isinstance(value, dict) else key: item
            for key, value in values.items()
            for inner, item in (value.items() if isinstance(value, dict) else [(None, value)])
        }
        for key, value in flat.items():
            if torch.is_tensor(value):  # a sharded parameter's state is gathered whole
                tensor = whole_tensor(value.detach()).cpu().contiguous()
                if tensor.untyped_storage().data_ptr() in stored:  # shared (8-bit optimizers' code tables)
                    tensor = tensor.clone()
                stored.add(tensor.untyped_storage().data_ptr())
                tensors[f"state.{index}.{key}"] = tensor
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    entries = [(key.split(".", 1)[1], value) for key, value in tensors.items()] + list(meta["scalars"].items())
    for key, value in entries:
        index, name = key.split(".", 1)
        outer, _, inner = name.partition(".")  # "key.inner": an entry of a nested dict (see _optimizer_tensors)
        if inner:
            state.setdefault(int(index), {}).setdefault(outer, {})[inner] = value
        else:
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group in optimizer.param_groups:  # a sharded parameter keeps its share of its state
        for param in group["params"]:
            values = optimizer.state.get(param, {})
            for name, value in values.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    values[name] = shard_like(value, param)


def save_checkpoint(
    run_dir: Path,
    step: int,
    trained,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    write: bool = True,
    objective_state: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """Write ``checkpoints/step-{step}`` atomically and prune to the newest ``keep``; return its path.
    ``objective_state``: the objective's tensors (``Objective.state``), written when there are any.
    ``trained`` (``train.trained``) gives the trained tensors and the file they go in. When FSDP split them
    (``trained.collective``) every process calls this, and only the one with ``write`` writes."""
    tensors = trained.state()
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    if not write:
        return None
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    with writing(final, "checkpoint"):
        staging = temp_dir_beside(final)
        try:
            save_file(tensors, staging / trained.state_file)
            save_file(opt_tensors, staging / "optimizer.safetensors")
            if objective_state:  # copies: safetensors refuses tensors that share memory (a reused micro-batch)
                save_file({k: v.clone() for k, v in objective_state.items()}, staging / OBJECTIVE_FILE)
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, staging / "rng.safetensors")
            state = {
                **trainer_state,
                "step": step,
                "optimizer": opt_meta,
                "python_random": _jsonable(random.getstate()),
            }
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            publish_dir(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        remove_written(old)
    return final


def load_checkpoint(path: Path, trained, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the trained tensors, optimizer and RNG states from checkpoint ``path``; return the trainer state."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        trained.load_state(read_safetensors(path / trained.state_file), str(path))
        _restore_optimizer(optimizer, read_safetensors(path / "optimizer.safetensors"), state["optimizer"])
        rng = read_safetensors(path / "rng.safetensors")
    except (OSError, KeyError, ValueError, TypeError, LoratuneError) as exc:
        raise LoratuneError(
            f"checkpoint {path} cannot be read ({exc}); delete it to resume from an older one"
        ) from None
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(_tupled(state["python_random"]))
    return state


def load_objective_state(path: Path) -> dict[str, torch.Tensor]:
    """The objective's tensors a checkpoint kept ({} when it kept none)."""
    file = Path(path) / OBJECTIVE_FILE
    if not file.is_file():
        return {}
    try:
        return read_safetensors(file)
    except (OSError, ValueError, LoratuneError) as exc:
        raise LoratuneError(
            f"checkpoint {path} cannot be read ({exc}); delete it to resume from an older one"
        ) from None


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
