"""Training across processes with PyTorch's own engine: ``torchrun`` starts the workers, ``torch.distributed``
connects them (gloo on CPUs, NCCL on GPUs), DDP all-reduces the gradients — or, with ``train.distributed:
fsdp``, FSDP2 shards the base's blocks (a full fine-tune's trained weights with them), and the gradients of what
stays whole are averaged directly.

One run: each process reads its share of every global batch (``batch_size × grad_accum × world_size`` rows), the
loss is normalised by the global number of targets, and DDP's gradient average is scaled back to that sum, so a
run over N processes makes the update a single process makes with N times the micro-batch. Rank 0 alone writes
the run directory; a rank that fails takes the others down (the process group's timeout, then torchrun).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import random
import signal
import time
from dataclasses import dataclass

import torch

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering fails the others after this


@dataclass(frozen=True)
class Processes:
    """Where this process stands: ``rank`` of ``world`` processes (``world == 1``: not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory and the log (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (torchrun starts workers in sessions of their own, so
    a killed launcher would otherwise leave them running); exit at once if the parent is already gone."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def start() -> Processes:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ...); a single
    process without it. Picks gloo on CPUs and NCCL on GPUs, with ``TIMEOUT``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    import torch.distributed as dist

    die_with_parent()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return Processes(world, rank, local_rank)


# How long ``stop`` lets the collectives' threads finish before the group goes (see there).
_SETTLE_SECONDS = 0.2


def stop(processes: Processes) -> None:
    """Leave the process group (a no-op for a single process).

    First it waits a moment without the GIL: a gloo thread that drops the last reference to a finished
    collective's tensor needs the GIL to free it, and the group's destructor (run later, when DDP's reducer is
    freed) joins those threads while holding the GIL, so a thread still freeing one then hangs the process."""
    if processes.active:
        import torch.distributed as dist

        if dist.is_initialized():
            time.sleep(_SETTLE_SECONDS)
            dist.destroy_process_group()


def total(processes: Processes, value: float) -> float:
    """The sum of ``value`` over the processes."""
    if not processes.active:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor)


def barrier(processes: Processes) -> None:
    if processes.active:
        import torch.distributed as dist

        dist.barrier()


def from_main(processes: Processes, value):
    """Rank 0's ``value`` (a picklable object of our own making), on every process."""
    if not processes.active:
        return value
    import torch.distributed as dist

    box = [value if processes.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(processes: Processes, value) -> list:
    """Every process's ``value``, in rank order, on rank 0 (None elsewhere)."""
    if not processes.active:
        return [value]
    import torch.distributed as dist

    box = [None] * processes.world if processes.main else None
    dist.gather_object(value, box, dst=0)
    return box


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the random draws (dropout masks) of one step on one of several processes: a function of the
    step, so a resumed run draws what the uninterrupted one drew whatever each process drew before, and of the
    rank, so the processes draw independent masks. (A single process draws from one stream, which its
    checkpoints save.)"""
    return random.Random(f"{seed}:{rank}:{step}").getrandbits(63)


def shard_model(
    model: torch.nn.Module, trained: list[torch.nn.Parameter], shard_trained: bool
) -> tuple[int, int, int, int]:
    """FSDP2 (``fully_shard``) over the model: each transformer block is a unit whose weights are split across the
    processes and gathered only for its forward and backward; the base model (``model.base_model``) is the root.

    Everything outside the blocks (embeddings, final norm, output head: a tied head shares its weight with the
    embeddings, and the fused loss reads the head's weight directly) stays whole on every process, and so do
    the ``trained`` parameters unless ``shard_trained`` (a full fine-tune: the blocks' trained weights are
    sharded, their gradients reduce-scattered, and the optimizer keeps only this process's share of their
    state). The gradients of whole trained parameters are averaged with ``average_gradients``.
    Blocks ``shard_block`` sharded while the model loaded are left as they are (all their weights sharded; an
    adapter's factors added since are not FSDP's and stay whole).
    Returns (blocks, how many of them were sharded while loading, bytes of weights this process holds, bytes of
    all the model's weights); raises ``ConfigError`` for a model without blocks FSDP can find."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from loratune.errors import ConfigError
    from loratune.models.structure import transformer_blocks

    root = getattr(model, "base_model", model)
    blocks = list(transformer_blocks(model).values())
    if not blocks:
        raise ConfigError(
            "train.distributed: fsdp shards a model's transformer blocks, and this model names none "
            "(_no_split_modules); use train.distributed: ddp"
        )
    inside = {id(p) for block in blocks for p in block.parameters()}
    whole = {p for p in root.parameters() if id(p) not in inside} | (set() if shard_trained else set(trained))
    loaded = [block for block in blocks if isinstance(block, FSDPModule)]
    for block in blocks:
        if not isinstance(block, FSDPModule):
            fully_shard(block, ignored_params={p for p in block.parameters() if p in whole})
    fully_shard(root, ignored_params={p for p in root.parameters() if p in whole})
    held = total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # a DTensor holds its shard
        held += local.numel() * local.element_size()
        total += param.numel() * param.element_size()
    return len(blocks), len(loaded), held, total


def shard_block(block: torch.nn.Module) -> None:
    """Shard one transformer block's weights across the processes as soon as it is loaded (``fully_shard``),
    which frees the other processes' shares; ``shard_model`` makes the model's root afterwards."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(block)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor: FSDP2 keeps only this process's share of it."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a sharded one (DTensor) gathered from every process — a collective call, which
    every process must make in the same order — and any other as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` split as ``like`` (a DTensor) is: this process keeps its share, cut from its own copy of
    ``whole`` without communication; for a plain ``like``, ``whole`` itself."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    local = whole.to(dtype=like.dtype, device=like.to_local().device)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def average_gradients(processes: Processes, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` that FSDP left whole over the processes, in one all-reduce (what DDP
    does; FSDP reduces the sharded ones itself)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= processes.world
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def gradient_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' global L2 norm, after scaling them down to ``max_norm`` when it is exceeded (None: no
    clipping). Gradients FSDP sharded count with their every shard (a collective call)."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        if max_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.get_total_norm(grads))
    plain = [g for g in grads if not is_sharded(g)]
    squares = float(whole_tensor(torch.nn.utils.get_total_norm(sharded))) ** 2
    if plain:
        squares += float(torch.nn.utils.get_total_norm(plain)) ** 2
    norm = squares**0.5
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + 1e-6)  # as clip_grad_norm_
        for grad in grads:
            grad.mul_(scale)
    return norm


def check_nproc(nproc: int) -> None:
    """Refuse (``ConfigError``) more processes than the machine can give one core each (one GPU each, with CUDA)."""
    from loratune.errors import ConfigError

    if torch.cuda.is_available():
        if nproc > torch.cuda.device_count():
            raise ConfigError(
                f"--nproc {nproc} asks for more processes than this machine's "
                f"{torch.cuda.device_count()} GPU(s); give at most one process per GPU"
            )
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if nproc > cores:
        raise ConfigError(
            f"--nproc {nproc} asks for more processes than the {cores} CPU cores this process may use; "
            f"each needs at least one core — give --nproc {cores} or fewer"
        )


def launch(loratune_args: list[str], nproc: int) -> int:
    """Run ``loratune <loratune_args>`` as ``nproc`` processes on this machine through torchrun (``--standalone``:
    a local rendezvous on a free port) and return its exit status. Each process gets its share of the CPU
    threads; torchrun dies with this process, and its workers with it (``die_with_parent``)."""
    import signal
    import subprocess
    import sys

    check_nproc(nproc)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
        "-m",
        "loratune",
        *loratune_args,
    ]
    process = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads yet
    try:
        return process.wait()
    except KeyboardInterrupt as stop:  # the workers checkpoint; wait for them
        signum = getattr(stop, "signum", signal.SIGINT)
        if signum != signal.SIGINT:  # Ctrl-C reached the whole process group; a scheduler's signal only this one
            process.send_signal(signum)
        return process.wait()


__all__ = [
    "TIMEOUT",
    "Processes",
    "average_gradients",
    "barrier",
    "check_nproc",
    "die_with_parent",
    "from_main",
    "gathered",
    "gradient_norm",
    "is_sharded",
    "launch",
    "shard_block",
    "shard_like",
    "shard_model",
    "start",
    "step_seed",
    "stop",
    "total",
    "whole_tensor",
]
