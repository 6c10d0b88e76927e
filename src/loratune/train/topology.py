"""How a run is spread over processes, behind one interface the training loop calls without asking which it is:
one process, DDP (every process a whole model; gradients averaged once per step) or FSDP2 (the base's blocks
sharded; the processes evaluate together). The collective operations themselves are ``train.distributed``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from loratune.memory import release_freed_memory
from loratune.train import distributed
from loratune.train.distributed import Processes


class StepLoss(nn.Module):
    """A micro-batch's (summed loss, count) as a module, for DDP to wrap: ``loss_sum_of(model, batch)``."""

    def __init__(self, model: nn.Module, loss_sum_of):
        super().__init__()
        self.model, self.loss_sum_of = model, loss_sum_of

    def forward(self, batch: dict):
        return self.loss_sum_of(self.model, batch)


class OneProcess:
    """A run in this process alone; the base of the others, whose collectives are no-ops here."""

    sharded = False

    def __init__(self, processes: Processes | None = None):
        self.processes = processes or Processes()

    @property
    def world(self) -> int:
        return self.processes.world

    @property
    def rank(self) -> int:
        return self.processes.rank

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory and speaks (rank 0)."""
        return self.processes.main

    @property
    def evaluating(self) -> Processes:
        """The processes an evaluation is shared over (each evaluates every N-th row; rank 0 combines)."""
        return self.processes

    @property
    def lockstep(self) -> bool:
        """Whether this process runs the forwards rank 0 needs (a retain-set loss, a model's evaluation)."""
        return self.processes.main

    def load_hook(self, config) -> Callable[[nn.Module], None] | None:
        """What the model loader calls with each transformer block as it completes (FSDP shards it), or None."""
        return None

    def prepare(self, model: nn.Module, trained, log) -> None:
        """Spread ``model`` over the processes once the trained parameters exist (FSDP shards the blocks)."""

    def step_loss(self, model: nn.Module, loss_sum_of) -> Callable[[dict], tuple[torch.Tensor, int]]:
        """The function computing one micro-batch's (summed loss, count) on this topology."""
        return lambda batch: loss_sum_of(model, batch)

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward (DDP all-reduces only at the step's last)."""
        return contextlib.nullcontext()

    def after_backward(self, last: bool, params: list[nn.Parameter]) -> None:
        """Called after each micro-batch's backward (FSDP averages the gradients it left whole at the last)."""

    def after_update(self, device: torch.device) -> None:
        """Called after each optimizer update."""

    def seed_step(self, seed: int, step: int) -> None:
        """Seed the step's random draws (a single process keeps its one stream, saved in checkpoints)."""

    def total(self, value: float) -> float:
        """The sum of ``value`` over the processes."""
        return distributed.total(self.processes, value)

    def gathered(self, value) -> list | None:
        """Every process's ``value`` on rank 0, in rank order (None elsewhere)."""
        return distributed.gathered(self.processes, value)

    def from_main(self, value):
        """Rank 0's ``value`` on every process."""
        return distributed.from_main(self.processes, value)

    def barrier(self) -> None:
        distributed.barrier(self.processes)

    def gradient_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        """The gradients' global norm, clipped to ``max_norm``."""
        return distributed.gradient_norm(params, max_norm)


class DataParallel(OneProcess):
    """DDP: each process runs the whole model on its share of every global micro-batch; gradients are averaged
    once per step, at its last micro-batch."""

    def __init__(self, processes: Processes):
        super().__init__(processes)
        self._wrapped = None

    def step_loss(self, model, loss_sum_of):
        # DDP wraps the loss computation, so the fused loss (hidden states and the head, no logits) runs under it
        device = next(model.parameters()).device
        self._wrapped = DistributedDataParallel(
            StepLoss(model, loss_sum_of), device_ids=[self.processes.local_rank] if device.type == "cuda" else None
        )
        return self._wrapped

    def micro_batch(self, last: bool):
        return contextlib.nullcontext() if last or self._wrapped is None else self._wrapped.no_sync()

    def seed_step(self, seed: int, step: int) -> None:
        torch.manual_seed(distributed.step_seed(seed, self.processes.rank, step))


class Sharded(DataParallel):
    """FSDP2: the base's blocks are sharded over the processes (as they load, where the adapter's start does not read
    the whole base) and gathered for each forward and backward, so all processes run every forward together:
    evaluation included. FSDP reduces the gradients it shards; the rest are averaged here."""

    sharded = True

    def __init__(self, processes: Processes, shard_trained: bool, streams: bool):
        super().__init__(processes)
        self.shard_trained, self.streams = shard_trained, streams

    @property
    def evaluating(self) -> Processes:
        return Processes()  # every process evaluates every row, together

    @property
    def lockstep(self) -> bool:
        return True

    def load_hook(self, config):
        return distributed.shard_block if self.streams else None

    def prepare(self, model, trained, log) -> None:
        from loratune.memory import peak_memory_mb

        blocks, loaded, held, total = distributed.shard_model(model, trained.parameters(), self.shard_trained)
        trained.after_sharding()
        loading = self.gathered(peak_memory_mb())  # each process's peak so far
        log(
            f"FSDP2: {blocks} blocks of the base sharded over {self.world} processes; each holds "
            f"{held / 2**20:.4g} of the weights' {total / 2**20:.4g} MiB "
            f"(trained parameters {'sharded too' if self.shard_trained else 'whole'}); "
            + ("each block sharded as it was read" if loaded == blocks else "the base was read whole, then sharded")
            + f"; peak memory so far {', '.join(f'{peak:,.0f}' for peak in loading or [])} MiB"
        )

    def step_loss(self, model, loss_sum_of):
        return OneProcess.step_loss(self, model, loss_sum_of)

    def after_backward(self, last: bool, params) -> None:
        if last:
            distributed.average_gradients(self.processes, params)

    def after_update(self, device) -> None:
        if device.type == "cpu":
            release_freed_memory()  # the gathered blocks' freed memory, or the heap keeps it resident


def topology_for(processes: Processes, config) -> OneProcess:
    """The topology ``config`` asks for (``train.distributed``) over ``processes``."""
    if not processes.active:
        return OneProcess(processes)
    if config.train.distributed == "fsdp":
        return Sharded(processes, shard_trained=config.train.method == "full", streams=_shards_while_loading(config))
    return DataParallel(processes)


def _shards_while_loading(config) -> bool:
    """Whether FSDP may shard each block as it loads: not when the adapter's start reads the base weights whole
    (DoRA's magnitudes, PiSSA/OLoRA's factors) or copies modules (modules_to_save)."""
    from loratune.layers.init import is_residual_start

    lora = config.lora
    return config.train.method == "full" or not (
        lora.use_dora or is_residual_start(lora.init_lora_weights) or lora.modules_to_save
    )
