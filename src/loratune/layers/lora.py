"""The LoRA layer: a frozen base module, named low-rank adapters, and the math that defines them.

For an input ``x`` a layer returns

    base(x) + Σ_terms  scale · B(A(dropout(x)))        scale = alpha/r (rsLoRA: alpha/√r) × strength

where the terms are what its ``LayerState`` makes act: the active, unmerged adapters (in a mixed-adapter
batch, each on its own rows), and, for a PiSSA adapter that does not act, the principal part it took out of
W0. A DoRA adapter (one with a magnitude vector) adds ``t·((g − 1) ⊙ W0·x + g ⊙ s·B·A·x)`` instead (see
``layers.dora``). ``B·A`` is never formed in the forward pass. Factors keep their own dtype (float32 by default); the
low-rank path runs in the activation dtype and the result has the base output's dtype.

``reference_forward`` is that definition, written plainly. ``forward`` hands the call to
``layers.execution``, which computes the same result faster where it can. Merging adds ``scale·B·A`` (in
float32) into the base weight and records it in the state; unmerging subtracts it again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from loratune.errors import ConfigError
from loratune.layers import dora, execution
from loratune.layers.init import UNINITIALISED, PissaStart, check_init, init_factors, is_residual_start, residual_start
from loratune.layers.state import LayerState, Routing, Term, row_tensors


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor ``s`` in ``h = W0·x + s·B·A·x``: ``alpha/r``, or ``alpha/√r`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter's rank, alpha and the scaling they give (before strength); ``config``: what it was created
    from (kept for the adapters package, not read here); ``order``: when it was created, among adapters."""

    r: int
    lora_alpha: float
    scaling: float
    config: object = None
    order: int = 0


