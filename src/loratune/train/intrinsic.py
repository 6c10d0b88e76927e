"""Intrinsic-dimension training (``train.method: intrinsic``): only d numbers train, mapped into the target
tensors as ``θ = θ₀ + P·θ_d`` (Li et al., 2018) with P the seeded Fastfood projection of ``train.projection``, or
with SAID (Aghajanyan et al., 2020) ``θ_i = θ₀,i + λ_i·(P·θ_d)_i``: one trained scalar per target tensor, counted
inside d as the paper does (θ_d has d − m entries for m target tensors). θ_d starts at zero (the model starts as the
base) and λ at one.

The targets are every parameter of the model by default (the papers' setting: embeddings, norms and biases too;
a tied tensor once; a classifier's new head trains whole, outside P), or the weights of chosen Linear layers. They
are concatenated in model order into one D-vector; ``P·θ_d`` is computed once per forward pass and each tensor
reads its slice (``torch.nn.utils.parametrize``), so the backward pass sums every tensor's gradient into θ_d through
``Pᵀ``. Without autograd the offset is kept until θ_d or λ change (generation runs hundreds of forwards). The
artefact a run writes is tiny: θ_d, λ, the seed and the target list (``intrinsic/``); ``apply_intrinsic`` puts it
back onto the base, ``bake`` writes it into the weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from loratune.adapters.targets import module_name_matches, output_head_path
from loratune.errors import ConfigError
from loratune.files import read_safetensors
from loratune.train.projection import FastfoodProjection

CONFIG_FILE = "intrinsic_config.json"
WEIGHTS_FILE = "intrinsic.safetensors"
HEAD_FILE = "head.safetensors"  # a classifier's new head, trained whole beside θ_d


def intrinsic_targets(model: nn.Module, targets: str | Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The names of the parameters ``targets`` names, in model order, none inside the modules ``exclude`` names (a
    classifier's head, which trains whole): ``"all"``, every parameter (a tied tensor under its first name);
    ``"all-linear"``, the weight of every Linear layer but the output head; a list (names or dotted suffixes of
    Linear layers) or a string (a regex over their whole path), those layers' weights. Raises ``ConfigError`` when
    nothing matches."""
    excluded = lambda path: any(path == name or path.startswith(name + ".") for name in exclude)  # noqa: E731
    if targets == "all":
        found = [name for name, _ in model.named_parameters() if not excluded(name.rpartition(".")[0])]
    else:
        head = output_head_path(model)
        found = [
            f"{path}.weight"
            for path, module in model.named_modules()
            if isinstance(module, nn.Linear)
            and (path != head if targets == "all-linear" else module_name_matches(targets, path))
            and not excluded(path)
        ]
    if not found:
        raise ConfigError(f"intrinsic.targets {targets!r} match no parameter of this model")
    return found


