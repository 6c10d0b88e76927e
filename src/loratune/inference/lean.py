"""Decoding's leaner forward for the modules between the LoRA layers, for as long as a model generates.

A decoding step runs every module of the model on one row per sequence, so what costs is reading the weights
and the number of operations per module, not arithmetic. For the duration of ``decoding_kernels``:

- a plain ``nn.Linear`` (the output head, layers no adapter wraps) multiplies through the few-row kernel
  (``kernels.rows``; LoRA layers' base products take it through their ``base_product``);
- a Llama-family RMSNorm is one pass of the compiled kernel instead of eight PyTorch operations, and its SiLU
  MLP computes ``silu(gate)·up`` in one (``kernels.fused``), the same math and rounding as transformers'.

Each falls back to the module's own forward where a kernel does not take its tensors. Modules that already have
a forward of their own (a training run's lean ops, someone's hook) are left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from loratune.kernels import fused, rows
from loratune.models.structure import has_silu_activation, llama_family_classes


@contextmanager
def decoding_kernels(model: nn.Module) -> Iterator[int]:
    """Give ``model``'s plain Linear layers, and a Llama-family model's RMSNorms and SiLU MLPs, the kernels'
    forward inside the block (yields how many modules took it); their own forward afterwards."""
    norm_class, mlp_class = llama_family_classes(model) or (None, None)
    patched = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue
        if type(module) is nn.Linear:
            forward = _linear
        elif norm_class is not None and type(module) is norm_class:
            forward = _rms_norm
        elif mlp_class is not None and type(module) is mlp_class and has_silu_activation(module):
            forward = _silu_mlp
        else:
            continue
        module.forward = functools.partial(forward, module)
        patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _linear(module: nn.Linear, x):
    return rows.linear(x, module.weight, module.bias)


def _rms_norm(module: nn.Module, x):
    done = fused.rms_norm(x, module.weight, module.variance_epsilon)
    return type(module).forward(module, x) if done is None else done[0]


def _silu_mlp(module: nn.Module, x):
    gate, up = module.gate_proj(x), module.up_proj(x)
    product = fused.silu_mul(gate, up)
    return module.down_proj(module.act_fn(gate) * up if product is None else product)
