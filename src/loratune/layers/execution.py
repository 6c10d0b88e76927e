"""Execution backends: faster ways to compute what ``LoraLayer.reference_forward`` defines.

``run`` picks one per call, for Linear-like layers (a Linear, a 4-bit Linear, a GPT-2 ``Conv1D``):

- **fused** (autograd on, one term on every row): ``fused_linear``'s autograd functions, which save only x
  and A·x (DoRA: also one out-wide tensor for the magnitude's gradient, the output itself at strength 1); a
  4-bit base is dequantized in forward and again in backward.
- **stacked** (autograd on, a mixed-adapter batch): the batch's adapters as one stacked adapter — A of every
  adapter stacked (Σr × in), s·B side by side (out × Σr) — and a 0/1 row mask that keeps each row's own block.
- **plan** (autograd off): the terms' factors prepared once (cast, B scaled and transposed, stacked, the row
  mask) and kept in ``layer.execution_cache`` while the layer's state and training flag, the input's dtype
  and size regime, and the factors (their version counters; a move empties the cache) stay the same. A
  single adapter is the one-group case. A DoRA term folds in as a low-rank block with B scaled by its gain
  plus a per-row scaling of the base product. On a CPU with few rows (decoding) the compiled kernel
  (``lowrank_cpu``) adds the update in one call, reading each row's block of the stacked factors.
- **reference** for everything else: embeddings, dropout in training, a trainable base weight, extra
  arguments, an input in another dtype than the base computes in, DoRA in a mixed batch with autograd on.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from loratune.errors import ConfigError
from loratune.kernels import lowrank as lowrank_cpu
from loratune.layers.fused_linear import dora_linear, lora_linear
from loratune.layers.state import Term

FEW_ROWS = 64  # rows up to which a CPU keeps the low-rank products in the factors' float32 (and the kernel)
_VERSION = operator.attrgetter("_version")


def run(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``layer``'s output for ``x``: ``reference_forward``'s result, from the fastest backend that can compute it."""
    if args or kwargs or not layer.fast_paths:
        return layer.reference_forward(x, *args, **kwargs)
    if torch.is_grad_enabled():
        return _with_autograd(layer, x)
    plan = _plan(layer, x)
    return layer.reference_forward(x) if plan is None else plan.run(x)


def backend_for(layer, x: torch.Tensor) -> str:
    """Which backend ``run`` takes for ``x`` in the current grad mode: ``"reference"``, ``"base"`` (nothing to
    add), ``"fused"``, ``"stacked"``, ``"plan"`` or ``"kernel"`` (a plan whose update the CPU kernel adds)."""
    if not layer.fast_paths:
        return "reference"
    if torch.is_grad_enabled():
        return _autograd_backend(layer, x, layer.terms())
    plan = _plan(layer, x)
    if plan is None:
        return "reference"
    if plan.A is None:
        return "base"
    return "kernel" if plan.kernel is not None and x.is_contiguous() else "plan"


def _fast_path_applies(layer, x: torch.Tensor, terms) -> bool:
    """Whether a backend may replace the reference: x in the dtype the base computes in, no dropout acting,
    and, with autograd on, a frozen base weight (the fused paths give it no gradient)."""
    if x.dtype != layer.compute_dtype:
        return False
    if torch.is_grad_enabled() and not layer.quantized and layer.base_layer.weight.requires_grad:
        return False
    return not (layer.training and any(not isinstance(t.dropout, nn.Identity) for t in terms))


def fused_term(layer, x: torch.Tensor) -> Term | None:
    """The one term of ``layer`` when, with autograd on, an input like ``x`` takes the fused path (a single
    adapter on every row, no dropout acting, a frozen base computing in x's dtype); None otherwise. For fused
    functions that compute the layer's input themselves (``train.fused_ops``); a DoRA term has ``magnitude``."""
    if not layer.fast_paths or layer.state.routing is not None:
        return None
    terms = layer.terms()
    if len(terms) != 1 or terms[0].rows is not None:
        return None
    return terms[0] if _fast_path_applies(layer, x, terms) else None


def _autograd_backend(layer, x: torch.Tensor, terms) -> str:
    if not terms:
        return "base"
    if not _fast_path_applies(layer, x, terms):
        return "reference"
    if len(terms) == 1 and terms[0].rows is None:
        return "fused"
    return "reference" if any(t.magnitude is not None for t in terms) else "stacked"