class LoraLayer(nn.Module):
    """A frozen base module plus named low-rank adapters. Subclasses say how A and B apply to their base."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters' m (PEFT's name)
        self.specs: dict[str, AdapterSpec] = {}
        self.pissa: dict[str, PissaStart] = {}
        self._state = LayerState()
        # (weight,) when merging into a weight shared with another module gave this layer a private copy; a tuple
        # so that nn.Module does not register the original as a parameter of this layer.
        self._shared_weight: tuple[nn.Parameter] | None = None
        self.execution_cache = execution.ExecutionCache()  # prepared factors, checked against the state
        self._base_norms: tuple | None = None  # (weight identity and version, ‖W0‖² per row) for DoRA
        self._dora_merged_gains: dict[str, torch.Tensor] = {}  # the gain each merged DoRA adapter used
        self.fast_paths = False  # whether layers.execution may compute this layer's output its own way

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(): the factors get new storage, so prepared copies of them are stale
        self.execution_cache.clear()
        self._base_norms = None
        return super()._apply(fn, recurse)

    # --- per kind: shapes, layout, the two products ------------------------------------------------------
    in_features: int
    out_features: int
    embedding = False

    def weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (out × in) laid out like the base weight."""
        return delta

    def matrix_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as out × in (for the transposed kinds ``weight_layout`` is its own inverse)."""
        return self.weight_layout(weight)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for rank ``r`` (PEFT's: r × in and out × r)."""
        return (r, self.in_features), (self.out_features, r)

    def down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``A·x``: (…, in) → (…, r), in x's dtype."""
        return F.linear(x, A.to(x.device, x.dtype))

    def up(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``B·h``: (…, r) → (…, out), in h's dtype."""
        return F.linear(h, B.to(h.device, h.dtype))

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight as out × in, in ``dtype`` (default: the weight's own)."""
        weight = self.matrix_layout(self.base_weight)
        return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``W0·x``: the base output without its bias (for DoRA's ``(g − 1) ⊙ W0·x``)."""
        return self.base_layer(x)

    def base_trains(self) -> bool:
        """Whether the base weight is trained too (a full fine-tune's module): the fused paths give it no gradient."""
        return self.base_weight.requires_grad

    # --- adapters --------------------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init=True,
        dtype: torch.dtype = torch.float32,
        weight_is_shared: bool = False,
        config: object = None,
        order: int = 0,
        use_dora: bool = False,
    ) -> None:
        """Create adapter ``name`` (r × in and out × r factors) and initialise it (see ``layers.init``); it
        starts inactive. ``use_dora`` adds DoRA's magnitude vector, starting at the row norms of
        ``W0 + s·B·A``. ``config`` and ``order`` are recorded in its ``AdapterSpec``. Raises ``ConfigError`` for
        a duplicate name or an initialisation this layer cannot take."""
        check_init(init)
        if name in self.lora_A:
            raise ConfigError(f"adapter {name!r} already exists on this layer")
        if use_dora and is_residual_start(init):
            raise ConfigError(
                f"DoRA with init_lora_weights={init!r} is not supported; use the default init with use_dora"
            )
        if use_dora:
            self._check_dora()
        state = self._state
        named = name in state.active or (state.routing is not None and name in dict(state.routing.groups))
        if named or is_residual_start(init):
            # the terms of some state change: a named adapter appears, or a residual start changes W0 and adds a
            # restoring term to every state that does not name it (plans of other states stay valid: a server
            # loading an adapter keeps every running batch's plans)
            self.execution_cache.clear()
        if is_residual_start(init):
            self._check_pissa(weight_is_shared)
        device = self.base_weight.device
        self.specs[name] = AdapterSpec(r, lora_alpha, lora_scaling(r, lora_alpha, use_rslora), config, order)
        a_shape, b_shape = self.factor_shapes(r)
        self.lora_A[name] = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 and not self.embedding else nn.Identity()
        if is_residual_start(init):
            start = residual_start(init, self.weight_layout(self.base_weight.detach()), r, self.specs[name].scaling)
            with torch.no_grad():
                self.lora_A[name].copy_(start.A0)
                self.lora_B[name].copy_(start.B0)
            self.pissa[name] = start
            self._add_to_weight(-start.delta())
        elif init != UNINITIALISED:
            init_factors(self.lora_A[name], self.lora_B[name], init, embedding=self.embedding, rank=r)
        if use_dora:
            magnitude = dora.row_norms(
                self.dense_weight(), self.lora_A[name], self.lora_B[name], self.specs[name].scaling
            )
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude.to(dtype))

    def _check_dora(self) -> None:
        """Raise ``ConfigError`` where this kind of layer has no DoRA."""

    def _check_pissa(self, weight_is_shared: bool) -> None:
        if weight_is_shared:
            raise ConfigError(
                "PiSSA and OLoRA starts rewrite the base weight, which this module shares with another one "
                "(tied weights); "
                "use init_lora_weights=True for this module or exclude it"
            )

    def remove_adapter(self, name: str) -> None:
        """Delete adapter ``name``. An adapter from a residual start (PiSSA, OLoRA) gives what it took back to the base
        weight."""
        if self._state.merged_scale(name) is not None:
            raise ConfigError(f"adapter {name!r} is merged; unmerge it before deleting it")
        self.execution_cache.clear()
        if name in self.pissa:
            self._add_to_weight(self.pissa.pop(name).delta())
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in table:
                del table[name]
        del self.specs[name]
        self._state = self._state.without(name)

    def effective_scale(self, name: str) -> float:
        """``s · strength`` for adapter ``name``."""
        return self.specs[name].scaling * self._state.strength(name)

    def is_dora(self, name: str) -> bool:
        """Whether adapter ``name`` is a DoRA adapter (has a magnitude vector)."""
        return name in self.lora_magnitude_vector

    # --- state: replaced only here -------------------------------------------------------------------------
    @property
    def state(self) -> LayerState:
        """What this layer does now (immutable; see ``layers.state``)."""
        return self._state

    def set_active(self, names: tuple[str, ...]) -> None:
        self._state = replace(self._state, active=tuple(names))

    def set_strength(self, name: str, value: float) -> None:
        self._state = self._state.with_strength(name, value)

    def set_base_only(self, base_only: bool) -> None:
        self._state = replace(self._state, base_only=base_only)

    def set_routing(self, routing: Routing | None) -> None:
        self._state = replace(self._state, routing=routing)

    # --- the definition ---------------------------------------------------------------------------------------
    def terms(self) -> list[Term]:
        """The low-rank summands the state makes act, with their scales and rows."""
        state = self._state
        if state.base_only:
            return [self._restoring(start) for start in self.pissa.values()]
        if state.routing is not None:
            rows_of = row_tensors(state.routing, self.base_weight.device)
            terms = [self._term(name, *rows_of[name]) for name in self.routed_names()]
            named = {name for name, _ in state.routing.groups}
        else:
            terms = [self._term(name) for name in state.active if self._acts(name)]
            named = set(state.active)
        # A PiSSA adapter that is not named leaves the original W0: add back what its start took out.
        terms += [self._restoring(start) for name, start in self.pissa.items() if name not in named]
        return terms

    def routed_names(self) -> tuple[str, ...]:
        """The adapters of this layer a mixed batch's routing makes act, in the order of ``terms()``."""
        return tuple(name for name, _ in self._state.routing.groups if self._acts(name))

    def _acts(self, name: str) -> bool:
        return name in self.lora_A and self._state.merged_scale(name) is None

    def _term(self, name: str, rows=None, row_weights=None) -> Term:
        term = Term(
            self.lora_A[name], self.lora_B[name], self.effective_scale(name), self.lora_dropout[name], rows, row_weights
        )
        if name not in self.lora_magnitude_vector:
            return term
        if self._state.merged:
            raise ConfigError(
                f"DoRA adapter {name!r} cannot run beside adapters merged into the same weight "
                f"{list(self._state.merged_names)}; unmerge them first"
            )
        return replace(term, magnitude=self.lora_magnitude_vector[name], scaling=self.specs[name].scaling)

    def base_row_norms_squared(self) -> torch.Tensor:
        """``‖W0‖²`` of each output row (float32), computed once per base weight (DoRA's norms build on it)."""
        weight = self.base_weight
        key = (id(weight), weight._version)
        if self._base_norms is None or self._base_norms[0] != key:
            self._base_norms = (key, dora.squared_row_norms(self.dense_weight()))
        return self._base_norms[1]

    def dora_gain(self, term: Term, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``g = m / ‖W0 + s·B·A‖_c`` of a DoRA term (float32; the norm carries no gradient, m does).
        ``weight``: W0 as out × in when the caller already has it (a dequantized 4-bit weight, say)."""
        weight = self.dense_weight() if weight is None else weight
        norms = dora.row_norms(weight, term.A, term.B, term.scaling, self.base_row_norms_squared())
        return term.magnitude.to(norms.dtype) / norms.to(term.magnitude.device)

    def _restoring(self, start: PissaStart) -> Term:
        return Term(start.A0, start.B0, start.scaling, nn.Identity())

    def reference_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + Σ scale·B(A(dropout(x)))`` over ``terms()``: what every execution path must compute."""
        if self._state.routing is not None:
            self._state.routing.check_rows(x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        for term in self.terms():
            rows = term.dropout(x if term.rows is None else x.index_select(0, term.rows))
            low_rank = self.up(self.down(rows, term.A), term.B)
            if term.magnitude is None:
                delta = (term.scale * low_rank).to(result.dtype)
            else:
                gain = self.dora_gain(term).to(low_rank.dtype)
                delta = term.strength * ((gain - 1) * self.base_without_bias(rows) + gain * term.scaling * low_rank)
                delta = delta.to(result.dtype)
            if term.row_weights is not None:
                delta = delta * term.row_weights.view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            result = result + delta if term.rows is None else result.index_add(0, term.rows, delta)
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return execution.run(self, x, *args, **kwargs)

    # --- merge ------------------------------------------------------------------------------------------------
    def _delta(self, name: str, scale: float) -> torch.Tensor:
        """The change adapter ``name`` makes to W0 at ``scale`` (= s·strength), out × in, float32."""
        if self.is_dora(name):
            return self._dora_change(name, scale)[0]
        B, A = self.lora_B[name].detach().float(), self.lora_A[name].detach().float()
        return scale * (B.flatten(1) @ A.flatten(1))  # flatten: a convolution's factors as matrices

    def _dora_change(self, name: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(``t·(W' − W0)``, out × in, float32; the gain ``g`` it used) for DoRA adapter ``name`` at ``scale``."""
        s = self.specs[name].scaling
        weight = self.dense_weight(torch.float32)
        gain = self.dora_gain(self._term(name), weight).detach()
        change = dora.weight_change(weight, self.lora_A[name].detach(), self.lora_B[name].detach(), s, gain, scale / s)
        return change, gain

    def delta_weight(self, name: str, scale: float | None = None) -> torch.Tensor:
        """What adapter ``name`` adds to the base weight, in float32, laid out like it (default scale:
        s · strength): ``scale·B·A``, or for DoRA ``t·(W' − W0)`` (see ``layers.dora``)."""
        return self.weight_layout(self._delta(name, self.effective_scale(name) if scale is None else scale))

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (out × in, float32) into the base weight, computing in float32."""
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_((weight.float() + self.weight_layout(delta).to(weight.device)).to(weight.dtype))

    def check_merge(self, name: str, *, safe: bool = False) -> None:
        """Raise unless adapter ``name`` can be merged now (``safe``: also when a weight would become
        non-finite: ``ValueError``). A DoRA adapter merges only into the original weight (nothing merged yet)."""
        if self.is_dora(name) and self._state.merged:
            raise ConfigError(
                f"DoRA adapter {name!r} merges into the original weight, but "
                f"{list(self._state.merged_names)} are merged already; merge the DoRA adapter first"
            )
        if safe and not torch.isfinite(self.base_weight.detach().float() + self.delta_weight(name)).all():
            raise ValueError(f"merging adapter {name!r} would write non-finite values; nothing was changed")

    def merge(self, name: str, *, safe: bool = False, untie: bool = False) -> None:
        """Add ``s·strength·B·A`` of adapter ``name`` into the base weight (float32 math, cast back).

        ``untie``: the base weight is shared with another module, so give this layer a private copy first
        (the other module keeps the original, which ``unmerge`` restores exactly).
        """
        if self._state.merged_scale(name) is not None:
            warnings.warn(f"adapter {name!r} is already merged; merging it again does nothing", stacklevel=3)
            return
        self.check_merge(name, safe=safe)
        scale = self.effective_scale(name)
        if untie and self._shared_weight is None:
            original = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
            self._shared_weight = (original,)
        if self.is_dora(name):  # unmerging needs the gain the merge used
            change, self._dora_merged_gains[name] = self._dora_change(name, scale)
        else:
            change = self._delta(name, scale)
        self._add_to_weight(change)
        self._state = self._state.with_merged(name, scale)

    def unmerge(self, name: str) -> None:
        """Subtract what ``merge`` added; restore a shared weight exactly once nothing is merged."""
        scale = self._state.merged_scale(name)
        if scale is None:
            warnings.warn(f"adapter {name!r} is not merged; nothing to unmerge", stacklevel=3)
            return
        others = [n for n in self._state.merged_names if n != name]
        if self.is_dora(name) and others:
            raise ConfigError(f"DoRA adapter {name!r} was merged first; unmerge {others} before it")
        self._state = self._state.with_merged(name, None)
        gain = self._dora_merged_gains.pop(name, None)
        if not self._state.merged and self._shared_weight is not None:
            self.base_layer.weight = self._shared_weight[0]
            self._shared_weight = None
            return
        if gain is None:
            self._add_to_weight(-self._delta(name, scale))
            return
        s = self.specs[name].scaling
        original = dora.undo_change(
            self.dense_weight(torch.float32), self.lora_A[name].detach(), self.lora_B[name].detach(), s, gain, scale / s
        )
        with torch.no_grad():
            self.base_weight.copy_(self.weight_layout(original).to(self.base_weight.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.specs[n].r}" for n in self.adapter_names)
        state = self._state
        return f"adapters=[{ranks}], active={list(state.active)}, merged={list(state.merged_names)}"
