"""What a run trains, apart from how: an adapter (``train.method: lora``), the model's own weights (``full``) or
a d-dimensional projection into them (``intrinsic``, see ``train.intrinsic``). Each kind says which parameters
the optimizer updates, what a checkpoint stores and how it is put back, and what the run writes at the end
(``adapter/``, ``model/`` or ``intrinsic/``).

Full fine-tuning of a bf16/fp16 model keeps float32 *master weights*: the optimizer updates float32 copies and
each step writes them back rounded to the model's dtype, so updates far below the model dtype's resolution
(an lr of 1e-5 on a weight of 1 is 1e-5, under bf16's step of 8e-3) accumulate instead of vanishing.
Checkpoints store the masters, so a resumed run continues from exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.adapters import adapter_state, load_adapter_state, save_adapter
from loratune.adapters.targets import module_name_matches
from loratune.errors import ConfigError, LoratuneError
from loratune.models.export import write_hf_model
from loratune.train.distributed import is_sharded, shard_like, whole_tensor
from loratune.train.intrinsic import HEAD_FILE, IntrinsicWeights, intrinsic_targets, load_head


class Trained:
    """What every kind shares: the optimizer updates ``parameters()`` themselves, with nothing to do around a step.
    Kinds set ``output_name`` (the run's output directory) and ``state_file`` (in checkpoints).

    ``collective``: whether FSDP split what the run trains across the processes (a full fine-tune under
    ``train.distributed: fsdp``). Then ``state()``, ``saved_weights()`` and the optimizer's state are gathered
    by every process together, so every process takes part in each checkpoint and save that rank 0 writes."""

    output_name: str
    state_file: str
    collective = False

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return self.parameters()

    def before_step(self) -> None:
        """Called after the gradients are final, before the optimizer steps."""

    def after_step(self) -> None:
        """Called after the optimizer stepped."""

    def after_sharding(self) -> None:
        """Called after FSDP replaced the model's parameters with sharded ones."""

    def saved_weights(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """What ``save`` writes when it must be gathered first (every process calls this, in step); None when
        ``save`` reads the model itself. ``keep``: whether this process keeps the result (the one that writes)."""
        return None


class TrainedAdapter(Trained):
    """A LoRA run: the adapter ``name``'s parameters train; the run writes an adapter directory."""

    output_name = "adapter"
    state_file = "adapter_state.safetensors"

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name = model, name

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model, self.name)

    def load_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        load_adapter_state(self.model, self.name, tensors, source)

    def save(self, tokenizer, directory: Path, base_name: str, weights: dict | None = None) -> None:
        """Write the adapter and the tokenizer (with its chat template) into ``directory``."""
        save_adapter(self.model, directory, self.name, base_model_name_or_path=base_name)
        tokenizer.save_pretrained(str(directory))


class TrainedModel(Trained):
    """A full fine-tuning run: the model's parameters (all, or those of ``modules``; with ``biases``, BitFit, its
    bias vectors and those of ``modules``) train, through float32 master copies when the model computes in a
    lower precision; the run writes a Hugging Face model directory."""

    output_name = "model"
    state_file = "model_state.safetensors"

    def __init__(self, model: nn.Module, modules: Sequence[str] | None = None, biases: bool = False):
        self.model = model
        chosen = _bias_parameters(model, modules) if biases else _chosen_parameters(model, modules)
        for param in model.parameters():
            param.requires_grad_(False)
        for param in chosen.values():
            param.requires_grad_(True)
        self.names = list(chosen)
        self.params = list(chosen.values())
        self._masters: list[torch.Tensor] | None = None

    @property
    def masters(self) -> list[torch.Tensor]:
        """The float32 copies the optimizer updates (the parameters themselves when they are float32), made on
        first use: after FSDP sharded the parameters, each process copies only its share."""
        if self._masters is None:
            self._masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in self.params]
        return self._masters

    def after_sharding(self) -> None:
        """Train the sharded parameters FSDP put in place of the model's own (same names), each process its share."""
        named = dict(self.model.named_parameters())
        self.params, self._masters = [named[name] for name in self.names], None
        self.collective = any(is_sharded(p) for p in self.params)

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def optimizer_parameters(self) -> list[torch.Tensor]:
        return self.masters

    def state(self) -> dict[str, torch.Tensor]:
        return {
            name: whole_tensor(master.detach()).to("cpu", copy=True).contiguous()
            for name, master in zip(self.names, self.masters)
        }

    def load_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        missing = [name for name in self.names if name not in tensors]
        if missing or len(tensors) != len(self.names):
            raise LoratuneError(f"{source} does not hold this run's trained weights (missing: {missing[:3]})")
        with torch.no_grad():
            for name, param, master in zip(self.names, self.params, self.masters):
                if tuple(tensors[name].shape) != tuple(param.shape):
                    raise LoratuneError(
                        f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model {tuple(param.shape)}"
                    )
                master.copy_(shard_like(tensors[name], master))
                if master is not param:
                    param.copy_(master)

    def before_step(self) -> None:
        """Give each float32 master the gradient of its low-precision parameter."""
        for param, master in zip(self.params, self.masters):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None

    def after_step(self) -> None:
        """Write the updated masters back into the model, rounded to its dtype."""
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                if master is not param:
                    param.copy_(master)

    def saved_weights(self, keep: bool) -> dict[str, torch.Tensor] | None:
        """The model's whole state dict on the CPU, gathered from the processes' shards (a tied weight once, under
        each of its names); None when nothing is sharded."""
        if not self.collective:
            return None
        parameters = dict(self.model.named_parameters(remove_duplicate=False))
        gathered: dict[int, torch.Tensor | None] = {}
        weights = {}
        for name, stored in self.model.state_dict().items():
            value = parameters.get(name, stored)
            if id(value) not in gathered:  # every process, in the same order: gathering a shard is collective
                whole = whole_tensor(value.detach())
                gathered[id(value)] = whole.cpu() if keep else None
            weights[name] = gathered[id(value)]
        return weights if keep else None

    def save(self, tokenizer, directory: Path, base_name: str, weights: dict | None = None) -> None:
        """Write the model (safetensors, its stored dtype) and tokenizer into ``directory``: transformers loads it.
        ``weights``: its gathered state dict (``saved_weights``) when FSDP split it."""
        write_hf_model(self.model, tokenizer, directory, state_dict=weights)


