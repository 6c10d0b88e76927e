"""The optimizer: AdamW over the trainable parameters, in LoRA+ groups when ``train.loraplus_lr_ratio`` is set.

``train.optimizer`` picks the implementation: PyTorch's AdamW (float32 states, two per trained weight), or
bitsandbytes' AdamW with 8-bit block-quantized states (``adamw_8bit``: a quarter of the states' memory, what
QLoRA's paper pairs with a 4-bit base) and its paged variant (``paged_adamw_8bit``: states in CUDA unified
memory, evicted to the CPU under memory pressure; CUDA only).

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
from loratune.errors import ConfigError


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


def build_optimizer(model: nn.Module, train, params: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """AdamW as ``train`` (a ``TrainSection``) says (``train.optimizer``): over ``params`` (default: ``model``'s
    trainable parameters) in one group, or in LoRA+'s groups."""
    if train.loraplus_lr_ratio is None:
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        groups = [{"params": params, "lr_scale": 1.0}]
    else:
        groups = _loraplus_groups(
            model, train.lr, train.loraplus_lr_ratio, train.loraplus_lr_embedding, train.weight_decay
        )
    groups = _apart_from_shards(groups)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, foreach=True)
    return _adamw_8bit(groups, train)


def _adamw_8bit(groups: list[dict], train) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (paged for ``paged_adamw_8bit``) over ``groups``; ``ConfigError`` where it cannot
    run: paged states without CUDA, parameters FSDP shards, bitsandbytes missing."""
    from loratune.train.distributed import is_sharded

    params = [p for group in groups for p in group["params"]]
    if train.optimizer == "paged_adamw_8bit" and not all(p.device.type == "cuda" for p in params):
        raise ConfigError(
            "train.optimizer: paged_adamw_8bit pages optimizer states between GPU and CPU memory, which needs "
            "CUDA; on a CPU use adamw_8bit"
        )
    if any(is_sharded(p) for p in params):
        raise ConfigError(
            f"train.optimizer: {train.optimizer} does not take FSDP's sharded parameters; use adamw with FSDP, "
            "or DDP (train.distributed: ddp)"
        )
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as error:
        raise ConfigError(
            f"train.optimizer: {train.optimizer} needs bitsandbytes ({error}); pip install 'loratune[quant]'"
        ) from None
    kind = bnb_optim.PagedAdamW8bit if train.optimizer == "paged_adamw_8bit" else bnb_optim.AdamW8bit
    return kind(groups, lr=train.lr, weight_decay=train.weight_decay)


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
