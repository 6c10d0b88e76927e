"""The run's micro-batches in a deterministic order: a pure function of (seed, epoch), so a checkpoint stores only
the position (epoch, index) and a resumed run sees exactly the batches the uninterrupted one would have."""

from __future__ import annotations

import torch

from loratune.data import batch_order, collate, collate_packed, pack
from loratune.errors import ConfigError
from loratune.train.distributed import Processes


class BatchStream:
    """Micro-batches of ``examples`` (collated by ``collate_rows``, packed when ``data.packing``) in order.

    Across processes the order is that of the global micro-batch (``batch_size × world``), and each process
    takes every ``world``-th row of it from its ``rank`` on; a final short batch too small to give every process
    a row is left out."""

    def __init__(self, examples, config, pad_id: int, device, collate_rows=collate, processes: Processes | None = None):
        processes = processes or Processes()
        packing = config.data.packing
        self.rows = pack(examples, config.data.max_length) if packing else examples
        self.collate = (
            (lambda rows: collate_packed(rows, pad_id)) if packing else (lambda rows: collate_rows(rows, pad_id))
        )
        self.lengths = None if packing else [len(e) for e in examples]
        self.processes, self.world, self.rank = processes, processes.world, processes.rank
        self.batch_size, self.seed, self.device = config.train.batch_size * self.world, config.train.seed, device
        if self.world > 1 and len(self.rows) < self.batch_size:
            raise ConfigError(
                f"data.train has {len(self.rows)} training rows, fewer than one global batch "
                f"({config.train.batch_size} × {self.world} processes); use fewer processes or a "
                "smaller train.batch_size"
            )
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        order = batch_order(len(self.rows), self.batch_size, self.seed, epoch, lengths=self.lengths)
        return [batch for batch in order if len(batch) >= self.world]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order)

    def seek(self, epoch: int, index: int) -> None:
        """Continue from micro-batch ``index`` of ``epoch`` (a checkpoint's position)."""
        self.epoch, self.index = epoch, index
        self._order = self._epoch_order(epoch)

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch (this process's share of it), on the run's device."""
        if self.index >= len(self._order):
            self.seek(self.epoch + 1, 0)
        batch = self.collate([self.rows[i] for i in self._order[self.index][self.rank :: self.world]])
        self.index += 1
        return {k: v.to(self.device) for k, v in batch.items()}