def _with_autograd(layer, x: torch.Tensor) -> torch.Tensor:
    routing = layer.state.routing
    if routing is not None:
        routing.check_rows(x.shape[0])
    terms = layer.terms()
    backend = _autograd_backend(layer, x, terms)
    if backend == "base":
        return layer.base_layer(x)
    if backend == "reference":
        return layer.reference_forward(x)
    if backend == "fused":
        term = terms[0]
        if term.magnitude is not None:
            return dora_linear(x, layer, term, layer.base_layer.bias)
        return lora_linear(x, layer, layer.base_layer.bias, term.A, term.B, term.scale)
    A, sB = stacked_factors(terms, x.dtype)
    h = F.linear(x, A)
    mask = row_mask(terms, x.shape[0], x.dtype, x.device)
    if mask is not None:
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
    result = layer.base_product()(x)
    return result + F.linear(h, sB).to(result.dtype)


def stacked_factors(terms, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A of every term stacked: Σr × in, scale·B side by side: out × Σr), in ``dtype``, differentiable."""
    A = torch.cat([t.A for t in terms]).to(dtype)
    sB = torch.cat([t.B * t.scale for t in terms], dim=1).to(dtype)
    return A, sB


def row_mask(terms, n_rows: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """n_rows × Σr: row i keeps the blocks of the terms that act on it, at the term's weight for that row (1
    unless a mix says otherwise), the others are 0; None when every term has all rows."""
    if all(t.rows is None for t in terms):
        return None
    mask = torch.zeros(n_rows, sum(t.A.shape[0] for t in terms), dtype=dtype, device=device)
    offset = 0
    for term in terms:
        block = slice(offset, offset + term.A.shape[0])
        if term.rows is None:
            mask[:, block] = 1
        elif term.row_weights is None:
            mask[term.rows.to(device), block] = 1
        else:
            mask[term.rows.to(device), block] = term.row_weights.to(device=device, dtype=dtype)[:, None]
        offset += term.A.shape[0]
    return mask


# --- no autograd: prepared plans ------------------------------------------------------------------------------


def _few_cpu_rows(x: torch.Tensor) -> bool:
    return x.is_cpu and x.numel() <= FEW_ROWS * x.shape[-1]


KEPT_PLANS = 8  # plans kept per layer for recent states (e.g. a server alternating single and mixed batches)


def _plan(layer, x: torch.Tensor) -> Plan | None:
    """The layer's prepared plan for ``x``, rebuilt only when something it depends on changed. Decoding runs
    hundreds of these layers per token, where per-call Python work costs as much as the rank-r products, so
    the plan used last in this size regime is checked first (the same state object: one identity test)."""
    few = _few_cpu_rows(x)
    cache = layer.execution_cache
    plan = cache.get(few)
    if plan is None or plan.state is not layer.state or not plan.fits(layer, x):
        plan = _kept_plan(layer, x, few)
        cache[few] = plan
    return plan if plan.usable else None


def _kept_plan(layer, x: torch.Tensor, few: bool) -> Plan:
    """The plan for the layer's state (an equal state's, when one was prepared before), else a new one."""
    kept = layer.execution_cache.setdefault("by_state", {})
    key = (few, layer.state)
    plan = kept.pop(key, None)
    if plan is None or not plan.fits(layer, x):
        previous = layer.execution_cache.get(few)
        plan = (previous is not None and previous.rerouted(layer, x)) or Plan.build(layer, x, few)
    kept[key] = plan  # most recent last
    while len(kept) > KEPT_PLANS:
        kept.pop(next(iter(kept)))
    return plan


def _stamp(factors) -> int:
    # version counters only grow, so their sum changes when any one does (a move to another device or dtype
    # replaces the factors' storage: LoraLayer empties the cache then)
    return sum(map(_VERSION, factors))


class Plan:
    """``base(x) + (x·Aᵀ ⊙ mask)·sBt`` with the terms' factors cast, stacked and scaled once (A: Σr × in,
    sBt: Σr × out, mask: rows × 1 × Σr or None). ``usable`` is False when the reference must run (dropout in
    training, an input dtype the base does not compute in). ``kernel`` holds the fixed arguments of the
    compiled CPU kernel when it takes the update."""

    __slots__ = (
        "A",
        "base",
        "base_scale",
        "bias_shift",
        "blocks",
        "dtype",
        "factors",
        "few_kernel_fits",
        "kernel",
        "mask",
        "names",
        "ranks",
        "sBt",
        "stamp",
        "state",
        "training",
        "usable",
    )

    def fits(self, layer, x: torch.Tensor) -> bool:
        """Whether this plan still computes the layer's output for ``x`` (its state aside)."""
        return self.training is layer.training and self.dtype is x.dtype and self.stamp == _stamp(self.factors)

    def __init__(self, layer, x: torch.Tensor, terms):
        self.state, self.training, self.dtype = layer.state, layer.training, x.dtype
        self.base = layer.base_product()
        self.factors = tuple(t for term in terms for t in (term.A, term.B, term.magnitude) if t is not None)
        self.stamp = _stamp(self.factors)
        self.usable = _fast_path_applies(layer, x, terms)
        self.A = self.sBt = self.mask = self.kernel = self.blocks = self.base_scale = self.bias_shift = None
        self.names = layer.routed_names() if layer.state.routing is not None else None  # terms' adapters, in order
        self.ranks = tuple(t.A.shape[0] for t in terms)
        self.few_kernel_fits = False

    @classmethod
    def build(cls, layer, x: torch.Tensor, few: bool) -> Plan:
        terms = layer.terms()
        plan = cls(layer, x, terms)
        if not plan.usable or not terms:
            return plan
        # Few rows on a CPU: the rank-r products run several times faster in the factors' float32 than in bf16.
        dtype = terms[0].A.dtype if few else x.dtype
        with torch.no_grad():
            if any(t.magnitude is not None for t in terms):
                terms = plan._fold_dora(layer, [_detached(t) for t in terms], x.dtype)
                plan.A, plan.sBt = _stacked_for_plan(terms, dtype)
            else:
                plan.A, plan.sBt = _kept_stacked(layer, terms, dtype)
        routing = layer.state.routing
        if routing is not None:
            # A server's batches change rows often; every layer whose terms have the same rows and ranks
            # shares one mask (and kernel blocks), prepared once per routing.
            layout = (tuple((id(t.rows), id(t.row_weights), t.A.shape[0]) for t in terms), dtype, str(plan.A.device))
            plan.mask, plan.blocks = routing.prepared(layout, lambda: _mask_and_blocks(terms, routing, dtype))
        # the kernel takes 0/1 masks only: rows that mix adapters at weights run the plain products
        weighted = routing is not None and routing.weighted
        plan.few_kernel_fits = few and lowrank_cpu.kernel_fits(x.dtype, plan.A, plan.sBt)
        if plan.few_kernel_fits and not weighted and (plan.mask is None or plan.blocks is not None):
            plan.kernel = (
                lowrank_cpu.raw_kernel(),
                plan.A.data_ptr(),
                plan.sBt.data_ptr(),
                plan.A.shape[1],
                plan.A.shape[0],
                plan.sBt.shape[1],
                int(x.dtype == torch.bfloat16),
                0 if plan.blocks is None else plan.blocks.data_ptr(),
            )
        return plan

    def rerouted(self, layer, x: torch.Tensor) -> Plan | None:
        """This plan for the layer's new routing when nothing else changed and the same adapters act (a
        server's batch gaining or losing rows): only the mask and kernel blocks differ. None otherwise."""
        old, new = self.state, layer.state
        if (
            self.A is None
            or self.base_scale is not None
            or layer.pissa
            or old.routing is None
            or new.routing is None
            or replace(old, routing=None) != replace(new, routing=None)
            or not self.fits(layer, x)
            or layer.routed_names() != self.names
        ):
            return None
        routing, dtype = new.routing, self.A.dtype
        rows_of = routing.rows(self.A.device)
        layout = (
            tuple((id(rows_of[n][0]), id(rows_of[n][1]), r) for n, r in zip(self.names, self.ranks)),
            dtype,
            str(self.A.device),
        )
        plan = object.__new__(Plan)
        for slot in Plan.__slots__:
            setattr(plan, slot, getattr(self, slot))
        plan.state = new
        plan.mask, plan.blocks = routing.prepared(layout, lambda: _mask_and_blocks(layer.terms(), routing, dtype))
        if self.kernel is not None:
            if routing.weighted or (plan.mask is not None and plan.blocks is None):
                plan.kernel = None
            else:
                plan.kernel = (*self.kernel[:-1], 0 if plan.blocks is None else plan.blocks.data_ptr())
        elif self.few_kernel_fits and not routing.weighted and (plan.mask is None or plan.blocks is not None):
            return None  # the kernel could take this routing: build it
        return plan

    def _fold_dora(self, layer, terms, dtype: torch.dtype) -> list[Term]:
        """DoRA terms as plain ones with B scaled by their gain ``g``, and the base product's per-row scaling
        ``1 + Σ t·(g − 1)`` kept in ``base_scale`` (rows × 1 × out) with ``bias_shift`` = (scaling − 1)·bias."""
        rows = 1 if layer.state.routing is None else layer.state.routing.n_rows
        extra = torch.zeros(rows, layer.out_features, dtype=torch.float32, device=terms[0].A.device)
        folded = []
        for term in terms:
            if term.magnitude is None:
                folded.append(term)
                continue
            gain = layer.dora_gain(term)
            change = term.strength * (gain - 1)
            if term.row_weights is not None:
                change = term.row_weights[:, None] * change
            if term.rows is None:
                extra += change
            else:
                extra.index_add_(0, term.rows, change.expand(len(term.rows), -1))
            folded.append(replace(term, B=term.B * gain[:, None].to(term.B.dtype), magnitude=None))
        self.base_scale = (1 + extra)[:, None, :].to(dtype)
        bias = layer.base_layer.bias
        self.bias_shift = None if bias is None else (extra * bias.float())[:, None, :].to(dtype)
        return folded

    def _scaled_base(self, x2: torch.Tensor) -> torch.Tensor:
        """The base product, scaled per row for DoRA terms (a no-op without them)."""
        out = self.base(x2)
        if self.base_scale is not None:
            view = out.view(self.base_scale.shape[0], -1, out.shape[-1])
            view.mul_(self.base_scale)
            if self.bias_shift is not None:
                view.sub_(self.bias_shift)
        return out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.A is None:  # nothing to add: no adapter acts, or all are merged into the weight
            return self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        rows = 1 if self.mask is None else self.mask.shape[0]
        if self.mask is not None and x.shape[0] != rows:
            raise ConfigError(
                f"adapter_names has {rows} names but the batch has {x.shape[0]} rows; give exactly one name per row"
            )
        if self.kernel is not None and x2.is_contiguous():
            out = self._scaled_base(x2).contiguous()  # (it is; the kernel writes raw rows)
            add_low_rank, A_address, sBt_address, in_features, rank, out_features, is_bf16, blocks = self.kernel
            add_low_rank(
                out.data_ptr(),
                x2.data_ptr(),
                A_address,
                sBt_address,
                x2.shape[0],
                in_features,
                rank,
                out_features,
                is_bf16,
                blocks,
                max(x2.shape[0] // rows, 1),
            )
            return out.view(*x.shape[:-1], out_features)
        A, sBt = self.A, self.sBt
        # F.linear(x, A) with A as r × in: on a CPU, for a few rows, several times cheaper than x @ Aᵀ stored
        # transposed, which the BLAS splits across threads.
        h = F.linear(x2 if A.dtype == x2.dtype else x2.to(A.dtype), A)
        if self.mask is not None:  # mixed batch: zero the other adapters' columns of each row (dim 0 of x)
            h.view(rows, -1, h.shape[1]).mul_(self.mask)
        if A.dtype == x2.dtype:
            out = self._scaled_base(x2)
            out.addmm_(h, sBt)
        else:
            # float32 factors for a few bf16/fp16 rows: the rank-r products run before the base product (small
            # operations right after a multi-threaded matmul run slower)
            delta = torch.mm(h, sBt)
            out = self._scaled_base(x2)
            out.add_(delta)
        return out.view(*x.shape[:-1], out.shape[-1])


def _stacked_for_plan(terms, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A stacked: Σr × in, (scale·B)ᵀ stacked: Σr × out), contiguous, in ``dtype``, without autograd."""
    A, sB = stacked_factors([_detached(t) for t in terms], dtype)
    return A.contiguous(), sB.T.contiguous()


def _kept_stacked(layer, terms, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``_stacked_for_plan`` of these terms, reused while the same factors (same versions) act at the same
    scales: a new routing of the same adapters only needs a new mask."""
    key = (tuple((id(t.A), id(t.B), t.scale) for t in terms), dtype)
    stamp = _stamp([f for t in terms for f in (t.A, t.B)])
    kept = layer.execution_cache.setdefault("stacked", {})
    found = kept.get(key)
    if found is None or found[0] != stamp:
        found = kept[key] = (stamp, *_stacked_for_plan(terms, dtype))
        while len(kept) > KEPT_PLANS:
            kept.pop(next(iter(kept)))
    return found[1], found[2]


def _mask_and_blocks(terms, routing, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The plan's row mask (rows × 1 × Σr, or None when every term acts on every row) and the kernel's row
    blocks for it (None when the mask has weights, or a row's columns are not one run)."""
    mask = row_mask(terms, routing.n_rows, dtype, terms[0].A.device)
    if mask is None:
        return None, None
    blocks = None if routing.weighted else lowrank_cpu.row_blocks(mask)
    return mask[:, None, :].contiguous(), blocks


def _detached(term: Term) -> Term:
    return replace(term, A=term.A.detach(), B=term.B.detach())
