"""LoRA on fused expert weights: the fast way to run a mixture-of-experts block whose experts are adapted.

transformers' mixture-of-experts models (Qwen3-MoE, Mixtral, gpt-oss, DeepSeek-V3, OLMoE, Granite-MoE, … every
experts class decorated with ``@use_experts_implementation``) keep all experts' weights of a projection in one
3-D parameter: ``gate_up_proj`` (E × 2I × H, or E × H × 2I when the module ``is_transposed``, as gpt-oss's) and
``down_proj``. The module is called with the flattened tokens and, per token, the top-k experts and their
routing weights.

For the copies of tokens routed to expert e (x: n_e × in), an adapted projection computes

    x·W_eᵀ (+ b_e)  +  Σ_terms  scale · (x·A_eᵀ)·B_eᵀ

``grouped_forward`` runs the whole block that way: the (token, expert) pairs sorted by expert, one grouped
product per projection for the base and two of rank r per adapter term, so the update of expert e touches only
the tokens routed to it, ΔW_e is never formed and no product runs over all experts. ``grouped_mm`` is that
product (PyTorch's where it runs, else one matmul per expert); where groups are padded (``group_granule``) the
rank-r ones are a single batched product over chunks of rows (``Routed.low_rank``).

The trainer recomputes in backward by default: ``recompute_expert_layers`` makes each decoder layer holding
experts keep only its input and run again there; where a layer cannot be checkpointed, under
``recompute_in_backward`` an expert block that runs with gradients keeps only its input and routing. Either way
the routed copies of every token and the experts' intermediate activations, most of an MoE's activation
memory, are never held across the model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loratune.errors import ConfigError
from loratune.quant.experts4bit import Dequantized4bitGroupedMatmul, Experts4bit, is_experts_4bit
from loratune.quant.spec import QuantSpec

# what transformers' @use_experts_implementation sets on an experts module (and the forward it dispatches)
_EXPERT_FLAGS = ("has_gate", "has_bias", "is_transposed", "num_experts")


def is_expert_stack(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` holds one projection of every expert: a 3-D float stack, or one in 4 bits."""
    return is_experts_4bit(parameter) or (parameter.dim() == 3 and parameter.is_floating_point())


def stack_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The shape of ``parameter`` in the model (E × d1 × d2 for a 4-bit stack, not its packed codes')."""
    return parameter.expert_shape if is_experts_4bit(parameter) else tuple(parameter.shape)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module holding every expert in 3-D parameters."""
    if not all(hasattr(module, flag) for flag in _EXPERT_FLAGS):
        return False
    return any(is_expert_stack(p) for p in module.parameters(recurse=False))


def projection_names(module: nn.Module) -> tuple[str, str]:
    """(input projection, output projection) parameter names of a fused experts module."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def expert_weight_names(module: nn.Module) -> list[str]:
    """The expert weight stacks of a fused experts module (its 3-D float parameters or 4-bit stacks, not biases
    or norms), in the module's parameter order: what ``all-linear`` adapts."""
    return [n for n, p in module.named_parameters(recurse=False) if is_expert_stack(p)]


def grouped_path_covers(module: nn.Module, adapted: set[str]) -> bool:
    """Whether ``grouped_forward`` can run ``module`` with LoRA on the parameters ``adapted``."""
    if not is_fused_experts(module) or getattr(module, "_is_expert_parallel", False):
        return False
    names = projection_names(module)
    return adapted <= set(names) and all(isinstance(getattr(module, n, None), torch.Tensor) for n in names)


# --- the grouped product -----------------------------------------------------------------------------------


@functools.cache
def _native_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether PyTorch's grouped_mm runs on this device and dtype (tried once on a tiny problem)."""
    grouped = getattr(F, "grouped_mm", None)
    if grouped is None or device_type not in ("cpu", "cuda"):
        return False
    if device_type == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability() < (8, 0)):
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        out = grouped(a, b, offs=torch.tensor([1, 4], dtype=torch.int32, device=device_type))
        return bool(out[0, 0] == 8)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``x[rows of group e] @ weight[e]`` for every group, stacked: x (S × in) sorted by group, weight (E × in ×
    out), ``offsets`` the int32 end row of each group, ``counts`` the same as sizes."""
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[-1])
    dims_fit = x.device.type != "cuda" or (weight.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)
    if dims_fit and _native_grouped_mm(x.device.type, x.dtype):
        return F.grouped_mm(x, weight, offs=offsets)
    parts = [x_e @ weight[e] for e, x_e in enumerate(x.split(counts)) if counts[e]]
    return torch.cat(parts)


# --- the block ----------------------------------------------------------------------------------------------


@functools.cache
def _call_parameters(forward) -> tuple[str, ...]:
    return tuple(inspect.signature(forward).parameters)


def routing_arguments(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states (N × H), top-k expert indices (N × k), their weights (N × k)) from a call of an experts
    module, whatever its forward names them (``top_k_index``, ``router_indices``, …)."""
    names = _call_parameters(type(module).forward)[1:]  # after self
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) != 3:
        raise ConfigError(
            f"{type(module).__name__} was called with arguments {names}; LoRA on its experts expects "
            "(hidden_states, top-k indices, top-k weights)"
        )
    return values[0], values[1], values[2]


