"""The hidden states that predict a batch's target tokens, reading each prompt once for all the rows that start
with it: what scores preference pairs (a pair's chosen and rejected completions share their prompt) and GRPO's
groups (every completion of a prompt) in less than the plain forward's work.

Rows are grouped by their prefix, the tokens before their first target. The distinct prefixes go through the model
once (right-padded, keeping their keys and values), each row's keys and values are then its prefix's, and the
completions (each row's tokens from its first target on) run as a continuation with the positions they have in the
row. The hidden state predicting a completion's first token is its prefix's last; the others are the
continuation's. With gradients on, the prefix's share of every row's gradient flows back into the one prefix
forward. The result equals the plain forward's up to rounding (attention sums the prefix and the completion in
another order).

Where this does not apply the caller runs the plain forward: rows with packed positions or no target, no prefix
shared by two rows, dropout acting (a shared prefix would share its mask), gradient checkpointing, FSDP-sharded
blocks, sliding-window attention, or a model whose forward takes no cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache


def shared_prefix_hidden(model: nn.Module, batch: dict, targets: torch.Tensor) -> torch.Tensor | None:
    """The final hidden states (N × hidden, N = the targets, row-major) predicting the targets ``targets`` marks
    (rows × (columns − 1): position t + 1 is a target, predicted from t), with each shared prefix read once; None
    where the plain forward must run (see the module docstring)."""
    plan = _plan(model, batch, targets)
    if plan is None:
        return None
    first, owner, prefixes, lengths = plan
    ids = batch["input_ids"]
    rows = ids.shape[0]
    device = ids.device
    owner_index = torch.tensor(owner, device=device)

    width = max(len(prefix) for prefix in prefixes)
    prefix_ids = torch.zeros((len(prefixes), width), dtype=ids.dtype, device=device)
    prefix_mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
    for i, prefix in enumerate(prefixes):
        prefix_ids[i, : len(prefix)] = torch.tensor(prefix, dtype=ids.dtype)
        prefix_mask[i, : len(prefix)] = 1
    base = model.base_model
    cache = DynamicCache()
    prefix_hidden = base(input_ids=prefix_ids, attention_mask=prefix_mask, cache=cache, use_cache=True)
    prefix_hidden = prefix_hidden.last_hidden_state
    for layer in cache.layers:  # each row attends to its own prefix's keys and values
        layer.keys = layer.keys.index_select(0, owner_index)
        layer.values = layer.values.index_select(0, owner_index)

    tails = [lengths[i] - first[i] for i in range(rows)]
    tail_width = max(tails)
    tail_ids = torch.zeros((rows, tail_width), dtype=ids.dtype, device=device)
    tail_mask = torch.zeros((rows, tail_width), dtype=torch.long, device=device)
    for i in range(rows):
        tail_ids[i, : tails[i]] = ids[i, first[i] : lengths[i]]
        tail_mask[i, : tails[i]] = 1
    starts = torch.tensor(first, device=device)
    positions = starts[:, None] + torch.arange(tail_width, device=device)
    tail_hidden = base(
        input_ids=tail_ids,
        attention_mask=torch.cat([prefix_mask.index_select(0, owner_index), tail_mask], dim=1),
        position_ids=positions,
        cache=cache,
        use_cache=True,
    ).last_hidden_state

    # aligned[i, k]: the hidden state at position first[i] − 1 + k of row i, which predicts its token first[i] + k
    last_of_prefix = prefix_hidden[owner_index, starts - 1]
    aligned = torch.cat([last_of_prefix[:, None], tail_hidden[:, :-1]], dim=1)
    target_rows, target_columns = targets.nonzero(as_tuple=True)
    return aligned[target_rows, target_columns + 1 - starts[target_rows]]


def _plan(model: nn.Module, batch: dict, targets: torch.Tensor):
    """(each row's first target position, each row's prefix index, the distinct prefixes as token lists, each
    row's length) when reading shared prefixes once applies to this batch and model, else None."""
    if "position_ids" in batch or not _takes_shared_prefix(model):
        return None
    ids = batch["input_ids"]
    rows, columns = ids.shape
    if rows < 2 or not bool(targets.any(dim=1).all()):
        return None
    mask = batch.get("attention_mask")
    if mask is None:
        lengths = [columns] * rows
    else:
        lengths = mask.sum(dim=1).tolist()
        right_padded = torch.arange(columns, device=mask.device)[None, :] < mask.sum(dim=1, keepdim=True)
        if not torch.equal(mask.bool(), right_padded):
            return None
    first = (targets.int().argmax(dim=1) + 1).tolist()
    distinct: dict[tuple[int, ...], int] = {}
    owner = [distinct.setdefault(tuple(ids[i, : first[i]].tolist()), len(distinct)) for i in range(rows)]
    if len(distinct) == rows:
        return None
    return first, owner, [list(prefix) for prefix in distinct], lengths


def _takes_shared_prefix(model: nn.Module) -> bool:
    """Whether the model's forward can read a prefix once and continue from its cache with the same result: a cache
    argument, full attention, no dropout acting, no gradient checkpointing, no FSDP-sharded modules."""
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    if config is None or base is None or base is model:
        return False
    if "cache" not in inspect.signature(base.forward).parameters:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if "sliding_attention" in layer_types:
            return False
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    checkpointing = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else None
    if getattr(model, checkpointing or "is_gradient_checkpointing", False):
        return False
    if model.training and (getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0 and module.training:
            return False
        if isinstance(module, FSDPModule):
            return False
    return True


__all__ = ["shared_prefix_hidden"]
