"""The compiled CPU kernels for a training step's work outside the big matrix products (``csrc/``, built by
``pip install``): a Llama block's RMSNorm and ``silu(gate)·up``, forward and backward, each one pass over memory;
dropout masks; attention's backward between its products (``train.attention``); the cross-entropy's softmax over
each chunk of logits (``inference.loss``); rotary position embedding of queries and keys (``inference.lean``).

In PyTorch operations each of these is a chain of five to fifteen operations that each write a fresh tensor;
on a CPU that memory traffic, not the arithmetic, is what they cost. Every function here returns None when
the kernel cannot take its tensors (not built or switched off, see ``loader``; not on the CPU, not contiguous,
not one dtype of bf16 or float32), and the caller runs its PyTorch code instead: the two agree up to the order
of float32 sums. Like PyTorch's own operations, the kernels split their work over
``torch.get_num_threads()`` threads (PyTorch's own OpenMP threads where the module is built with OpenMP).
"""

from __future__ import annotations

import torch

from loratune.kernels.loader import compiled as _cpu
from loratune.kernels.loader import kernel_available

_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
QUERY_BLOCK = 16  # rows_attention's queries per work item: they share their keys, transposed once
_PAIR_ISAS = ("avx512bf16", "amx")  # the variants whose attention takes bf16 as it is (AVX512-BF16's pair products)


