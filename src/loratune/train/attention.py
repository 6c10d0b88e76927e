"""Attention for training on a CPU: the forward through PyTorch's CPU flash kernel (which also gives each
query row's log-sum-exp), the backward in two parts: the probabilities and the scores' gradient from one
compiled pass (``fused_cpu.attention_backward_scores``: q·kᵀ and dO·vᵀ in float32, as the flash kernel takes
them, never kept as float32 matrices), then the three products with them as batched bf16 products.

PyTorch's CPU flash backward walks the scores in small blocks with float32 buffers and takes several times
its forward's time. Here grouped-query heads share their key/value head's products (a group's query rows are
one matrix), so keys and values are never repeated and their gradients come out summed over the group, and a
causal tile past its last query's position is not computed at all.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from loratune.kernels import fused as fused_cpu

ATTENTION = "loratune_sdpa"  # the attention implementation ``patch_attention`` registers and selects
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _mask_rows(mask: torch.Tensor, batch: int, heads: int, q_len: int) -> torch.Tensor:
    """The offset of each query row's mask row (rows ordered batch, head, query) in ``mask``'s storage."""
    expanded = mask.expand(batch, heads, q_len, mask.shape[-1])
    sb, sh, sq, _ = expanded.stride()
    return (
        torch.arange(batch)[:, None, None] * sb
        + torch.arange(heads)[None, :, None] * sh
        + torch.arange(q_len)[None, None, :] * sq
    ).reshape(-1)


class AttentionFunction(torch.autograd.Function):
    """``softmax(scale·q·kᵀ + mask)·v`` (causal: keys after the query masked) for q ``[B, H, L, d]`` and k, v
    ``[B, KV, L, d]`` with H a multiple of KV (query head h reads key/value head h // (H / KV)); ``mask``: None
    or an additive float32 mask broadcastable to ``[B, H, L, L]``. Saves q, k, v, the output and one float per
    query row, like the flash kernel's own backward."""

    @staticmethod
    def forward(ctx, query, key, value, mask, causal: bool, scale: float):
        flash_mask = None if mask is None else mask.to(query.dtype)
        out, lse = _flash(query, key, value, 0.0, causal, attn_mask=flash_mask, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, mask = ctx.saved_tensors
        batch, heads, q_len, head_dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        group = heads // kv_heads
        # one matrix per key/value head: its group's query rows one after another
        q = query.contiguous().view(batch * kv_heads, group * q_len, head_dim)
        k = key.contiguous().view(batch * kv_heads, k_len, head_dim)
        v = value.contiguous().view(batch * kv_heads, k_len, head_dim)
        grad = grad_out.contiguous().view_as(q)
        probs, grad_scores = fused_cpu.attention_backward_scores(
            q,
            grad,
            out.contiguous().view_as(q),
            k,
            v,
            lse.contiguous(),
            mask,
            None if mask is None else _mask_rows(mask, batch, heads, q_len),
            q_len,
            ctx.causal,
            ctx.scale,
        )
        grad_v = torch.bmm(probs.transpose(1, 2), grad)
        grad_q = torch.bmm(grad_scores, k)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q)
        return (grad_q.view_as(query), grad_k.view(key.shape), grad_v.view(value.shape), None, None, None)


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A 4-D attention mask as the additive float32 one the kernel reads (a bool mask: 0 where attended, −inf
    elsewhere, as SDPA turns it; a float mask rounded to ``dtype`` first, as the forward reads it)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype).to(torch.float32).contiguous()


# The last mask converted: (a weak reference to transformers' mask, its version, the query dtype, the additive
# float32 mask). Every
# block of a forward gets the same mask, so they share one conversion, and the graph keeps one copy, not one per block.
_converted: tuple | None = None


def _shared_additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    global _converted
    if mask is None:
        return None
    if _converted is not None and _converted[0]() is mask and _converted[1:3] == (mask._version, dtype):
        return _converted[3]
    additive = _additive_mask(mask, dtype)
    _converted = (weakref.ref(mask), mask._version, dtype, additive)
    return additive


def fits(module: nn.Module, query, key, value, attention_mask, dropout: float, kwargs: dict) -> bool:
    """Whether ``AttentionFunction`` computes this call the way transformers' SDPA attention would: training
    with gradients on a CPU, in bf16 or float32, no dropout, no extras SDPA would not take either, query and
    key lengths equal, and a 4-D mask (if any) for every head or one for all."""
    tensors = (query, key, value)
    return (
        module.training
        and dropout == 0.0
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and fused_cpu.attention_fits(*tensors)
        and all(t.dim() == 4 for t in tensors)
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and query.shape[1] % key.shape[1] == 0
        and key.shape == value.shape
        and query.shape[0] == key.shape[0]
        and query.shape[2] == key.shape[2]
        and query.shape[3] == key.shape[3]
        and (
            attention_mask is None
            or (
                attention_mask.dim() == 4
                and attention_mask.shape[1] in (1, query.shape[1])
                and attention_mask.shape[0] in (1, query.shape[0])
                and attention_mask.shape[2:] == (query.shape[2], key.shape[2])
            )
        )
    )


def attention(
    module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' SDPA attention, with the backward above while training on a CPU (and the compiled dropout
    mask when there is attention dropout, ``dropout.attention``). Other calls go to SDPA unchanged."""
    if not fits(module, query, key, value, attention_mask, dropout, kwargs):
        from loratune.train import dropout as kernel_dropout

        return kernel_dropout.attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and attention_mask is None and query.shape[2] > 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = AttentionFunction.apply(
        query, key, value, _shared_additive_mask(attention_mask, query.dtype), causal, float(scale)
    )
    return out.transpose(1, 2).contiguous(), None


def patch_attention(model: nn.Module) -> bool:
    """Route a transformers model's SDPA attention through ``attention``; True when it now does (its attention
    was SDPA, the kernels are built and the model takes a registered implementation)."""
    config = getattr(model, "config", None)
    if (
        not fused_cpu.kernel_available()
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or not hasattr(model, "set_attn_implementation")
    ):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, AttributeError):
        return False  # a model that does not take a registered implementation keeps SDPA
    return True


__all__ = ["ATTENTION", "AttentionFunction", "attention", "patch_attention"]