def group_granule(copies: int, num_experts: int, dtype: torch.dtype, device: torch.device) -> int:
    """The multiple each expert group's rows are padded to (1: none). Only for half-precision products on a CPU,
    which go through oneDNN: it builds and caches a kernel per distinct shape, and group sizes that change every
    step would build new ones every step (slow, and its cache grows past a gigabyte) where a few padded sizes are
    reused. A power of two near a quarter of the average group (at most 64), so padding adds about 1/8 more rows;
    none where groups are small (decoding's few tokens)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return 1
    quarter = copies // max(num_experts, 1) // 4
    return 1 if quarter < 8 else min(64, 1 << (quarter.bit_length() - 1))


class Routed:
    """The (token, expert) pairs of one call, sorted by expert: which token each copy is (``tokens``), its
    routing weight, the group sizes (``counts``, ``offsets``) and the order that puts them back.

    With ``granule`` > 1 each group is padded to a multiple of it with copies of token 0 whose routing weight is
    0: they add nothing to any output or gradient."""

    def __init__(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, granule: int = 1):
        n, k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        self.experts, self.order = torch.sort(experts, stable=True)
        self.tokens = self.order // k
        self.weights = top_k_weights.reshape(-1)[self.order]
        counts = torch.bincount(self.experts, minlength=num_experts)
        if granule > 1:
            padded = (counts + granule - 1) // granule * granule
            shift = torch.cumsum(padded - counts, 0) - (padded - counts)  # padding before each group
            at = torch.arange(experts.numel(), device=experts.device) + shift[self.experts]
            total = int(padded.sum())
            self.tokens = self.tokens.new_zeros(total).index_copy_(0, at, self.tokens)
            self.weights = self.weights.new_zeros(total).index_copy_(0, at, self.weights)
            self.experts = torch.repeat_interleave(torch.arange(num_experts, device=experts.device), padded)
            counts = padded
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        self.counts = counts.tolist()
        self.n_tokens, self.k, self.granule = n, k, granule
        self.chunk_experts = self.experts[::granule] if granule > 1 else None  # each chunk of rows' expert

    def low_rank(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``x[rows of group e] @ factor[e]`` for every group: a rank-r factor's product. Padded groups are whole
        chunks of ``granule`` rows, so it is one batched product over the chunks (each with its expert's factor)
        instead of one small product per expert."""
        if self.chunk_experts is None:
            return grouped_mm(x, factor, self.offsets, self.counts)
        chunks = x.reshape(-1, self.granule, x.shape[-1])
        return torch.bmm(chunks, factor.index_select(0, self.chunk_experts)).reshape(x.shape[0], factor.shape[-1])

    def token_weights(self, rows: torch.Tensor | None, row_weights: torch.Tensor | None, n_rows: int, dtype):
        """Per sorted copy, the weight a term on batch ``rows`` (None: all rows) gives it: 0 off its rows."""
        if rows is None and row_weights is None:
            return None
        if self.n_tokens % n_rows:
            raise ConfigError(
                f"a mixed-adapter batch of {n_rows} rows reached the experts with {self.n_tokens} tokens; "
                "give one adapter name per sequence"
            )
        per_row = torch.zeros(n_rows, dtype=torch.float32, device=self.tokens.device)
        index = torch.arange(n_rows, device=per_row.device) if rows is None else rows
        per_row[index] = 1.0 if row_weights is None else row_weights.to(per_row.device)
        return per_row[self.tokens // (self.n_tokens // n_rows)].to(dtype).unsqueeze(1)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The sum over each token's k copies of ``out`` (sorted copies × H), weighted: N × H."""
        weighted = out * self.weights.unsqueeze(1).to(out.dtype)
        return weighted.new_zeros(self.n_tokens, weighted.shape[1]).index_add_(0, self.tokens, weighted)


def project(module: nn.Module, name: str, x: torch.Tensor, routed: Routed, layer, n_rows: int | None) -> torch.Tensor:
    """Projection ``name`` of the sorted copies ``x``: the base grouped product, its bias, and the grouped
    low-rank products of ``layer``'s terms (``layer`` None: not adapted)."""
    weight = getattr(module, name)
    if is_experts_4bit(weight):
        x = x.to(weight.compute_dtype)
        out = Dequantized4bitGroupedMatmul.apply(x, weight, routed.counts, module.is_transposed)
    else:
        x = x.to(weight.dtype)
        out = grouped_mm(x, weight if module.is_transposed else weight.transpose(1, 2), routed.offsets, routed.counts)
    # in place from here: the base product's backward needs its inputs, not its output
    if module.has_bias:
        out = out.add_(getattr(module, f"{name}_bias")[routed.experts])
    for term in layer.terms() if layer is not None else ():
        A, B = layer.grouped_factors(term, x.dtype)  # E × in × r, E × r × out (scale folded in)
        h = routed.low_rank(term.dropout(x), A)
        mask = routed.token_weights(term.rows, term.row_weights, n_rows or 1, h.dtype)
        if mask is not None:
            h = h * mask
        out = out.add_(routed.low_rank(h, B))
    return out


_recompute = False


@contextlib.contextmanager
def recompute_in_backward(enabled: bool = True):
    """Inside the block, expert blocks that run with gradients are recomputed in backward instead of keeping
    their intermediates (results are bit-identical; the block's forward runs twice)."""
    global _recompute
    outer, _recompute = _recompute, enabled
    try:
        yield
    finally:
        _recompute = outer


def recompute_expert_layers(model: nn.Module) -> int:
    """Make every decoder layer of ``model`` that holds fused experts keep only its input for backward and run
    again there (transformers' non-reentrant layer checkpointing, on those layers only); the number of layers.
    A recomputed layer keeps nothing of its attention, norms and experts across the model, at the cost of one
    more forward of the layer; no expert block inside it needs its own recomputation then (see
    ``recompute_in_backward``). Layers that transformers cannot checkpoint are left as they are."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and any(is_fused_experts(m) for m in module.modules()):
            module._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
            module.gradient_checkpointing = True
            count += 1
    return count


def grouped_forward(module: nn.Module, layers: dict, args: tuple, kwargs: dict) -> torch.Tensor:
    """The experts block of ``module`` with the LoRA ``layers`` (parameter name → ``LoraParameter``) on its
    projections, computed per expert group (see the module docstring)."""
    hidden, top_k_index, top_k_weights = routing_arguments(module, args, kwargs)
    if _recompute and torch.is_grad_enabled():
        return checkpoint(_block, module, layers, hidden, top_k_index, top_k_weights, use_reentrant=False)
    return _block(module, layers, hidden, top_k_index, top_k_weights)


def _block(module, layers, hidden, top_k_index, top_k_weights) -> torch.Tensor:
    granule = group_granule(top_k_index.numel(), module.num_experts, hidden.dtype, hidden.device)
    routed = Routed(top_k_index, top_k_weights, module.num_experts, granule)
    n_rows = next((layer.state.routing.n_rows for layer in layers.values() if layer.state.routing), None)
    first, second = projection_names(module)
    x = hidden.index_select(0, routed.tokens)  # its backward adds rows (index_add), far faster than index_put
    h = project(module, first, x, routed, layers.get(first), n_rows)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    out = project(module, second, h, routed, layers.get(second), n_rows)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return routed.combine(out).to(hidden.dtype)


def _grouped_base_forward(self, *args, **kwargs):
    return grouped_forward(self, {}, args, kwargs)


def quantize_experts(module: nn.Module, spec: QuantSpec, path: str = "experts") -> None:
    """Store every float expert stack of the fused experts ``module`` in 4 bits (in place); the module then runs
    through ``grouped_forward``, which multiplies by 4-bit stacks, also without adapters."""
    for name in expert_weight_names(module):
        weight = getattr(module, name)
        if not is_experts_4bit(weight):
            setattr(module, name, Experts4bit.from_stack(weight.detach(), spec, f"{path}.{name}"))
    run_grouped(module)


def run_grouped(module: nn.Module) -> None:
    """Route the fused experts ``module``'s own forward through ``grouped_forward`` (its stacks are 4-bit)."""
    module.forward = types.MethodType(_grouped_base_forward, module)
