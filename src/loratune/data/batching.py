"""Batches: a deterministic, resumable order; padding collation; packing several examples into one row.

Packed rows carry ``position_ids`` that restart at 0 for every example and no ``attention_mask``. From
those, transformers (>= 4.56, ``masking_utils.find_packed_sequence_indices``) builds a block-diagonal causal
mask, so examples in one row do not attend to each other (tested with eager and sdpa attention on CPU:
per-example losses match unpacked ones to float32 rounding).
It does so only when the model is called without a cache: pass ``use_cache=False`` in the forward call
(models default to ``config.use_cache=True`` and then, even in training, create a cache and skip the
packed-sequence detection, letting examples see each other; gradient checkpointing also turns it off).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loratune.data.tokenize import IGNORE_INDEX, TokenizedExample
from loratune.errors import DataError


def batch_order(
    n_examples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    lengths: Sequence[int] | None = None,
    drop_last: bool = False,
    group_window: int = 64,
) -> list[list[int]]:
    """Return the batches (lists of example indices) of one epoch, shuffled by ``random.Random(seed + epoch)``.

    The same arguments always give the same order, so a run resumed at epoch e, step s recomputes it and
    skips the first s batches. With ``lengths`` (one per example), examples of similar length share batches
    to cut padding: a shuffled window of ``group_window`` batches is sorted by length and cut into batches,
    then all batches are shuffled, so batch order stays random. ``drop_last`` drops a final short batch.
    Raises ``ValueError`` for a non-positive batch size or ``lengths`` of the wrong size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if lengths is not None and len(lengths) != n_examples:
        raise ValueError(f"lengths has {len(lengths)} entries for {n_examples} examples")
    rng = random.Random(seed + epoch)
    order = list(range(n_examples))
    rng.shuffle(order)
    if lengths is not None:
        window = batch_size * max(1, group_window)
        grouped = []
        for start in range(0, n_examples, window):
            grouped.extend(sorted(order[start : start + window], key=lambda index: -lengths[index]))
        order = grouped
    batches = [order[start : start + batch_size] for start in range(0, n_examples, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if lengths is not None:
        rng.shuffle(batches)
    return batches


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch; return ``input_ids``, ``labels`` and ``attention_mask`` (long tensors).

    Padding gets ``pad_id`` in ``input_ids``, -100 in ``labels`` and 0 in ``attention_mask``; the mask is
    built from lengths, so a pad id equal to EOS is fine. Raises ``ValueError`` for an empty batch.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass(frozen=True)
class PackedRow:
    """Several examples concatenated: ``position_ids`` restart at 0 at each example; ``lengths`` and
    ``locations`` list the examples in row order. The first label of every example is -100 (it would
    otherwise be predicted from the previous example's last token)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]
    locations: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Sequence[TokenizedExample], max_length: int) -> list[PackedRow]:
    """Pack examples into rows of at most ``max_length`` tokens (best-fit decreasing); return the rows.

    Deterministic; examples are placed longest first, so rows are not in file order (shuffle them with
    ``batch_order``). Raises ``DataError`` naming an example longer than ``max_length``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index].input_ids))  # stable
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted: the best fit is a bisect away
    for index in order:
        n = len(examples[index].input_ids)
        if n > max_length:
            raise DataError(
                f"{examples[index].location}: {n} tokens do not fit a packed row of max_length {max_length}"
            )
        if n == 0:
            continue
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            remaining, row = free.pop(slot)
        else:
            remaining, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, row))
    return [_concatenate([examples[index] for index in members]) for members in rows]


def _concatenate(members: Sequence[TokenizedExample]) -> PackedRow:
    input_ids, labels, position_ids = [], [], []
    for example in members:
        input_ids.extend(example.input_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:])
        position_ids.extend(range(len(example.input_ids)))
    return PackedRow(
        input_ids, labels, position_ids, [len(m.input_ids) for m in members], [m.location for m in members]
    )


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into a batch; return ``input_ids``, ``labels`` and ``position_ids``, no mask.

    Padding is a block of its own (positions restarting at 0, labels -100), so it neither sees nor is seen by
    real tokens. Call the model with ``use_cache=False`` (see the module docstring). Raises ``ValueError``
    for an empty batch.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for index, row in enumerate(rows):
        n = len(row)
        input_ids[index, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[index, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[index, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[index, n:] = torch.arange(width - n, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
