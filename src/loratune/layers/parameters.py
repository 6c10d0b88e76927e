"""LoRA on parameters that are not the weight of a Linear (PEFT's ``target_parameters``): above all the 3-D
expert stacks of mixture-of-experts models, also any 2-D weight a module uses its own way (a router's).

``AdaptedModule`` takes the place of the module that owns the parameters (the original becomes its
``base_layer``) and holds one ``LoraParameter`` per adapted parameter in ``parameter_adapters``, keyed by the
parameter's name; a layer is known by the parameter's own path (``model.layers.0.mlp.experts.gate_up_proj``):
the key PEFT matches ``target_parameters``, ``rank_pattern`` and ``alpha_pattern`` against.

Factors have PEFT's layout, so that files map one to one. For a parameter of E experts (E × d1 × d2; in × out
= d1 × d2 when the module ``is_transposed``, else d2 × d1) of rank r:

    A: (E·r) × in      expert e's A_e = A.view(E, r, in)[e]
    B: out × (E·r)     expert e's B_e = B.view(out, r, E)[:, :, e]       ΔW_e = s·B_e·A_e   (out × in)

and for a 2-D parameter (out × in) A and B are a Linear's. The module's output is its own forward with every
adapted parameter W replaced by ``W + Σ s·ΔW`` (``reference_forward``, PEFT's definition); fused expert modules
compute the same per expert group without forming ΔW (``layers.experts``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from loratune.errors import ConfigError
from loratune.layers import execution, experts
from loratune.layers.kinds import MERGE_4BIT_HINT
from loratune.layers.lora import LoraLayer
from loratune.layers.state import Term
from loratune.quant.experts4bit import is_experts_4bit


class LoraParameter(LoraLayer):
    """LoRA on one parameter of a module (2-D, or 3-D: one matrix per expert). It has no module of its own
    (``base_layer`` is None): its ``AdaptedModule`` runs the owner."""

    def __init__(self, owner: nn.Module, parameter_name: str):
        super().__init__(None)
        self._owner = (owner,)  # a tuple: the owner is registered once, as the AdaptedModule's base_layer
        self.parameter_name = parameter_name
        weight = getattr(owner, parameter_name)
        self.quantized = is_experts_4bit(weight)
        shape = experts.stack_shape(weight)
        if len(shape) == 3:
            self.num_experts, d1, d2 = shape
            self.transposed = bool(getattr(owner, "is_transposed", False))
            self.in_features, self.out_features = (d1, d2) if self.transposed else (d2, d1)
        elif len(shape) == 2:
            self.num_experts, self.transposed = 1, False
            self.out_features, self.in_features = shape
        else:
            raise ConfigError(
                f"parameter {parameter_name!r} has shape {shape}; target_parameters adapts 2-D "
                "weights and 3-D expert stacks only"
            )
        self.stacked = len(shape) == 3

    @property
    def owner(self) -> nn.Module:
        return self._owner[0]

    @property
    def base_weight(self) -> torch.Tensor:
        return getattr(self.owner, self.parameter_name)

    def factor_shapes(self, r: int):
        return (self.num_experts * r, self.in_features), (self.out_features, self.num_experts * r)

    def weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (out × in, or E × out × in) laid out like the parameter."""
        return delta.transpose(-2, -1) if self.transposed else delta

    def expert_factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e: E × r × in, B_e: E × out × r) views of factors in PEFT's layout."""
        E = self.num_experts
        return A.view(E, -1, A.shape[-1]), B.view(B.shape[0], -1, E).permute(2, 0, 1)

    def grouped_factors(self, term: Term, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eᵀ: E × in × r, scale·B_eᵀ: E × r × out) of ``term`` in ``dtype``, for ``experts.grouped_mm``."""
        A_e, B_e = self.expert_factors(term.A, term.B)
        # contiguous: grouped products take a row- or column-major matrix per group, not PEFT's interleaving
        return A_e.transpose(1, 2).to(dtype), (B_e.transpose(1, 2) * term.scale).to(dtype).contiguous()

    def _delta(self, name: str, scale: float) -> torch.Tensor:
        A, B = self.lora_A[name].detach().float(), self.lora_B[name].detach().float()
        if not self.stacked:
            return scale * (B @ A)
        A_e, B_e = self.expert_factors(A, B)
        return scale * torch.bmm(B_e, A_e)  # E × out × in

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (E × out × in, float32) into the stack one expert at a time: the float32 working copy is
        one expert's, not the whole stack's."""
        if not self.stacked:
            return super()._add_to_weight(delta)
        weight = self.base_weight
        with torch.no_grad():
            for e in range(self.num_experts):
                change = self.weight_layout(delta[e]).to(weight.device)
                weight[e].copy_((weight[e].float() + change).to(weight.dtype))

    def differentiable_delta(self) -> torch.Tensor | None:
        """``Σ scale·ΔW`` over the terms the state makes act, laid out like the parameter, with gradients to the
        factors (None when none acts): the reference path's change to the weight."""
        total = None
        for term in self.terms():
            if term.rows is not None or term.row_weights is not None:
                raise ConfigError(
                    f"parameter {self.parameter_name!r} of {type(self.owner).__name__} cannot take a mixed-adapter "
                    "batch (its module is not a fused experts block); run one adapter per batch"
                )
            A, B = term.A.float(), term.B.float()
            if self.stacked:
                A_e, B_e = self.expert_factors(A, B)
                delta = torch.bmm(B_e, A_e)
            else:
                delta = B @ A
            delta = self.weight_layout(term.scale * delta)
            total = delta if total is None else total + delta
        return total

    def _check_dora(self) -> None:
        raise ConfigError(
            f"DoRA is not supported on {self.parameter_name!r} (target_parameters: PEFT has no DoRA there either); "
            "set use_dora: false, or leave the experts out with target_parameters: []"
        )

    def check_merge(self, name: str, *, safe: bool = False) -> None:
        if self.quantized:
            raise ConfigError(MERGE_4BIT_HINT)
        super().check_merge(name, safe=safe)

    def _check_pissa(self, weight_is_shared: bool) -> None:
        raise ConfigError(
            f"PiSSA and OLoRA starts are not supported on {self.parameter_name!r} (target_parameters); "
            "use init_lora_weights: true"
        )

    def forward(self, *args, **kwargs):
        raise TypeError("a LoraParameter is run by its AdaptedModule; call that module instead")

    def extra_repr(self) -> str:
        shape = tuple(self.base_weight.shape)
        return f"parameter={self.parameter_name}{list(shape)}, {super().extra_repr()}"