def _fits(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return (
        dtype in _DTYPES
        and kernel_available()
        and all(t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` (silu rounded to the dtype first, as PyTorch does), or None."""
    if gate.shape != up.shape or not _fits(gate, up):
        return None
    out = torch.empty_like(gate)
    _cpu.silu_mul(
        out.data_ptr(), gate.data_ptr(), up.data_ptr(), gate.numel(), _DTYPES[gate.dtype], torch.get_num_threads()
    )
    return out


def silu_mul_backward(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(grad_gate, grad_up) of ``silu(gate) * up`` for the output gradient ``grad``, or None. ``out``: two
    tensors like ``gate`` to write them into, which may be any of the three inputs themselves (elementwise,
    each element is read before it is written), saving two allocations."""
    if not (gate.shape == up.shape == grad.shape) or not _fits(gate, up, grad):
        return None
    if out is None:
        out = torch.empty_like(gate), torch.empty_like(up)
    elif not all(o.shape == gate.shape for o in out) or not _fits(gate, *out):
        return None
    grad_gate, grad_up = out
    _cpu.silu_mul_backward(
        grad_gate.data_ptr(),
        grad_up.data_ptr(),
        gate.data_ptr(),
        up.data_ptr(),
        grad.data_ptr(),
        gate.numel(),
        _DTYPES[gate.dtype],
        torch.get_num_threads(),
    )
    return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``weight * (x·rstd).to(dtype)``, rstd) with rstd = 1/√(mean(x²) + eps) per row as float32 of shape
    ``x.shape[:-1] + (1,)``, or None."""
    if x.dim() == 0 or weight.shape != x.shape[-1:] or not _fits(x, weight):
        return None
    h = x.shape[-1]
    out = torch.empty_like(x)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    _cpu.rms_norm(
        out.data_ptr(),
        rstd.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        x.numel() // max(h, 1),
        h,
        float(eps),
        _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return out, rstd


def _norm_fits(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, *more: torch.Tensor) -> bool:
    """Whether the kernels can take a norm's input, weight and its float32 rstd (one per row of x)."""
    return (
        x.dim() > 0
        and weight.shape == x.shape[-1:]
        and rstd.dtype == torch.float32
        and rstd.is_contiguous()
        and rstd.numel() * x.shape[-1] == x.numel()
        and _fits(x, weight, *more)
    )


def rms_norm_with_rstd(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor | None:
    """``weight * (x·rstd).to(dtype)`` for a float32 rstd that ``rms_norm`` returned (the same bits again),
    or None."""
    if not _norm_fits(x, weight, rstd):
        return None
    h = x.shape[-1]
    out = torch.empty_like(x)
    _cpu.rms_norm_apply(
        out.data_ptr(),
        rstd.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        rstd.numel(),
        h,
        _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return out


def rms_norm_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor | None:
    """The input gradient of ``rms_norm`` for the output gradient ``grad``, or None."""
    if grad.shape != x.shape or not _norm_fits(x, weight, rstd, grad):
        return None
    h = x.shape[-1]
    grad_x = torch.empty_like(x)
    _cpu.rms_norm_backward(
        grad_x.data_ptr(),
        grad.data_ptr(),
        x.data_ptr(),
        weight.data_ptr(),
        rstd.data_ptr(),
        rstd.numel(),
        h,
        _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return grad_x


def dropout_fits(x: torch.Tensor) -> bool:
    """Whether ``dropout`` can take ``x`` (the kernel is built and on, ``x`` is a contiguous CPU tensor in bf16
    or float32)."""
    return _fits(x)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor | None:
    """``x`` with each element zeroed with probability ``p`` and the rest scaled by 1/(1 − p), the mask a pure
    function of (``seed``, element index): the same ``seed`` on a tensor of the same size gives the same mask
    (dropout's backward is this function applied to the output gradient). None when the kernel cannot take
    ``x``."""
    if not 0.0 < p < 1.0 or not _fits(x):
        return None
    keep_below = min(round((1.0 - p) * 2**32), 2**32 - 1)
    out = torch.empty_like(x)
    _cpu.dropout(
        out.data_ptr(),
        x.data_ptr(),
        x.numel(),
        seed,
        keep_below,
        1.0 / (1.0 - p),
        _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return out


def rows_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """A prompt's attention, each query computed alone (float32: its scores, then its softmax and the weighted
    sum of values over its allowed columns in order, rounded once), so that a row's output is the same bits
    whatever the batch it is read in: other rows, padding, how many of its queries one call takes. ``query``
    (rows × queries × q_heads × dim, contiguous); ``key``, ``value`` (rows × kv_heads × cols × dim, each head's
    columns contiguous, as the KV cache's buffers with room to grow lay them out); ``allowed`` (rows × queries ×
    cols, bool). The output is laid out as ``query``; a query with no allowed column (a padding position) gets
    zeros. None where the kernel does not take these tensors."""
    rows, queries, q_heads, dim = query.shape if query.dim() == 4 else (0, 0, 0, 0)
    if (
        not _fits(query)
        or key.dim() != 4
        or key.shape[0] != rows
        or q_heads % max(key.shape[1], 1)
        or key.shape[3] != dim
        or value.shape != key.shape
        or value.stride() != key.stride()
        or not all(t.dtype == query.dtype and t.device.type == "cpu" for t in (key, value))
        or key.stride(3) != 1
        or key.stride(2) != dim
        or key.stride(1) % dim
        or key.stride(0) != key.shape[1] * key.stride(1)
        or allowed.dtype != torch.bool
        or allowed.shape != (rows, queries, key.shape[2])
        or not allowed.is_contiguous()
    ):
        return None
    out = torch.empty_like(query)
    cols = key.shape[2]
    _cpu.rows_attention(
        out.data_ptr(),
        query.data_ptr(),
        key.data_ptr(),
        value.data_ptr(),
        allowed.data_ptr(),
        rows * key.shape[1] * -(-queries // QUERY_BLOCK),
        queries,
        QUERY_BLOCK,
        q_heads,
        key.shape[1],
        dim,
        cols,
        key.stride(1) // dim,
        float(scale),
        _DTYPES[query.dtype],
        torch.get_num_threads(),
    )
    return out


def attention_fits(*tensors: torch.Tensor) -> bool:
    """Whether ``attention_scores_backward`` can take tensors of these dtypes on this device (all of one dtype,
    bf16 or float32, on the CPU, with the kernel built and on)."""
    dtype = tensors[0].dtype
    return dtype in _DTYPES and kernel_available() and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)


def attention_backward_scores(
    q: torch.Tensor,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    mask_rows: torch.Tensor | None,
    q_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities and the scores' gradient of attention, for its backward: ``(p, ds)``, each
    ``[batch, rows, keys]`` in ``out``'s dtype, with s = q·kᵀ and dp = dO·vᵀ taken in float32, p = exp(scale·s +
    mask − lse) and ds = p·(dp − Σ dO·O)·scale (zero where ``causal`` masks a key after its query, the query being
    row mod ``q_len``, or where the row's lse is −inf). q, grad_out, out: ``[batch, rows, head_dim]``; key, value:
    ``[batch, keys, head_dim]``; lse: float32, one per row; mask: additive float32 read at ``mask_rows[row]``
    (int64 offsets, rows counted over the whole batch) along the keys. The caller checks ``attention_fits``."""
    batch, rows, head_dim = q.shape
    keys = key.shape[1]
    padded = (keys + 15) // 16 * 16
    # with AVX512-BF16 the kernel takes bf16 as it is, k and v transposed in pairs of dimensions; else float32
    pairs = _cpu.isa() in _PAIR_ISAS and out.dtype == torch.bfloat16 and head_dim % 2 == 0

    def transposed(t):  # [batch, head_dim, padded] float32 or [batch, head_dim / 2, padded, 2] bf16, zero-padded
        if pairs:  # a pair as one int32: a plain transposing copy
            packed = torch.zeros(batch, head_dim // 2, padded, dtype=torch.int32)
            packed[:, :, :keys] = t.contiguous().view(torch.int32).transpose(1, 2)
            return packed.view(t.dtype)
        packed = torch.zeros(batch, head_dim, padded, dtype=torch.float32)
        packed[:, :, :keys] = t.transpose(1, 2)
        return packed

    dtype = out.dtype if pairs else torch.float32
    q32, grad32 = q.to(dtype).contiguous(), grad_out.to(dtype).contiguous()
    kt, vt = transposed(key), transposed(value)
    probs = torch.empty(batch, rows, padded, dtype=out.dtype)
    grad_scores = torch.empty_like(probs)
    tiles = batch * ((rows + 3) // 4)
    _cpu.attention_backward_scores(
        probs.data_ptr(),
        grad_scores.data_ptr(),
        q32.data_ptr(),
        grad32.data_ptr(),
        out.contiguous().data_ptr(),
        kt.data_ptr(),
        vt.data_ptr(),
        lse.contiguous().data_ptr(),
        0 if mask is None else mask.data_ptr(),
        0 if mask_rows is None else mask_rows.data_ptr(),
        tiles,
        rows,
        q_len,
        keys,
        head_dim,
        int(causal),
        float(scale),
        _DTYPES[out.dtype],
        int(pairs),
        torch.get_num_threads(),
    )
    return probs[..., :keys], grad_scores[..., :keys]


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor | None:
    """Each row's log-sum-exp of ``logits`` (rows × vocab, bf16 or float32) as float32, computed in float32 with
    the row's max subtracted; with ``want_grad`` every row of ``logits`` is overwritten by the cross-entropy's
    gradient softmax(row) − onehot(target) in place. None (``logits`` untouched) when the kernel cannot take it."""
    if logits.dim() != 2 or not _fits(logits) or targets.shape != logits.shape[:1] or targets.dtype != torch.int64:
        return None
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < logits.shape[1]:
        return None  # an id outside the vocabulary: PyTorch's indexing raises its error
    targets = targets.contiguous()
    lse = torch.empty(logits.shape[0], dtype=torch.float32)
    _cpu.cross_entropy_rows(
        logits.data_ptr(),
        lse.data_ptr(),
        targets.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        int(want_grad),
        _DTYPES[logits.dtype],
        torch.get_num_threads(),
    )
    return lse


def rope_fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rope`` takes these tensors (layouts and dtypes, and the kernel is built)."""
    dim = q.shape[-1]
    rows = q.numel() // max(q.shape[-2] * dim, 1) if q.dim() >= 2 else 0
    return not (
        q.dim() < 2
        or k.dim() != q.dim()
        or dim % 2
        or k.shape[-1] != dim
        or cos.shape != sin.shape
        or cos.shape[-1] != dim
        or cos.numel() != rows * dim
        or k.numel() != rows * k.shape[-2] * dim
        or q.shape[:-2] != k.shape[:-2]
        or q.shape[:-2] != cos.shape[:-1]
        or not _fits(q, k, cos, sin)
    )


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotary position embedding of queries ``q`` (…, L, q_heads, D) and keys ``k`` (…, L, k_heads, D) for
    ``cos``, ``sin`` (…, L, D), as transformers' ``apply_rotary_pos_emb`` computes it (rotate-half form, same
    rounding) but in the tokens-major layout the projections give: new tensors shaped like q and k, or None
    (the layouts do not fit, or the kernel cannot take the tensors)."""
    if not rope_fits(q, k, cos, sin):
        return None
    rows, dim = cos.numel() // cos.shape[-1], q.shape[-1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _cpu.rope(
        q_out.data_ptr(),
        q.data_ptr(),
        q.shape[-2],
        k_out.data_ptr(),
        k.data_ptr(),
        k.shape[-2],
        cos.data_ptr(),
        sin.data_ptr(),
        rows,
        dim,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
    )
    return q_out, k_out
