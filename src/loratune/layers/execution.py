"""Execution backends: faster ways to compute what ``LoraLayer.reference_forward`` defines.

Each backend is an object with a ``name`` and a ``forward``; ``select`` is the one place that decides which one
computes a call (``run`` and any introspection, ``backend_for``, share it), for Linear-like layers (a Linear, a
4-bit Linear, a GPT-2 ``Conv1D``):

- **fused** (autograd on, one term on every row): ``fused_linear``'s autograd functions, which save only x
  and A·x (DoRA: also one out-wide tensor for the magnitude's gradient, the output itself at strength 1); a
  4-bit base is dequantized in forward and again in backward.
- **stacked** (autograd on, a mixed-adapter batch): the batch's adapters as one stacked adapter — A of every
  adapter stacked (Σr × in), s·B side by side (out × Σr) — and a row mask that keeps each row's own block.
- **plan** (autograd off): the terms' factors prepared once (``Plan``: cast, B scaled and transposed, stacked,
  the row mask) and kept in the layer's ``ExecutionCache`` while the layer's state and training flag, the
  input's dtype and size regime, and the factors (their version counters; a move empties the cache) stay the
  same. A single adapter is the one-group case. A DoRA term folds in as a low-rank block with B scaled by its
  gain plus a per-row scaling of the base product.
- **kernel**: a plan whose update the compiled CPU kernel (``kernels.lowrank``) adds in one call, reading each
  row's block of the stacked factors (few rows on a CPU: decoding).
- **base**: nothing to add (no adapter acts, or all are merged).
- **reference** for everything else: embeddings, dropout in training, a trainable base weight, extra
  arguments, an input in another dtype than the base computes in, DoRA in a mixed batch with autograd on.

``trace()`` records which backend each call ran, so tests assert what executed rather than a prediction.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from loratune.errors import ConfigError
from loratune.kernels import lowrank as lowrank_kernel
from loratune.kernels import rows as rows_kernel
from loratune.layers.fused_linear import dora_linear, lora_linear
from loratune.layers.state import LayerState, Routing, Term, row_tensors

FEW_ROWS = 64  # rows up to which a CPU keeps the low-rank products in the factors' float32 (and the kernel)
KEPT_PLANS = 8  # plans kept per layer for recent states (e.g. a server alternating single and mixed batches)
_VERSION = operator.attrgetter("_version")


# --- the backends --------------------------------------------------------------------------------------------


class Backend:
    """A way to compute a layer's output; ``prepared`` is what ``select`` made for it (terms, a plan)."""

    name = "backend"

    def forward(self, layer, x: torch.Tensor, prepared) -> torch.Tensor:
        raise NotImplementedError


class Reference(Backend):
    name = "reference"

    def forward(self, layer, x, prepared):
        return layer.reference_forward(x)


class Base(Backend):
    """No adapter adds anything: the base product alone (a plan's bound product when one is prepared)."""

    name = "base"

    def forward(self, layer, x, prepared):
        return layer.base_layer(x) if prepared is None else prepared.base(x)


class Fused(Backend):
    """One term on every row, with autograd: ``fused_linear``'s functions (DoRA's when it has a magnitude)."""

    name = "fused"

    def forward(self, layer, x, term: Term):
        if term.magnitude is not None:
            return dora_linear(x, layer, term, layer.base_layer.bias)
        return lora_linear(x, layer, layer.base_layer.bias, term.A, term.B, term.scale)


class Stacked(Backend):
    """A mixed batch with autograd: every term's A stacked, s·B side by side, a row mask between them."""

    name = "stacked"

    def forward(self, layer, x, terms: list[Term]):
        A, sB = stacked_factors(terms, x.dtype)
        h = F.linear(x, A)
        mask = row_mask(terms, x.shape[0], x.dtype, x.device)
        if mask is not None:
            h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        result = layer.base_product()(x)
        return result + F.linear(h, sB).to(result.dtype)


class Planned(Backend):
    """Without autograd: the prepared plan's products."""

    name = "plan"

    def forward(self, layer, x, plan: Plan):
        return plan.run(x)


class Kernel(Backend):
    """Without autograd, few contiguous rows on a CPU (a batch-invariant plan: any rows): the plan's update added by
    the compiled kernel."""

    name = "kernel"

    def forward(self, layer, x, plan: Plan):
        return plan.run_kernel(x.contiguous())  # (a batch-invariant plan's: any x, see select)


REFERENCE, BASE, FUSED, STACKED, PLAN, KERNEL = Reference(), Base(), Fused(), Stacked(), Planned(), Kernel()