def _holders(model: nn.Module, names: Sequence[str]) -> list[list[tuple[nn.Module, str]]]:
    """For each parameter name (one of ``model``'s), every (module, attribute) holding that tensor (a tied one has
    several)."""
    modules = dict(model.named_modules())
    by_tensor: dict[int, list[tuple[nn.Module, str]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        path, _, attribute = name.rpartition(".")
        by_tensor.setdefault(id(param), []).append((modules[path], attribute))
    params = dict(model.named_parameters())
    return [by_tensor[id(params[name])] for name in names]


class _Offset(nn.Module):
    """The parametrization of one target tensor: the tensor plus its piece of the shared offset."""

    def __init__(self, owner: IntrinsicWeights, index: int, shape: torch.Size):
        super().__init__()
        self.owner, self.index, self.shape = (owner,), index, shape  # a tuple: not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        piece = owner.pieces()[self.index].view(self.shape)
        if owner.lambdas is not None:
            piece = piece * owner.lambdas[self.index]
        return weight + piece.to(weight.dtype)


class IntrinsicWeights:
    """θ_d (and SAID's λ) reparametrizing the ``targets`` (parameter names) of ``model`` (see the module
    docstring); ``dim``: the trained numbers, λ included."""

    def __init__(self, model: nn.Module, targets: list[str], dim: int, seed: int, said: bool):
        self.paths = list(targets)
        holders = _holders(model, self.paths)
        tensors = [getattr(*where[0]) for where in holders]
        sizes = [t.numel() for t in tensors]
        self.D = sum(sizes)
        lambdas = len(tensors) if said else 0
        if dim > self.D:
            raise ConfigError(
                f"intrinsic.dim {dim:,} is larger than the {self.D:,} parameters of its targets; choose a smaller dim"
            )
        if dim <= lambdas:
            raise ConfigError(
                f"intrinsic.dim {dim:,} leaves nothing for θ: SAID counts one λ per target tensor inside dim "
                f"({lambdas:,} here); choose a dim above {lambdas:,}, fewer targets, or intrinsic.said: false"
            )
        device = tensors[0].device
        self.dim, self.seed = dim, seed
        self.theta = nn.Parameter(torch.zeros(dim - lambdas, device=device))
        self.lambdas = nn.Parameter(torch.ones(lambdas, device=device)) if said else None
        self.projection = FastfoodProjection(dim - lambdas, self.D, seed, device=device)
        self._kept: tuple | None = None
        self.holders, self.sizes = holders, sizes
        for index, (where, tensor) in enumerate(zip(holders, tensors)):
            tensor.requires_grad_(False)
            for module, attribute in where:  # a tied tensor: each holder reads the same piece
                parametrize.register_parametrization(module, attribute, _Offset(self, index, tensor.shape), unsafe=True)
        # a new forward pass starts at the model or, for the fused loss, at its base model
        for entry in {id(m): m for m in (model, getattr(model, "base_model", model))}.values():
            entry.register_forward_pre_hook(lambda *_: self._new_pass())

    def parameters(self) -> list[nn.Parameter]:
        return [self.theta] + ([self.lambdas] if self.lambdas is not None else [])

    def _new_pass(self) -> None:
        if torch.is_grad_enabled():
            self._kept = None  # the previous pass's graph is spent

    def pieces(self) -> tuple[torch.Tensor, ...]:
        """``P·θ_d`` split into each target's piece: once per forward pass with autograd, else until θ_d changes.
        (One split, whose backward joins the pieces' gradients in one D-long tensor; a slice per target would
        give each a D-long zero-filled gradient to add up.)"""
        key = (self.theta._version, torch.is_grad_enabled())
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self.projection(self.theta).split(self.sizes))
        return self._kept[1]

    def state(self) -> dict[str, torch.Tensor]:
        tensors = {"theta": self.theta.detach().cpu().clone()}
        if self.lambdas is not None:
            tensors["lambdas"] = self.lambdas.detach().cpu().clone()
        return tensors

    def load_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = {name: t.shape for name, t in self.state().items()}
        if {name: t.shape for name, t in tensors.items()} != expected:
            raise ConfigError(f"{source} does not hold this projection's θ (expected {dict(expected)})")
        with torch.no_grad():
            self.theta.copy_(tensors["theta"])
            if self.lambdas is not None:
                self.lambdas.copy_(tensors["lambdas"])

    def save(self, directory: Path, base_name: str) -> None:
        """Write θ_d (and λ) and what rebuilds P into ``directory`` (an existing, empty staging directory)."""
        save_file(self.state(), directory / WEIGHTS_FILE, metadata={"format": "pt"})
        config = {
            "method": "intrinsic",
            "dim": self.dim,
            "theta_dim": self.theta.numel(),
            "seed": self.seed,
            "said": self.lambdas is not None,
            "targets": self.paths,
            "D": self.D,
            "projection": "fastfood",
            "base_model_name_or_path": base_name,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")

    def bake(self) -> None:
        """Write ``θ₀ + P·θ_d`` into the target tensors and remove the reparametrization."""
        with torch.no_grad():
            for where in self.holders:
                (first, attribute), *others = where
                parametrize.remove_parametrizations(first, attribute, leave_parametrized=True)
                for module, other in others:  # the same tensor, written by the first holder
                    parametrize.remove_parametrizations(module, other, leave_parametrized=False)


def is_intrinsic_dir(path: str | Path) -> bool:
    """Whether ``path`` holds an intrinsic-dimension artefact (``intrinsic_config.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def apply_intrinsic(model: nn.Module, directory: str | Path) -> IntrinsicWeights:
    """Put the intrinsic-dimension artefact at ``directory`` back onto ``model`` (its base). Raises
    ``ConfigError`` when its targets are not this model's."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    modules = dict(model.named_modules())
    # (artefacts before parameter targets list Linear layers, whose weights they projected into, and a dim that
    # left SAID's λ out)
    targets = [f"{t}.weight" if isinstance(modules.get(t), nn.Linear) else t for t in config["targets"]]
    said = config["said"]
    dim = config["dim"] + (len(targets) if said and "theta_dim" not in config else 0)
    params = dict(model.named_parameters())
    missing = [t for t in targets if t not in params]
    if missing:
        raise ConfigError(f"{directory}: its targets are not parameters of this model ({missing[:3]})")
    weights = IntrinsicWeights(model, targets, dim, config["seed"], said)
    if config["D"] != weights.D:
        raise ConfigError(f"{directory}: its targets hold {config['D']:,} parameters, this model's {weights.D:,}")
    weights.load_state(read_safetensors(directory / WEIGHTS_FILE), str(directory))
    for param in weights.parameters():
        param.requires_grad_(False)
    if (directory / HEAD_FILE).is_file():
        load_head(model, read_safetensors(directory / HEAD_FILE), str(directory))
    return weights


def load_head(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy a classifier head's trained tensors (parameter name → tensor) into ``model``. Raises
    ``ConfigError`` when one is not a parameter of this model or has another shape."""
    named = dict(model.named_parameters())
    for name, tensor in tensors.items():
        if name not in named or named[name].shape != tensor.shape:
            raise ConfigError(f"{source}: its head's {name} does not fit this model")
        with torch.no_grad():
            named[name].copy_(tensor)


def merge_intrinsic(
    artefact: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    out_dtype=None,
    device: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Write θ₀ + P·θ_d of an intrinsic-dimension run's artefact into its base's weights (in float32) and save the
    result as a model directory at ``out`` in the base's stored dtype (or ``out_dtype``); return (``out``, the base
    model's name). ``model`` defaults to the base the artefact records. Raises ``ConfigError`` when neither names
    a base, or ``out`` may not be written."""
    from loratune.data.classification import LABELS_FILE, read_labels
    from loratune.models import load_classifier, load_model, model_sources, resolve_dtype
    from loratune.models.base_config import model_name_for
    from loratune.models.export import save_hf_model
    from loratune.models.loader import resolve_model_dir
    from loratune.models.merge import stored_dtype
    from loratune.outputs import guard_output

    path = Path(artefact)
    recorded = json.loads((path / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    name = model or (model_name_for(recorded) if recorded else None)
    if name is None:
        raise ConfigError(f"{path} does not record its base model; give --model")
    inputs = [("the intrinsic-dimension artefact", path), *(("the base model", p) for p in model_sources(name))]
    with guard_output(out, overwrite=overwrite, inputs=inputs):
        stored = stored_dtype(resolve_model_dir(name))
        labels = read_labels(path) if (path / LABELS_FILE).is_file() else None
        if labels is None:
            base, tokenizer = load_model(name, dtype="fp32", device=device, trust_remote_code=trust_remote_code)
        else:  # a classifier: its head is in the artefact
            base, tokenizer = load_classifier(name, labels, "fp32", device, trust_remote_code)
        apply_intrinsic(base, path).bake()
        written = resolve_dtype(out_dtype) if out_dtype else stored
        extras = {LABELS_FILE: json.dumps(labels.to_json(), indent=2) + "\n"} if labels is not None else None
        return save_hf_model(base, tokenizer, out, written, overwrite=overwrite, extras=extras), name
