"""Decoding's leaner forward for the modules between the LoRA layers, for as long as a model generates.

A decoding step runs every module of the model on one row per sequence, so what costs is reading the weights
and the number of operations per module, not arithmetic. For the duration of ``decoding_kernels``:

- products of a few rows take the few-row kernel (``kernels.rows.decoding``, in this thread): a plain
  ``nn.Linear`` (the output head, layers no adapter wraps) through its forward, LoRA layers through their base
  product, or their whole output in one call;
- a Llama-family RMSNorm is one pass of the compiled kernel instead of eight PyTorch operations, and its SiLU
  MLP computes ``silu(gate)·up`` in one (``kernels.fused``), the same math and rounding as transformers';
- the attention of Llama, Mistral, Qwen2 and Qwen3 rotates queries and keys in one kernel call, in the layout
  the projections give (transformers' ``apply_rotary_pos_emb`` is a dozen operations, with the same bits).
- inside ``rows.batch_invariant()``, a prompt's attention takes ``kernels.fused.rows_attention``, each query
  computed alone (and every product and low-rank update the few-row kernels): each row's result is then the same
  bits whatever else the batch holds, so a request's greedy answer does not change with the batch it is served
  in (PyTorch's attention and products round a row by the other rows and the padding beside it: in bf16 enough
  to change answers).

Each falls back to the module's own forward where a kernel does not take its tensors. Modules that already have
a forward of their own (a training run's lean ops, someone's hook) are left alone.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from loratune.kernels import fused, rows
from loratune.models.devices import model_device
from loratune.models.structure import has_silu_activation, llama_family_classes

# model_type -> (its attention class, where the attention reads its sliding window: None for nowhere, "config" or
# "module"), for the architectures whose attention is Llama's (plus Qwen3's per-head q/k norms)
_ATTENTION = {
    "llama": ("LlamaAttention", None),
    "mistral": ("MistralAttention", "config"),
    "qwen2": ("Qwen2Attention", "module"),
    "qwen3": ("Qwen3Attention", "module"),
    "qwen3_moe": ("Qwen3MoeAttention", "module"),
    "mixtral": ("MixtralAttention", "config"),
}


@contextmanager
def decoding_kernels(model: nn.Module) -> Iterator[int]:
    """Inside the block, in this thread, products of a few rows take the few-row kernel, and ``model``'s plain
    Linear layers, and a Llama-family model's RMSNorms, SiLU MLPs and attentions, the kernels' forward (yields
    how many modules took one); their own forward afterwards."""
    on_cpu = model_device(model).type == "cpu"  # the kernels are CPU code: elsewhere nothing is patched
    norm_class, mlp_class = llama_family_classes(model) or (None, None)
    attention_class = attention_class_of(model)
    patched = []
    for module in model.modules() if on_cpu else ():
        if "forward" in module.__dict__:
            continue
        if type(module) is nn.Linear:
            forward = _linear
        elif norm_class is not None and type(module) is norm_class:
            forward = _rms_norm
        elif mlp_class is not None and type(module) is mlp_class and has_silu_activation(module):
            forward = _silu_mlp
        elif attention_class is not None and type(module) is attention_class:
            forward = attention
        else:
            continue
        module.forward = functools.partial(forward, module)
        patched.append(module)
    try:
        with rows.decoding():
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


def attention_class_of(model: nn.Module) -> type | None:
    """The attention class of ``model`` if it is one whose forward ``attention`` reproduces, else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ATTENTION:
        return None
    try:
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return None
    return getattr(modeling, _ATTENTION[model_type][0], None)


def attention(
    module: nn.Module,
    hidden_states,
    position_embeddings=None,
    attention_mask=None,
    cache=None,
    *,
    rotate=None,
    **kwargs,
):
    """transformers' forward of these attentions (see ``_ATTENTION``), RoPE by the kernel: ``rotate`` (default
    ``kernels.fused.rope``; training passes its differentiable one) or, where it returns None, transformers'."""
    model_type = module.config.model_type
    modeling = sys.modules[type(module).__module__]  # its family's own functions
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    query, key = module.q_proj(hidden_states).view(shape), module.k_proj(hidden_states).view(shape)
    value = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(module, "q_norm"):
        query, key = module.q_norm(query), module.k_norm(key)
    cos, sin = position_embeddings
    rotated = (rotate or fused.rope)(query, key, cos, sin)
    if rotated is None:
        query, key = modeling.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    else:
        query, key = rotated[0].transpose(1, 2), rotated[1].transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    window = _ATTENTION[model_type][1]
    if window is not None:
        source = module.config if window == "config" else module
        kwargs["sliding_window"] = getattr(source, "sliding_window", None)
    if rows.invariant() and _rows_attention_applies(module, query) and kwargs.get("sliding_window") is None:
        allowed = _allowed(attention_mask, query.shape[0], query.shape[2], key.shape[2])
        output = None
        if allowed is not None:
            output = fused.rows_attention(query.transpose(1, 2).contiguous(), key, value, allowed, module.scaling)
        if output is not None:
            return module.o_proj(output.reshape(*hidden_states.shape[:-1], -1)), None
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, modeling.eager_attention_forward)
    output, weights = attend(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    output = output.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return module.o_proj(output), weights


def _rows_attention_applies(module: nn.Module, query: torch.Tensor) -> bool:
    """Whether ``kernels.fused.rows_attention`` may read this prompt: no autograd, no training, on the CPU."""
    return not module.training and not torch.is_grad_enabled() and query.device.type == "cpu"


def _allowed(mask, rows: int, queries: int, cols: int) -> torch.Tensor | None:
    """The columns each query attends to (rows × queries × cols, bool) from the mask transformers hands an
    attention: None (causal: the queries are the last ``queries`` columns), a boolean mask (rows × 1 × queries ×
    cols, True where allowed) or an additive one (0 where allowed); None for any other."""
    if mask is None:
        causal = torch.ones(queries, cols, dtype=torch.bool).tril(cols - queries)
        return causal.expand(rows, queries, cols).contiguous()
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2:] != (queries, cols) or mask.shape[0] not in (1, rows):
        return None
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    return allowed.expand(rows, queries, cols).contiguous()