def select(layer, x: torch.Tensor) -> tuple[Backend, object]:
    """The backend that computes ``layer``'s output for ``x`` in the current grad mode, and what it prepared for
    it: the one decision ``run`` and ``backend_for`` share."""
    if not layer.fast_paths:
        return REFERENCE, None
    if torch.is_grad_enabled():
        terms = layer.terms()
        if not terms:
            return BASE, None
        if not fast_path_applies(layer, x, terms):
            return REFERENCE, None
        if len(terms) == 1 and terms[0].rows is None:
            return FUSED, terms[0]
        return (REFERENCE, None) if any(t.magnitude is not None for t in terms) else (STACKED, terms)
    plan = plan_for(layer, x)
    if not plan.usable:
        return REFERENCE, None
    if plan.A is None:
        return BASE, plan
    # A batch-invariant plan's update is the kernel's whatever x's layout: its factors may hold rows of their own
    # for weighted mixes, which only the kernel's blocks read, and another path would round rows differently.
    usable_kernel = plan.kernel is not None and (x.is_contiguous() or plan.invariant)
    return (KERNEL, plan) if usable_kernel else (PLAN, plan)


_trace: list[str] | None = None


def run(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``layer``'s output for ``x``: ``reference_forward``'s result, from the backend ``select`` picks."""
    if args or kwargs:
        backend, prepared = REFERENCE, None
    else:
        routing = layer.state.routing
        if routing is not None:
            routing.check_rows(x.shape[0])
        backend, prepared = select(layer, x)
    if _trace is not None:
        _trace.append(backend.name)
    if backend is REFERENCE:
        return layer.reference_forward(x, *args, **kwargs)
    return backend.forward(layer, x, prepared)


def tracing() -> bool:
    """Whether a ``trace()`` is open (code that runs layers' kernels itself records them only then)."""
    return _trace is not None


def record(name: str) -> None:
    """Note in an open ``trace()`` that a call ran backend ``name`` (modules that choose their own paths)."""
    if _trace is not None:
        _trace.append(name)


def backend_for(layer, x: torch.Tensor) -> str:
    """The name of the backend ``run`` takes for ``x`` in the current grad mode (``select``'s choice)."""
    return select(layer, x)[0].name


@contextlib.contextmanager
def trace() -> Iterator[list[str]]:
    """For the block, the name of the backend every layer call ran, in order (tests: what actually executed)."""
    global _trace
    outer, _trace = _trace, []
    try:
        yield _trace
    finally:
        _trace = outer


def fast_path_applies(layer, x: torch.Tensor, terms) -> bool:
    """Whether a backend may replace the reference: x in the dtype the base computes in, no dropout acting,
    and, with autograd on, a frozen base weight (the fused paths give it no gradient)."""
    if x.dtype != layer.compute_dtype:
        return False
    if torch.is_grad_enabled() and layer.base_trains():
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
    return terms[0] if fast_path_applies(layer, x, terms) else None


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


# --- what execution keeps: per layer, and per routing ------------------------------------------------------------


@dataclass
class ExecutionCache:
    """What execution keeps on one layer, each entry checked against what it was made from before it is used:
    ``recent``, the plan used last per size regime (True: few rows on a CPU); ``by_state``, the plans of recent
    states; ``stacked``, stacked factors reused across routings of the same adapters. The layer empties it
    when its set of factors or their storage changes."""

    recent: dict[bool, Plan] = field(default_factory=dict)
    by_state: dict[tuple[bool, LayerState], Plan] = field(default_factory=dict)
    stacked: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def clear(self) -> None:
        self.recent.clear()
        self.by_state.clear()
        self.stacked.clear()


# masks and kernel blocks derived from a routing, shared by every layer whose terms have the same rows and ranks;
# they live as long as the routing does
_per_routing: weakref.WeakKeyDictionary[Routing, dict] = weakref.WeakKeyDictionary()


def _for_routing(routing: Routing, key, build):
    found = _per_routing.setdefault(routing, {})
    if key not in found:
        found[key] = build()
    return found[key]


def _trim(kept: dict) -> None:
    while len(kept) > KEPT_PLANS:
        kept.pop(next(iter(kept)))


# --- no autograd: prepared plans -----------------------------------------------------------------------------------


def _few_cpu_rows(x: torch.Tensor) -> bool:
    """Whether the update runs as for a few rows on a CPU (the factors' float32, the kernel): up to ``FEW_ROWS``,
    and rows of any number inside ``rows.batch_invariant()``, so that each row's update is the same bits whatever
    else its batch holds (as ``kernels.rows`` does for the base product there)."""
    return x.is_cpu and (x.numel() <= FEW_ROWS * x.shape[-1] or rows_kernel.invariant())


def plan_for(layer, x: torch.Tensor) -> Plan:
    """The layer's prepared plan for ``x``, rebuilt only when something it depends on changed. Decoding runs
    hundreds of these layers per token, where per-call Python work costs as much as the rank-r products, so
    the plan used last in this size regime is checked first (the same state object: one identity test)."""
    few = _few_cpu_rows(x)
    cache = layer.execution_cache
    plan = cache.recent.get(few)
    if plan is None or plan.state is not layer.state or not plan.fits(layer, x):
        plan = cache.recent[few] = _kept_plan(layer, x, few)
    return plan


def _kept_plan(layer, x: torch.Tensor, few: bool) -> Plan:
    """The plan for the layer's state (an equal state's, when one was prepared before), else a new one."""
    kept = layer.execution_cache.by_state
    key = (few, layer.state)
    plan = kept.pop(key, None)
    if plan is None or not plan.fits(layer, x):
        previous = layer.execution_cache.recent.get(few)
        plan = (previous is not None and previous.rerouted(layer, x)) or Plan.build(layer, x, few)
    kept[key] = plan  # most recent last
    _trim(kept)
    return plan


def _stamp(factors) -> int:
    # version counters only grow, so their sum changes when any one does (a move to another device or dtype
    # replaces the factors' storage: LoraLayer empties the cache then)
    return sum(map(_VERSION, factors))


@dataclass(frozen=True)
class DoraFold:
    """DoRA terms folded into a plan: the base product's per-row scaling ``1 + Σ t·(g − 1)`` (rows × 1 × out) and
    ``(scaling − 1)·bias`` to take back out of it (None without a bias)."""

    base_scale: torch.Tensor
    bias_shift: torch.Tensor | None


class Plan:
    """``base(x) + (x·Aᵀ ⊙ mask)·sBt`` with the terms' factors cast, stacked and scaled once (A: Σr × in,
    sBt: Σr × out, mask: rows × 1 × Σr or None). ``usable`` is False when the reference must run (dropout in
    training, an input dtype the base does not compute in). ``kernel`` holds the fixed arguments of the compiled
    CPU kernel when it takes the update; ``kernel_fits``: it could, routing aside; ``whole``: those of the kernel
    that computes the base product and the update in one call (``kernels.rows``), where it applies.
    ``invariant``: built inside ``rows.batch_invariant()``, where the kernel takes every routing (rows of their
    own in A and sBt for weighted or scattered ones) and any number of rows."""

    __slots__ = (
        "A",
        "base",
        "blocks",
        "dora",
        "dtype",
        "factors",
        "invariant",
        "kernel",
        "kernel_fits",
        "mask",
        "names",
        "ranks",
        "sBt",
        "stamp",
        "state",
        "training",
        "usable",
        "whole",
    )

    def fits(self, layer, x: torch.Tensor) -> bool:
        """Whether this plan still computes the layer's output for ``x`` (its state aside)."""
        return (
            self.training is layer.training
            and self.dtype is x.dtype
            and self.stamp == _stamp(self.factors)
            and self.invariant == rows_kernel.invariant()
        )

    def __init__(self, layer, x: torch.Tensor, terms):
        self.state, self.training, self.dtype = layer.state, layer.training, x.dtype
        self.base = layer.base_product()
        self.factors = tuple(t for term in terms for t in (term.A, term.B, term.magnitude) if t is not None)
        self.stamp = _stamp(self.factors)
        self.usable = fast_path_applies(layer, x, terms)
        self.A = self.sBt = self.mask = self.kernel = self.blocks = self.dora = self.whole = None
        self.names = layer.routed_names() if layer.state.routing is not None else None  # terms' adapters, in order
        self.ranks = tuple(t.A.shape[0] for t in terms)
        self.kernel_fits = False
        self.invariant = rows_kernel.invariant()

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
            layout = (tuple((id(t.rows), id(t.row_weights), t.A.shape[0]) for t in terms), dtype, str(plan.A.device))
            plan.mask, plan.blocks = _for_routing(routing, layout, lambda: _mask_and_blocks(terms, routing, dtype))
        plan.kernel_fits = few and lowrank_kernel.kernel_fits(x.dtype, plan.A, plan.sBt)
        if plan.invariant and plan.kernel_fits and plan.mask is not None and plan.blocks is None:
            plan.A, plan.sBt, plan.blocks = _blocks_of_their_own(plan.A, plan.sBt, plan.mask)
        plan.kernel = plan._kernel_args(routing)
        plan.whole = plan._whole_args(layer)
        return plan

    def _whole_args(self, layer):
        """``rows.raw_lora``'s fixed arguments where the kernel computes the layer's whole output (a plain Linear
        base in the input's dtype, no DoRA scaling), with the layer itself: its weight and bias are read at each
        call (FSDP, for one, puts other tensors there for each forward)."""
        weights = layer.plain_weights() if self.kernel is not None and self.dora is None else None
        if weights is None or not rows_kernel.weights_fit(*weights, self.dtype):
            return None
        _, A, sBt, in_features, rank, out_features, is_bf16, blocks = self.kernel
        return rows_kernel.raw_lora(), layer, in_features, out_features, is_bf16, A, sBt, rank, blocks

    def _kernel_args(self, routing: Routing | None):
        """The kernel's fixed arguments for this plan's mask, or None where the kernel cannot take it: it reads
        0/1 masks only, as one block of columns per row (rows that mix adapters at weights run the products)."""
        if not self.kernel_fits or (routing is not None and routing.weighted and not self.invariant):
            return None
        if self.mask is not None and self.blocks is None:
            return None
        return (
            lowrank_kernel.raw_kernel(),
            self.A.data_ptr(),
            self.sBt.data_ptr(),
            self.A.shape[1],
            self.A.shape[0],
            self.sBt.shape[1],
            int(self.dtype == torch.bfloat16),
            0 if self.blocks is None else self.blocks.data_ptr(),
        )

    def rerouted(self, layer, x: torch.Tensor) -> Plan | None:
        """This plan for the layer's new routing when nothing else changed and the same adapters act (a
        server's batch gaining or losing rows): only the mask and kernel blocks differ. None otherwise."""
        old, new = self.state, layer.state
        if (
            self.A is None
            or self.dora is not None
            or self.invariant  # (its factors may hold blocks of the old routing's own: built anew)
            or layer.pissa
            or old.routing is None
            or new.routing is None
            or replace(old, routing=None) != replace(new, routing=None)
            or not self.fits(layer, x)
            or layer.routed_names() != self.names
        ):
            return None
        routing, dtype = new.routing, self.A.dtype
        rows_of = row_tensors(routing, self.A.device)
        layout = (
            tuple((id(rows_of[n][0]), id(rows_of[n][1]), r) for n, r in zip(self.names, self.ranks)),
            dtype,
            str(self.A.device),
        )
        plan = object.__new__(Plan)
        for slot in Plan.__slots__:
            setattr(plan, slot, getattr(self, slot))
        plan.state = new
        plan.mask, plan.blocks = _for_routing(routing, layout, lambda: _mask_and_blocks(layer.terms(), routing, dtype))
        plan.kernel = plan._kernel_args(routing)
        plan.whole = plan._whole_args(layer)
        return plan

    def _fold_dora(self, layer, terms, dtype: torch.dtype) -> list[Term]:
        """DoRA terms as plain ones with B scaled by their gain ``g``, and the base product's per-row scaling in
        ``dora`` (see ``DoraFold``)."""
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
        bias = layer.base_layer.bias
        self.dora = DoraFold(
            (1 + extra)[:, None, :].to(dtype), None if bias is None else (extra * bias.float())[:, None, :].to(dtype)
        )
        return folded

    def _scaled_base(self, x2: torch.Tensor) -> torch.Tensor:
        """The base product, scaled per row for DoRA terms (a no-op without them)."""
        out = self.base(x2)
        if self.dora is not None:
            view = out.view(self.dora.base_scale.shape[0], -1, out.shape[-1])
            view.mul_(self.dora.base_scale)
            if self.dora.bias_shift is not None:
                view.sub_(self.dora.bias_shift)
        return out

    def routing_rows(self, x: torch.Tensor) -> int:
        """The routing's rows (1 without one), checked against ``x``'s first dimension."""
        rows = 1 if self.mask is None else self.mask.shape[0]
        if self.mask is not None and x.shape[0] != rows:
            raise ConfigError(
                f"adapter_names has {rows} names but the batch has {x.shape[0]} rows; give exactly one name per row"
            )
        return rows

    def whole_call(self, x2: torch.Tensor, out: torch.Tensor, rows: int) -> tuple | None:
        """(the kernel, its arguments) that write the layer's whole output for ``x2`` (n × in, contiguous) into
        ``out`` (n × out, contiguous, the plan's dtype) in one call — the base product and the update — where that
        kernel takes it (a plain Linear base, few rows, inside ``kernels.rows.decoding``); None where it does not.
        ``rows``: the routing's rows (``x2``'s rows come in that many equal groups). The arguments hold the
        tensors' addresses: valid while this plan and the base weight are the layer's."""
        weights = self.whole[1].plain_weights() if self.whole is not None and rows_kernel.active() else None
        if weights is None or not rows_kernel.takes(x2.shape[0], self.dtype) or not rows_kernel.plain(weights[0]):
            return None
        lora_rows, _, in_features, out_features, is_bf16, A, sBt, rank, blocks = self.whole
        weight, bias = weights
        return lora_rows, (
            out.data_ptr(),
            x2.data_ptr(),
            weight.data_ptr(),
            0 if bias is None else bias.data_ptr(),
            x2.shape[0],
            in_features,
            out_features,
            is_bf16,
            A,
            sBt,
            rank,
            blocks,
            max(x2.shape[0] // rows, 1),
            torch.get_num_threads(),
        )

    def whole_into(self, x2: torch.Tensor, out: torch.Tensor, rows: int) -> bool:
        """``whole_call``'s kernel run: True when it wrote ``out``, False (nothing written) where it does not apply."""
        call = self.whole_call(x2, out, rows)
        if call is None:
            return False
        call[0](*call[1])
        return True

    def run_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The base product, then the update added by the compiled kernel (x contiguous, few rows); both in one
        call where the few-row product takes the base (``whole_into``)."""
        rows = self.routing_rows(x)
        x2 = x.reshape(-1, x.shape[-1])
        if self.whole is not None and rows_kernel.takes(x2.shape[0], self.dtype):
            out = torch.empty(x2.shape[0], self.whole[3], dtype=self.dtype)
            if self.whole_into(x2, out, rows):
                return out.view(*x.shape[:-1], out.shape[-1])
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
            torch.get_num_threads(),
        )
        return out.view(*x.shape[:-1], out_features)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The base product plus the update, as PyTorch products."""
        rows = self.routing_rows(x)
        x2 = x.reshape(-1, x.shape[-1])
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
    kept = layer.execution_cache.stacked
    found = kept.get(key)
    if found is None or found[0] != stamp:
        found = kept[key] = (stamp, *_stacked_for_plan(terms, dtype))
        _trim(kept)
    return found[1], found[2]


def _mask_and_blocks(terms, routing, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The plan's row mask (rows × 1 × Σr, or None when every term acts on every row) and the kernel's row
    blocks for it (None when the mask has weights, or a row's columns are not one run)."""
    mask = row_mask(terms, routing.n_rows, dtype, terms[0].A.device)
    if mask is None:
        return None, None
    blocks = None if routing.weighted else lowrank_kernel.row_blocks(mask)
    return mask[:, None, :].contiguous(), blocks


def _blocks_of_their_own(
    A: torch.Tensor, sBt: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, sBt, kernel blocks) for a routing whose rows the kernel's blocks cannot give as they are (weights, or
    columns in several runs; ``mask``: rows × 1 × Σr): a row whose columns are one run at weight 1 reads them in
    place, and each other combination gets rows of its own appended, its weights folded into its rows of sBt. The
    kernel then takes every row, a row's arithmetic whatever rows are beside it (``rows.batch_invariant``)."""
    own_A, own_sBt, blocks, placed = [], [], [], {}
    end = A.shape[0]
    for row in mask[:, 0, :]:
        columns = row.nonzero().flatten()
        count = len(columns)
        if count == 0 or (bool((row[columns] == 1).all()) and int(columns[-1]) - int(columns[0]) + 1 == count):
            blocks.append((int(columns[0]) if count else 0, count))
            continue
        key = (tuple(columns.tolist()), tuple(row[columns].tolist()))
        if key not in placed:
            placed[key] = end
            own_A.append(A[columns])
            own_sBt.append(row[columns, None].to(sBt.dtype) * sBt[columns])
            end += count
        blocks.append((placed[key], count))
    if own_A:
        A, sBt = torch.cat([A, *own_A]).contiguous(), torch.cat([sBt, *own_sBt]).contiguous()
    return A, sBt, torch.tensor(blocks, dtype=torch.int64, device=A.device)


def _detached(term: Term) -> Term:
    return replace(term, A=term.A.detach(), B=term.B.detach())
