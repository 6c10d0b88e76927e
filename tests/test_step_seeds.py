"""Each process of a distributed run seeds every step from (seed, rank, step): independent dropout masks across
the processes, the same masks again when a resumed run reaches that step."""

from __future__ import annotations

import torch

from loratune.train.distributed import step_seed


def dropout_mask(seed: int, rank: int, step: int) -> torch.Tensor:
    torch.manual_seed(step_seed(seed, rank, step))
    return torch.nn.functional.dropout(torch.ones(4096), p=0.5) != 0


def test_processes_draw_different_masks_and_a_step_draws_the_same_masks_again():
    first = dropout_mask(0, 0, 7)
    assert torch.equal(first, dropout_mask(0, 0, 7))  # a resumed run at step 7
    for other in (dropout_mask(0, 1, 7), dropout_mask(0, 0, 8), dropout_mask(1, 0, 7)):
        agreement = float((first == other).float().mean())
        assert 0.4 < agreement < 0.6  # independent halves agree on about half the positions
