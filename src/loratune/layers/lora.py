"""LoRA modules: the math, nothing else.

A ``LoraLayer`` wraps a frozen base module (``base_layer``) and holds any number of named adapters.
For an input ``x`` it returns

    base(x) + Σ_active  s_i · B_i(A_i(dropout_i(x)))          s_i = alpha_i / r_i  (rsLoRA: alpha_i / √r_i)
                                                                    × strength_i

never forming ``B·A`` in the forward pass. Adapter parameters live in their own dtype (float32 by default);
the low-rank path runs in the activation dtype and the result has the base layer's output dtype.

Merging writes ``W0 + s·B·A`` (computed in float32) into the base weight; unmerging subtracts it again.
Which adapters exist, which are active and which module weights are shared is decided one level up
(``loratune.adapters``); this module only does what it is told.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loratune.errors import ConfigError
from loratune.layers import lowrank_cpu
from loratune.layers.fused_linear import lora_linear
from loratune.quant import Linear4bit

INIT_CHOICES = (True, False, "gaussian", "pissa")
UNINITIALISED = "uninitialised"  # for loading: factors left empty, the caller fills every one of them


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor ``s`` in ``h = W0·x + s·B·A·x``: ``alpha/r``, or ``alpha/√r`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class PissaStart:
    """The factors a PiSSA adapter started from; the base weight holds ``W0 − s·B0·A0``."""

    A0: torch.Tensor  # r × in, float32
    B0: torch.Tensor  # out × r, float32
    scaling: float


@dataclass(frozen=True, eq=False)  # compared by identity: a cache key for one batch's routing
class RowGroups:
    """Which adapter each row (dim 0) of a batch runs with. ``names``: the distinct names, in order of first
    appearance; ``row_group``: for each of the ``n_rows`` rows, the index of its name; ``groups``: the same as
    ``[(name, row indices), ...]``, indices ``None`` when one name has all rows. A name a layer lacks (e.g.
    ``"__base__"``) means no adapter there."""

    n_rows: int
    names: tuple[str, ...]
    row_group: torch.Tensor  # (n_rows,) int64
    groups: tuple[tuple[str, torch.Tensor | None], ...]

    def check_rows(self, rows: int) -> None:
        if rows != self.n_rows:
            raise ConfigError(
                f"adapter_names has {self.n_rows} names but the batch has {rows} rows; give exactly one name per row"
            )


class _StrengthTable(dict):
    """Adapter name -> strength, counting its changes in ``version`` (a cheap key for the inference plans)."""

    version = 0

    def _changed(self):
        self.version += 1

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._changed()
        return super().setdefault(key, default)

    def clear(self):
        super().clear()
        self._changed()

    def __ior__(self, other):
        self.update(other)
        return self


# Layer attributes the inference plans depend on: setting one bumps the layer's ``_epoch``. (``row_groups`` is
# part of the plans' key instead: mixed_batch sets it for every batch, usually to the same object.)
_PLAN_INPUTS = frozenset({"active", "base_only", "training", "strength"})
_UNSET = object()


class LoraLayer(nn.Module):
    """A frozen base module plus named low-rank adapters. Subclasses define the shapes and the merge layout.

    Export names (PEFT's) for the two factors are ``peft_suffixes``; ``lora_A``/``lora_B`` hold them here.
    """

    peft_suffixes: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    _epoch = 0  # bumped when adapters are added, removed, merged or unmerged, or a plan input is set

    def __setattr__(self, name, value):
        if name == "strength" and not isinstance(value, _StrengthTable):
            value = _StrengthTable(value)
        # model.eval() sets every module's flag on each generation call: only a real change invalidates plans
        changed = name in _PLAN_INPUTS and (name == "strength" or self.__dict__.get(name, _UNSET) != value)
        super().__setattr__(name, value)
        if changed:
            self._epoch += 1

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(), ...: the inference plans hold the old tensors, so they must be rebuilt
        self._epoch += 1
        return super()._apply(fn, recurse)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.strength: dict[str, float] = _StrengthTable()
        self.active: tuple[str, ...] = ()
        self.merged: dict[str, float] = {}  # adapter name -> effective scale that was merged
        self.pissa: dict[str, PissaStart] = {}
        self.base_only = False  # set by adapters.disabled_adapters(): run the original base
        self.row_groups: RowGroups | None = None  # set by adapters.mixed_batch(): one adapter per row
        # (weight,) when a shared base weight was replaced by a private copy for merging; a tuple so that
        # nn.Module does not register the original as a parameter of this layer.
        self._tied_original: tuple[nn.Parameter] | None = None
        self._stacked_cache: dict = {}  # dtype -> (key, A, B, group table) of the last mixed batch
        # LoraLinear's no-grad fast path: one plan for a few rows (decoding), one for more (a prompt)
        self._plans: list[_InferencePlan | None] = [None, None]

    # --- shapes and layout, per subclass ---------------------------------------------------------
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def _delta_to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` is ``B·A`` (out × in); return it laid out like ``base_layer.weight``."""
        return delta

    def _weight_as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight viewed as out × in (the inverse of ``_delta_to_weight_layout``)."""
        return weight

    def _low_rank(self, x: torch.Tensor, name: str, A: torch.Tensor, B: torch.Tensor, scale: float):
        """``scale · B(A(dropout(x)))`` in the dtype of ``x``; shape of the base output."""
        return self._low_rank_raw(self.lora_dropout[name](x), A, B, scale)

    def _init_factors(self, name: str, init) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # bound = 1/√in
            nn.init.zeros_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
            nn.init.zeros_(B)
        elif init is False:  # a non-zero start; for tests and experiments
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            raise ConfigError(f"init_lora_weights={init!r} is not one of {INIT_CHOICES}")

    # --- adapters ---------------------------------------------------------------------------------
    def add(
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
    ) -> None:
        """Create adapter ``name`` (r × in and out × r factors) and initialise it; it starts inactive."""
        self._epoch += 1
        if name in self.lora_A:
            raise ConfigError(f"adapter {name!r} already exists on this layer")
        if init == "pissa" and weight_is_shared:
            raise ConfigError(
                "PiSSA rewrites the base weight, which this module shares with another one (tied weights); "
                "use init_lora_weights=True for this module or exclude it"
            )
        device = self.base_weight.device
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        self.strength[name] = 1.0
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, r, dtype=dtype, device=device))
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        if init == "pissa":
            self._init_pissa(name)
        elif init != UNINITIALISED:
            self._init_factors(name, init)

    def remove(self, name: str) -> None:
        """Delete adapter ``name``. A PiSSA adapter gives its principal part back to the base weight."""
        self._epoch += 1
        if name in self.merged:
            raise ConfigError(f"adapter {name!r} is merged; unmerge it before deleting it")
        if name in self.pissa:
            self._add_to_weight(self._pissa_delta(self.pissa.pop(name)))
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.strength):
            del table[name]
        self.active = tuple(n for n in self.active if n != name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def effective_scale(self, name: str) -> float:
        """``s · strength`` for adapter ``name``."""
        return self.scaling[name] * self.strength[name]

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    # --- PiSSA ------------------------------------------------------------------------------------
    def _init_pissa(self, name: str) -> None:
        """A, B from the top-r singular triplets of W0 (split as √S on each side); W0 keeps the residual."""
        r, s = self.r[name], self.scaling[name]
        W = self._weight_as_out_in(self.base_weight.detach()).float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:r] / s)
        A0 = root[:, None] * Vh[:r]  # r × in
        B0 = U[:, :r] * root[None, :]  # out × r
        with torch.no_grad():
            self.lora_A[name].copy_(A0)
            self.lora_B[name].copy_(B0)
        self.pissa[name] = PissaStart(A0.clone(), B0.clone(), s)
        self._add_to_weight(-self._pissa_delta(self.pissa[name]))

    def _pissa_delta(self, start: PissaStart) -> torch.Tensor:
        """``s·B0·A0``, the principal part a PiSSA start took out of W0, laid out like the weight."""
        return self._delta_to_weight_layout(start.scaling * (start.B0 @ start.A0))

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_groups is not None and not self.base_only:
            return self._add_row_groups(x, result)
        if self.base_only:
            # The weight of a PiSSA layer holds W0 − s·B0·A0: add the principal part back to get W0.
            for start in self.pissa.values():
                result = result + self._low_rank_raw(x, start.A0, start.B0, start.scaling).to(result.dtype)
            return result
        for name in self.active:
            if name in self.merged:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            result = result + self._low_rank(x, name, A, B, self.effective_scale(name)).to(result.dtype)
        for name, start in self.pissa.items():
            if name not in self.active:  # an inactive PiSSA adapter leaves the original W0
                result = result + self._low_rank_raw(x, start.A0, start.B0, start.scaling).to(result.dtype)
        return result

    def _add_row_groups(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` plus, for every row (dim 0), the low-rank path of that row's adapter.

        All the adapters of the batch run as one stacked adapter: ``A`` of every adapter stacked (Σr × in),
        ``s·B`` side by side (out × Σr), and a 0/1 mask that keeps, for each row, its own adapter's block of
        the Σr columns. Two small matrix products for the whole batch, however many adapters it mixes.
        """
        groups = self.row_groups
        groups.check_rows(x.shape[0])
        names = self._mixed_batch_names(x)
        if names is None:
            return self._add_row_groups_one_by_one(x, result)
        if not names:
            return result
        dtype = self._low_rank_dtype(x)
        A, B, mask = self._stacked_factors(names, groups, dtype)
        h = self._down(x if x.dtype == dtype or not x.is_floating_point() else x.to(dtype), A)
        h = h * mask.view(mask.shape[0], *([1] * (h.dim() - 2)), mask.shape[1])
        return result + F.linear(h, B).to(result.dtype)

    def _mixed_batch_names(self, x: torch.Tensor) -> tuple[str, ...] | None:
        """The adapters of this layer a mixed batch uses, for the stacked path; None when it cannot take it
        (a PiSSA or merged adapter, or dropout in training: each adapter draws its own dropout mask)."""
        names = tuple(name for name, _ in self.row_groups.groups if name in self.lora_A)
        if self.pissa or self.merged or self.base_only:
            return None
        if self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in names):
            return None
        return names

    def _stacked_factors(self, names: tuple[str, ...], groups: RowGroups, dtype: torch.dtype):
        """(A stacked: Σr × in, s·B side by side: out × Σr, row mask: n_rows × Σr) in ``dtype``. The factors are
        cached (without autograd) while the adapters, their strengths and weights stay the same."""
        factors = [(self.lora_A[n], self.lora_B[n]) for n in names]
        scales = tuple(self.effective_scale(n) for n in names)
        key = (groups.names, names, dtype, scales,
               tuple((A._version, B._version, A.data_ptr(), B.data_ptr()) for A, B in factors))
        cached = self._stacked_cache.get(dtype)  # one per dtype: prefill and decoding may differ (see LoraLinear)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            A, B, table = cached[1:]
        else:
            A = torch.cat([A for A, _ in factors]).to(dtype)
            B = torch.cat([B * scale for scale, (_, B) in zip(scales, factors)], dim=1).to(dtype)
            # table[g] is the 0/1 row mask of group g: ones on its adapter's block of the Σr columns
            table = torch.zeros(len(groups.names), A.shape[0], dtype=dtype, device=A.device)
            offset = 0
            for name, (factor, _) in zip(names, factors):
                table[groups.names.index(name), offset : offset + factor.shape[0]] = 1
                offset += factor.shape[0]
            if not torch.is_grad_enabled():
                self._stacked_cache[dtype] = (key, A, B, table)
        return A, B, table.index_select(0, groups.row_group.to(table.device))

    def _add_row_groups_one_by_one(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        for name, rows in self.row_groups.groups:
            if name not in self.lora_A:
                continue
            A, B, scale = self.lora_A[name], self.lora_B[name], self.effective_scale(name)
            if rows is None:
                result = result + self._low_rank(x, name, A, B, scale).to(result.dtype)
            else:  # result is fresh from the base layer and its backward does not need it: add in place
                result.index_add_(0, rows, self._low_rank(x.index_select(0, rows), name, A, B, scale).to(result.dtype))
        return result

    def _low_rank_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the low-rank path computes in for input ``x``: x's own dtype."""
        return x.dtype

    def _down(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """``A·x``: x (…, in) → (…, r)."""
        return F.linear(x, A.to(x.device, x.dtype))

    def _low_rank_raw(self, x, A, B, scale):
        """``scale · B(A(x))`` without dropout (also for fixed factors, e.g. a PiSSA start)."""
        h = self._down(x, A) * scale
        return F.linear(h, B.to(h.device, h.dtype))

    # --- merge ------------------------------------------------------------------------------------
    def delta_weight(self, name: str, scale: float | None = None) -> torch.Tensor:
        """``scale · B·A`` in float32, laid out like the base weight (default scale: s · strength)."""
        scale = self.effective_scale(name) if scale is None else scale
        B, A = self.lora_B[name].detach().float(), self.lora_A[name].detach().float()
        return self._delta_to_weight_layout(scale * (B @ A))

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def merge_would_be_finite(self, name: str) -> bool:
        """Whether merging adapter ``name`` now would leave every base weight finite."""
        return bool(torch.isfinite(self.base_weight.detach().float() + self.delta_weight(name)).all())

    def merge(self, name: str, *, safe: bool = False, untie: bool = False) -> None:
        """Add ``s·strength·B·A`` of adapter ``name`` into the base weight (float32 math, cast back).

        ``untie``: the base weight is shared with another module, so give this layer a private copy first
        (the other module keeps the original, which ``unmerge`` restores exactly).
        """
        if name in self.merged:
            warnings.warn(f"adapter {name!r} is already merged; merging it again does nothing", stacklevel=3)
            return
        if safe and not self.merge_would_be_finite(name):
            raise ValueError(f"merging adapter {name!r} would write non-finite values; nothing was changed")
        self._epoch += 1
        scale = self.effective_scale(name)
        if untie and self._tied_original is None:
            original = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(original.detach().clone(), requires_grad=False)
            self._tied_original = (original,)
        self._add_to_weight(self.delta_weight(name, scale))
        self.merged[name] = scale

    def unmerge(self, name: str) -> None:
        """Subtract what ``merge`` added; restore a shared weight exactly once nothing is merged."""
        if name not in self.merged:
            warnings.warn(f"adapter {name!r} is not merged; nothing to unmerge", stacklevel=3)
            return
        self._epoch += 1
        scale = self.merged.pop(name)
        if not self.merged and self._tied_original is not None:
            self.base_layer.weight = self._tied_original[0]
            self._tied_original = None
            return
        self._add_to_weight(-self.delta_weight(name, scale))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names)
        return f"adapters=[{ranks}], active={list(self.active)}, merged={list(self.merged)}"


_FEW_ROWS = 64  # rows up to which the inference path keeps the low-rank products in float32 on a CPU


_VERSION = operator.attrgetter("_version")


def _few_cpu_rows(x: torch.Tensor) -> bool:
    return x.is_cpu and x.numel() <= _FEW_ROWS * x.shape[-1]


class _InferencePlan:
    """What a ``LoraLinear`` needs to run without autograd: ``x·Wᵀ + b + (x·Aᵀ)·(s·Bᵀ)`` with ``A`` and
    ``s·Bᵀ`` cast (and B transposed) once. For a mixed-adapter batch, A and B stack every adapter of the batch and
    ``mask`` (rows × 1 × Σr) keeps each row's own block. ``usable`` is False when the layer must take the general
    path (several active adapters, merged, dropout in training, ...); ``key`` says what it was built for.
    ``kernel`` holds the fixed arguments of the compiled CPU kernel (``lowrank_cpu``) when it takes the update.
    """

    __slots__ = ("key", "usable", "weight", "bias", "A", "sBt", "mask", "factors", "versions", "kernel", "blocks")

    def __init__(self, key, usable=False, weight=None, bias=None, A=None, sBt=None, mask=None, factors=(),
                 x_dtype=None):
        self.key, self.usable = key, usable
        self.weight, self.bias, self.A, self.sBt, self.mask = weight, bias, A, sBt, mask
        self.factors = factors
        self.versions = self._versions()
        self.kernel = self.blocks = None
        if A is not None and x_dtype is not None and lowrank_cpu.kernel_fits(x_dtype, A, sBt):
            # a mixed batch: each row's adapter is one run of the stacked rank rows (kept alive by the plan)
            self.blocks = None if mask is None else lowrank_cpu.row_blocks(mask[:, 0, :])
            self.kernel = (lowrank_cpu.raw_kernel(), A.data_ptr(), sBt.data_ptr(), A.shape[1], A.shape[0],
                           sBt.shape[1], int(x_dtype == torch.bfloat16),
                           0 if self.blocks is None else self.blocks.data_ptr())

    def _versions(self) -> int:
        # version counters only grow, so their sum changes when any one does; map + attrgetter runs in C (a
        # comprehension measured ~8 µs per layer while decoding, as much as the kernel)
        return sum(map(_VERSION, self.factors))

    def factors_changed(self) -> bool:
        """True when an A or B changed in place (training, loading) since the plan was built. (Moving a layer
        to another device or dtype bumps its ``_epoch`` instead; see ``LoraLayer._apply``.)"""
        return self.versions != self._versions()

    @classmethod
    def build(cls, layer: LoraLinear, key, x: torch.Tensor) -> _InferencePlan:
        base = layer.base_layer
        kernel_dtype = x.dtype if _few_cpu_rows(x) else None  # the kernel's float32 loops pay off for few rows
        if layer.row_groups is not None:
            names = layer._mixed_batch_names(x)
            if not names or type(base) is not nn.Linear or x.dtype != base.weight.dtype:
                return cls(key)
            A, sB, mask = layer._stacked_factors(names, layer.row_groups, layer._low_rank_dtype(x))
            factors = tuple(t for n in names for t in (layer.lora_A[n], layer.lora_B[n]))
            mask = mask[:, None, :].contiguous()  # rows × 1 × Σr: broadcasts over the positions of each row
            return cls(key, True, base.weight, base.bias, A.contiguous(), sB.T.contiguous(), mask, factors,
                       kernel_dtype)
        if layer._runs_as_base(x):
            return cls(key, True, base.weight, base.bias)
        name = layer._single_fusable_adapter(x)
        if name is None:
            return cls(key)
        A, B, scale = layer.lora_A[name], layer.lora_B[name], layer.effective_scale(name)
        dtype = layer._low_rank_dtype(x)
        sBt = (B.detach().float().T * scale).to(dtype).contiguous()
        A_low = A.detach().to(dtype).contiguous()
        return cls(key, True, base.weight, base.bias, A_low, sBt, None, (A, B), kernel_dtype)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.A is None:  # nothing to add: no adapter active, or all merged into the weight
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        rows = 1 if self.mask is None else self.mask.shape[0]
        if self.mask is not None and x.shape[0] != rows:
            raise ConfigError(f"adapter_names has {rows} names but the batch has {x.shape[0]} rows; "
                              "give exactly one name per row")
        if self.kernel is not None and x2.is_contiguous():
            out = F.linear(x2, self.weight, self.bias).contiguous()  # (it is; the kernel writes raw rows)
            add_low_rank, A_address, sBt_address, in_features, rank, out_features, is_bf16, blocks = self.kernel
            add_low_rank(out.data_ptr(), x2.data_ptr(), A_address, sBt_address, x2.shape[0], in_features, rank,
                         out_features, is_bf16, blocks, max(x2.shape[0] // rows, 1))
            return out.view(*x.shape[:-1], out_features)
        A, sBt = self.A, self.sBt
        # F.linear(x, A) with A as r × in: on a CPU, for a few rows, several times cheaper than x @ Aᵀ stored
        # transposed, which the BLAS splits across threads.
        h = F.linear(x2 if A.dtype == x2.dtype else x2.to(A.dtype), A)
        if self.mask is not None:  # mixed batch: zero the other adapters' columns of each row (dim 0 of x)
            h.view(rows, -1, h.shape[1]).mul_(self.mask)
        if A.dtype == x2.dtype:
            out = F.linear(x2, self.weight, self.bias)
            out.addmm_(h, sBt)
        else:
            # Float32 factors for a few bf16/fp16 rows on a CPU: faster there. The rank-r products run before
            # the base product: right after a multi-threaded matmul, small operations measured slower.
            delta = torch.mm(h, sBt)
            out = F.linear(x2, self.weight, self.bias)
            out.add_(delta)
        return out.view(*x.shape[:-1], out.shape[-1])


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` (weight out × in), and any ``nn.Linear`` subclass.

    The common training case (a plain Linear, one active adapter, no dropout) runs as one lean autograd
    function (``fused_linear``); without autograd, a cached ``_InferencePlan`` runs one adapter, a
    mixed-adapter batch or the bare (merged) base; everything else takes the general path.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():
            plan = self._inference_plan(x)
            if plan.usable:
                return plan.run(x)
        name = self._single_fusable_adapter(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return lora_linear(x, base.weight, base.bias, self.lora_A[name], self.lora_B[name], self.effective_scale(name))

    def _inference_plan(self, x: torch.Tensor) -> _InferencePlan:
        """The no-grad plan for input ``x``, rebuilt only when something it depends on changed: decoding runs
        hundreds of these layers per token, where per-call Python checks cost as much as the rank-r products."""
        few_rows = _few_cpu_rows(x)
        # _epoch counts changes of the layer's state (active adapters, mode, merges, moves), strength.version
        # changes of the strengths
        key = (self._epoch, self.strength.version, self.row_groups, x.dtype, x.is_cpu)
        plan = self._plans[few_rows]  # generation alternates a prompt and its decoding steps: keep both plans
        if plan is None or plan.key != key or plan.factors_changed():
            plan = self._plans[few_rows] = _InferencePlan.build(self, key, x)
        return plan

    def _low_rank_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Decoding multiplies a few rows: there the rank-r products run several times faster in the
        # adapter's float32 than in bf16 on a CPU; larger inputs (and training) use x's dtype.
        if _few_cpu_rows(x) and not torch.is_grad_enabled() and self.lora_A:
            return next(iter(self.lora_A.values())).dtype
        return x.dtype

    def _runs_as_base(self, x: torch.Tensor) -> bool:
        """True when the output is just the (possibly merged) base Linear's: no unmerged adapter acts."""
        return (
            type(self.base_layer) is nn.Linear
            and not self.pissa
            and self.row_groups is None
            and (self.base_only or all(name in self.merged for name in self.active))
            and x.dtype == self.base_layer.weight.dtype
        )

    def _single_fusable_adapter(self, x: torch.Tensor) -> str | None:
        if (
            type(self.base_layer) is not nn.Linear
            or self.base_only
            or self.pissa
            or self.row_groups is not None
            or len(self.active) != 1
        ):
            return None
        name = self.active[0]
        dropout = self.lora_dropout[name]
        if name in self.merged or (self.training and not isinstance(dropout, nn.Identity)):
            return None
        return name if x.dtype == self.base_layer.weight.dtype else None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class LoraConv1D(LoraLayer):
    """LoRA around transformers' GPT-2 ``Conv1D`` (weight in × out, i.e. transposed). Same A/B as Linear."""

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1]

    def _delta_to_weight_layout(self, delta):
        return delta.T

    def _weight_as_out_in(self, weight):
        return weight.T


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: A is r × num_embeddings (a lookup table), B is embedding_dim × r.

    Follows loralib/PEFT: A starts at zero and B normal; no dropout on token ids.
    """

    peft_suffixes = ("lora_embedding_A", "lora_embedding_B")

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def _delta_to_weight_layout(self, delta):
        return delta.T  # num_embeddings × embedding_dim

    def _weight_as_out_in(self, weight):
        return weight.T

    def _init_factors(self, name, init):
        A, B = self.lora_A[name], self.lora_B[name]
        if init in (True, "gaussian"):
            nn.init.zeros_(A)
            nn.init.normal_(B)
        elif init is False:
            nn.init.normal_(A)
            nn.init.normal_(B)
        else:
            raise ConfigError(f"init_lora_weights={init!r} is not supported for embeddings; use True or 'gaussian'")

    def _init_pissa(self, name):
        raise ConfigError("PiSSA initialisation is not supported for embeddings; use init_lora_weights=True")

    def _lookup(self, ids: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def _low_rank(self, ids, name, A, B, scale):
        return self._low_rank_raw(ids, A, B, scale)

    def _low_rank_dtype(self, ids):
        return next(iter(self.lora_A.values())).dtype  # token ids carry no float dtype: the adapter's

    def _down(self, ids, A):
        return self._lookup(ids, A.to(ids.device))


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style, transposed weight), without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or None when LoRA does not support its type."""
    if isinstance(module, Linear4bit):
        from loratune.layers.lora_4bit import LoraLinear4bit  # it subclasses LoraLinear, defined above

        return LoraLinear4bit
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if is_conv1d(module):
        return LoraConv1D
    return None
