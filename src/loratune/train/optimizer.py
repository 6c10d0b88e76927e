"""The optimizer: AdamW over the trainable parameters, in LoRA+ groups when ``train.loraplus_lr_ratio`` is set.

LoRA+ (Hayou et al., 2024) trains B faster than A: B's learning rate is ``ratio × lr``. The groups follow PEFT's
``create_loraplus_optimizer``: the factors of adapted embeddings at ``loraplus_lr_embedding``; every B factor and
every 1-D parameter (DoRA magnitudes, biases and norm weights of modules_to_save) at ``ratio × lr``, without
weight decay for biases and LayerNorm weights; everything else (A factors, 2-D modules_to_save weights) at
``lr``. Each group records its learning rate as a multiple of ``train.lr`` (``lr_scale``), so the schedule
scales every group alike and a checkpoint restores the groups with the optimizer state.
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters import lora_layers


def _loraplus_groups(model: nn.Module, lr: float, ratio: float, embedding_lr: float, weight_decay: float):
    embedding_factors, b_factors = set(), set()
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            if layer.embedding:
                embedding_factors |= {id(layer.lora_A[name]), id(layer.lora_B[name])}
            else:
                b_factors.add(id(layer.lora_B[name]))
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for name, p in model.named_parameters() if "bias" in name}
    groups = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_factors:
            groups["embedding"].append(param)
        elif id(param) in b_factors or param.dim() == 1:
            groups["B_no_decay" if id(param) in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    scales = {"A": 1.0, "embedding": embedding_lr / lr, "B": ratio, "B_no_decay": ratio}
    return [
        {
            "params": params,
            "lr": lr * scales[key],
            "lr_scale": scales[key],
            "weight_decay": 0.0 if key == "B_no_decay" else weight_decay,
        }
        for key, params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, train, params: list[torch.Tensor] | None = None) -> torch.optim.AdamW:
    """AdamW as ``train`` (a ``TrainSection``) says: over ``params`` (default: ``model``'s trainable parameters)
    in one group, or in LoRA+'s groups."""
    if train.loraplus_lr_ratio is None:
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        groups = [{"params": params, "lr_scale": 1.0}]
    else:
        groups = _loraplus_groups(
            model, train.lr, train.loraplus_lr_ratio, train.loraplus_lr_embedding, train.weight_decay
        )
    return torch.optim.AdamW(_apart_from_shards(groups), lr=train.lr, weight_decay=train.weight_decay, foreach=True)


def _apart_from_shards(groups: list[dict]) -> list[dict]:
    """Each group split in two when it mixes parameters FSDP sharded (DTensors) with whole ones: the foreach
    update runs over one kind at a time."""
    from loratune.train.distributed import is_sharded

    split = []
    for group in groups:
        sharded = [p for p in group["params"] if is_sharded(p)]
        whole = [p for p in group["params"] if not is_sharded(p)]
        split += [{**group, "params": params} for params in (sharded, whole) if params]
    return split


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