def _chosen_parameters(model: nn.Module, modules: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """{name: parameter} that full fine-tuning trains: every one, or those of the modules ``modules`` names
    (exact paths or dotted suffixes, as ``target_modules``). Raises ``ConfigError`` when a name matches nothing."""
    named = dict(model.named_parameters())  # a tied weight appears once, under its first name
    if modules is None:
        return named
    name_of = {id(param): name for name, param in named.items()}
    chosen = {}
    for module_name in modules:
        found = [
            param
            for path, module in model.named_modules()
            if module_name_matches([module_name], path)
            for param in module.parameters()
        ]
        if not found:
            raise ConfigError(f"train.full_modules: {module_name!r} matches no module of this model")
        chosen.update({name_of[id(param)]: param for param in found})
    return chosen


def _bias_parameters(model: nn.Module, modules: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """{name: parameter} that BitFit (Ben Zaken et al., 2021) trains: every bias vector, and every parameter of
    the ``modules`` (a classifier's new head). Raises ``ConfigError`` for a model without biases."""
    chosen = {name: param for name, param in model.named_parameters() if name.rpartition(".")[2] == "bias"}
    if not chosen:
        raise ConfigError(
            f"train.method: bitfit trains bias vectors; this {type(model).__name__} has none (Llama-family models "
            "have no biases): use train.method: lora"
        )
    return {**chosen, **(_chosen_parameters(model, modules) if modules else {})}


HEAD_PREFIX = "head."  # a classifier head's tensors in an intrinsic run's checkpoint state


class TrainedIntrinsic(Trained):
    """An intrinsic-dimension run: θ_d (and SAID's λ) train, and the ``head`` modules whole (a classifier's new
    head, outside the projection); the run writes ``intrinsic/`` (θ, seed, targets, the head's tensors)."""

    output_name = "intrinsic"
    state_file = "intrinsic_state.safetensors"

    def __init__(self, model: nn.Module, dim: int, seed: int, said: bool, targets, head: Sequence[str] = ()):
        self.model = model
        for param in model.parameters():
            param.requires_grad_(False)
        self.weights = IntrinsicWeights(model, intrinsic_targets(model, targets, exclude=head), dim, seed, said)
        self.head = _chosen_parameters(model, head) if head else {}
        for param in self.head.values():
            param.requires_grad_(True)

    def parameters(self) -> list[nn.Parameter]:
        return self.weights.parameters() + list(self.head.values())

    def state(self) -> dict[str, torch.Tensor]:
        head = {f"{HEAD_PREFIX}{name}": p.detach().cpu().clone() for name, p in self.head.items()}
        return {**self.weights.state(), **head}

    def load_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        head = {name[len(HEAD_PREFIX) :]: t for name, t in tensors.items() if name.startswith(HEAD_PREFIX)}
        if head.keys() != self.head.keys():
            raise LoratuneError(f"{source} does not hold this run's head ({sorted(self.head)[:3]})")
        load_head(self.model, head, source)
        self.weights.load_state({n: t for n, t in tensors.items() if not n.startswith(HEAD_PREFIX)}, source)

    def save(self, tokenizer, directory: Path, base_name: str, weights: dict | None = None) -> None:
        """Write θ_d, λ, the seed and the targets (see ``train.intrinsic``), a classifier's head and the tokenizer
        into ``directory``."""
        self.weights.save(directory, base_name)
        if self.head:
            tensors = {name: p.detach().cpu().contiguous() for name, p in self.head.items()}
            save_file(tensors, directory / HEAD_FILE, metadata={"format": "pt"})
        tokenizer.save_pretrained(str(directory))