class AdaptedModule(nn.Module):
    """A module some of whose parameters carry LoRA adapters: the original as ``base_layer`` and a
    ``LoraParameter`` per adapted parameter in ``parameter_adapters``, keyed by the parameter's name.
    Attributes it lacks are read from the original."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.parameter_adapters = nn.ModuleDict()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "parameter_adapters"):
                raise
            return getattr(self.base_layer, name)

    def parameter_layers(self) -> list[tuple[str, LoraParameter]]:
        """(parameter name, layer) of the adapted parameters, in the original module's parameter order."""
        layers = self.parameter_adapters
        return [(name, layers[name]) for name, _ in self.base_layer.named_parameters(recurse=False) if name in layers]

    def layer_for(self, parameter_name: str) -> LoraParameter:
        """The layer of ``parameter_name``, created (without adapters) when it has none yet."""
        if parameter_name not in self.parameter_adapters:
            self.parameter_adapters[parameter_name] = LoraParameter(self.base_layer, parameter_name)
        return self.parameter_adapters[parameter_name]

    def remove_layer(self, parameter_name: str) -> None:
        """Drop the (empty) layer of ``parameter_name``."""
        del self.parameter_adapters[parameter_name]

    def forward(self, *args, **kwargs):
        layers = {name: layer for name, layer in self.parameter_layers() if layer.terms()}
        if not layers:
            execution.record("base")
            return self.base_layer(*args, **kwargs)
        if experts.grouped_path_covers(self.base_layer, set(layers)):
            execution.record("experts")
            return experts.grouped_forward(self.base_layer, layers, args, kwargs)
        execution.record("reference")
        return self.reference_forward(*args, **kwargs)

    def reference_forward(self, *args, **kwargs):
        """The original module's forward with each adapted parameter W replaced by ``W + Σ s·ΔW`` (PEFT's
        definition, and what every faster path must compute)."""
        replaced = {}
        for name, layer in self.parameter_layers():
            delta = layer.differentiable_delta()
            if delta is not None:
                weight = layer.base_weight
                if layer.quantized:
                    weight = weight.dequantized(weight.compute_dtype)
                replaced[name] = weight + delta.to(weight.device, weight.dtype)
        return functional_call(self.base_layer, replaced, args, kwargs, tie_weights=False, strict=False)
