"""Image-model LoRA files in the kohya / A1111 layout (Civitai's), read and written as PEFT-keyed adapters.

A kohya file is one ``.safetensors`` file; each adapted module contributes

    {prefix}_{module path with "." → "_"}.lora_down.weight    A: r × in  (a convolution: r × in × kh × kw)
    {prefix}_{module path with "." → "_"}.lora_up.weight      B: out × r (a convolution: out × r × 1 × 1)
    {prefix}_{module path with "." → "_"}.alpha               a 0-d tensor; Δ = (alpha / r)·B·A; missing = r

with the prefix naming the component: ``lora_unet``, ``lora_te`` (the text encoder), ``lora_te1`` /
``lora_te2`` (SDXL's two). The header's metadata (``ss_*``: training settings) is kept.

Read without a model, a kohya file is an ordinary ``(LoraConfig, tensors)`` pair whose module paths are the
kohya names themselves (no dots), so every file-only verb (inspect, mix, rank, resize) works on it unchanged.
Mapping names back to module paths needs the model's module names, because "_" also occurs inside them:
``to_module_paths`` takes them (see ``models.diffusers`` for a diffusers directory); ``from_module_paths``
goes the other way and needs nothing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loratune.adapters.config import LoraConfig
from loratune.adapters.factors import adapter_factors
from loratune.adapters.peft_keys import factor_keys
from loratune.adapters.targets import rank_and_alpha
from loratune.errors import AdapterLoadError, ConfigError
from loratune.files import reading
from loratune.outputs import guard_output, write_atomic
from loratune.validation import closest
from loratune.version import __version__

# prefix -> the pipeline component it adapts (the longest prefixes first: "lora_te1" before "lora_te")
COMPONENTS = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te": "text_encoder"}
SUFFIXES = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
WRITER_KEY = "loratune.writer"  # metadata naming the loratune version that wrote a file
NETWORK_MODULE = "networks.lora"  # kohya's name for plain LoRA / LoCon, as its scripts record it

# Keys of LyCORIS and other variants that are not LoRA: the type each one means.
UNSUPPORTED = {
    "hada_": "LoHa (hada_* tensors)",
    "lokr_": "LoKr (lokr_* tensors)",
    "lora_mid": "LoCon with a CP-decomposed kernel (lora_mid)",
    "dora_scale": "DoRA (dora_scale)",
    "diff": "a full weight difference (diff / diff_b)",
    "w_norm": "a norm-layer adapter (w_norm / b_norm)",
    "b_norm": "a norm-layer adapter (w_norm / b_norm)",
    "oft_": "OFT (oft_* tensors)",
    "ia3": "IA³",
    "on_input": "IA³",
}


@dataclass
class KohyaAdapter:
    """A kohya file read as a PEFT-keyed adapter whose module paths are the kohya names (``config``,
    ``tensors``), with the file's header metadata."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def is_kohya_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a single ``.safetensors`` file (the kohya layout) rather than a PEFT directory."""
    return Path(path).suffix == ".safetensors" and not Path(path).is_dir()


def split_name(name: str) -> tuple[str, str]:
    """(prefix, the module path with "_" for ".") of a kohya module name; ``ConfigError`` for another name."""
    for prefix in COMPONENTS:
        if name.startswith(prefix + "_"):
            return prefix, name[len(prefix) + 1 :]
    raise ConfigError(f"{name!r} is not a kohya LoRA module name (it starts with none of {', '.join(COMPONENTS)})")


def kohya_name(prefix: str, path: str) -> str:
    """The kohya name of the module at ``path`` under ``prefix``. A CLIP text encoder's paths are named as in
    the nested ``text_model.…`` layout every kohya tool uses, also where transformers has flattened the model
    (``encoder.layers.0…``, transformers ≥ 5)."""
    if prefix != "lora_unet" and path.split(".", 1)[0] in FLATTENED_CLIP_ROOTS:
        path = "text_model." + path
    return f"{prefix}_{path.replace('.', '_')}"


FLATTENED_CLIP_ROOTS = ("embeddings", "encoder", "final_layer_norm")


def read_kohya(path: str | os.PathLike) -> KohyaAdapter:
    """The kohya file at ``path`` as a ``KohyaAdapter``.

    Raises ``AdapterLoadError`` for an unreadable file, a key of a type LoRA cannot represent (LoHa, LoKr, …:
    named), an unknown key, or a module without both factors; nothing is returned then.
    """
    file = Path(path)
    if not file.is_file():
        raise AdapterLoadError(f"{file} does not exist; give a kohya .safetensors file or a PEFT adapter directory")
    with reading(file, "kohya LoRA file", AdapterLoadError), safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        raw = {key: handle.get_tensor(key) for key in handle.keys()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        name, _, suffix = key.partition(".")
        kind = SUFFIXES.get(suffix)
        if kind is None:
            variant = next((what for mark, what in UNSUPPORTED.items() if suffix.startswith(mark)), None)
            if variant is not None:
                raise AdapterLoadError(
                    f"{file} holds {variant}, a LyCORIS type loratune cannot represent as LoRA "
                    f"(e.g. {key}); nothing was loaded"
                )
            raise AdapterLoadError(
                f"{file}: {key} is not a kohya LoRA key (expected <name>.lora_down.weight, "
                "<name>.lora_up.weight or <name>.alpha); nothing was loaded"
            )
        try:
            split_name(name)
        except ConfigError as exc:
            raise AdapterLoadError(f"{file}: {exc}") from None
        modules.setdefault(name, {})[kind] = tensor
    if not modules:
        raise AdapterLoadError(f"{file} holds no LoRA tensors (lora_down / lora_up)")
    tensors, ranks, alphas = {}, {}, {}
    for name, parts in sorted(modules.items()):
        if "A" not in parts or "B" not in parts:
            missing = "lora_up.weight" if "A" in parts else "lora_down.weight"
            raise AdapterLoadError(f"{file}: {name} has no {missing}; the file is incomplete")
        A, B = parts["A"], parts["B"]
        a_key, b_key = factor_keys(name)
        tensors[a_key], tensors[b_key] = A, B
        ranks[name] = A.shape[0]
        alphas[name] = float(parts["alpha"]) if "alpha" in parts else float(A.shape[0])
    config = config_for(ranks, alphas, base_model=metadata.get("ss_sd_model_name") or None)
    try:
        adapter_factors(config, tensors, str(file))  # shapes: every down has its up
    except ConfigError as exc:
        raise AdapterLoadError(str(exc)) from None
    return KohyaAdapter(config, tensors, metadata)


def config_for(
    ranks: Mapping[str, int], alphas: Mapping[str, float], base_model: str | None = None, **fields
) -> LoraConfig:
    """A ``LoraConfig`` giving each module path its rank and alpha exactly: the most common (r, alpha) as
    the defaults, the others in ``rank_pattern`` / ``alpha_pattern`` under their full paths."""
    counts = Counter((ranks[p], alphas[p]) for p in ranks)
    r, alpha = max(counts, key=lambda pair: (counts[pair], pair))
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        base_model_name_or_path=base_model,
        rank_pattern={p: k for p, k in sorted(ranks.items()) if k != r},
        alpha_pattern={p: a for p, a in sorted(alphas.items()) if a != alpha},
        **fields,
    )


def module_ranks_and_alphas(
    config: LoraConfig, tensors: Mapping[str, torch.Tensor], source: str = "adapter"
) -> tuple[dict[str, int], dict[str, float]]:
    """Each module's rank and the kohya alpha that gives its scaling (alpha/r; with rsLoRA alpha·√r)."""
    factors, others = adapter_factors(config, dict(tensors), source)
    if others:
        raise ConfigError(
            f"{source} has tensors a kohya file cannot hold (modules_to_save or DoRA magnitudes, e.g. "
            f"{sorted(others)[0]}); keep it in the PEFT format"
        )
    if any(f.embedding for f in factors.values()):
        raise ConfigError(
            f"{source} adapts an embedding layer, which a kohya file cannot hold; keep it in the PEFT format"
        )
    ranks = {path: f.rank for path, f in factors.items()}
    if config.use_rslora:
        return ranks, {path: f.scaling * f.rank for path, f in factors.items()}
    return ranks, {path: rank_and_alpha(config, path)[1] for path in factors}


def write_kohya(
    path: str | os.PathLike,
    config: LoraConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT-keyed adapter whose module paths are kohya names as a kohya file at ``path`` (atomically).

    ``alpha`` is a 0-d float32 tensor per module, as kohya writes it. ``metadata`` (e.g. the input's ``ss_*``)
    is kept, with ``ss_network_dim`` / ``ss_network_alpha`` updated where the ranks changed. Raises
    ``ConfigError`` when a path is not a kohya name, the adapter holds what kohya cannot (embeddings,
    modules_to_save, DoRA), or ``path`` exists (without ``overwrite``, or not written by loratune)."""
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ConfigError(f"a kohya LoRA file is a .safetensors file; give --out ending in .safetensors, not {target}")
    with guard_output(target, kind="file", overwrite=overwrite, what="kohya LoRA file", record_kind="kohya-lora"):
        return _write_kohya_file(target, config, tensors, metadata)


def _write_kohya_file(
    target: Path, config: LoraConfig, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> Path:
    ranks, alphas = module_ranks_and_alphas(config, tensors)
    out = {}
    for name in sorted(ranks):
        split_name(name)
        a_key, b_key = factor_keys(name)
        out[f"{name}.lora_down.weight"] = tensors[a_key].contiguous()
        out[f"{name}.lora_up.weight"] = tensors[b_key].contiguous()
        out[f"{name}.alpha"] = torch.tensor(alphas[name], dtype=torch.float32)
    header = dict(metadata or {})
    for key, values in (("ss_network_dim", ranks), ("ss_network_alpha", alphas)):
        distinct = set(values.values())
        if key in header or key == "ss_network_dim":
            header[key] = f"{next(iter(distinct)):g}" if len(distinct) == 1 else "Dynamic"
    header.setdefault("ss_network_module", NETWORK_MODULE)
    header[WRITER_KEY] = __version__
    return write_atomic(target, lambda temp: save_file(out, temp, metadata=header))


def components_in(adapter: KohyaAdapter) -> list[str]:
    """The pipeline components (``unet``, ``text_encoder``, ``text_encoder_2``) the file adapts, in that order."""
    found = {COMPONENTS[split_name(name)[0]] for name in adapter.config.target_modules}
    return [c for c in ("unet", "text_encoder", "text_encoder_2") if c in found]


def component_part(adapter: KohyaAdapter, component: str) -> KohyaAdapter:
    """The modules of ``adapter`` that adapt ``component`` (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    ranks, alphas = module_ranks_and_alphas(adapter.config, adapter.tensors)
    names = [n for n in ranks if COMPONENTS[split_name(n)[0]] == component]
    if not names:
        raise ConfigError(f"the kohya file adapts no {component}; it adapts {', '.join(components_in(adapter))}")
    config, tensors = _renamed(adapter.config, adapter.tensors, {n: n for n in names}, ranks, alphas)
    return KohyaAdapter(config, tensors, adapter.metadata)


def to_module_paths(
    adapter: KohyaAdapter, module_paths: Mapping[str, Iterable[str]], source: str = "kohya file"
) -> dict[str, tuple[LoraConfig, dict[str, torch.Tensor]]]:
    """Split a kohya adapter by component into PEFT adapters keyed by real module paths.

    ``module_paths``: for each component the file adapts (``unet``, ``text_encoder``, ``text_encoder_2``),
    the module paths of that model (any order; ``named_modules()`` names). Raises ``ConfigError`` for a
    component that is not given or a name no module has (with the closest one)."""
    ranks, alphas = module_ranks_and_alphas(adapter.config, adapter.tensors, source)
    by_component: dict[str, dict[str, str]] = {}
    for name in ranks:
        prefix, _ = split_name(name)
        component = COMPONENTS[prefix]
        if component not in module_paths:
            raise ConfigError(
                f"{source} adapts the {component} ({prefix}_*), but no {component} was given; "
                f"give a model with one (a diffusers pipeline directory has {component}/)"
            )
        by_component.setdefault(component, {})[name] = prefix
    parts = {}
    for component, names in by_component.items():
        paths = [p for p in module_paths[component] if p]
        lookup = {}
        for prefix in set(names.values()):
            lookup.update({f"{prefix}_{p.replace('.', '_')}": p for p in paths})  # the plain form too
            lookup.update({kohya_name(prefix, p): p for p in paths})
        mapping = {}
        for name in sorted(names):
            if name not in lookup:
                hint = closest(name, list(lookup))
                raise ConfigError(
                    f"{source}: {name} names no module of the {component}"
                    + (f"; closest: {hint}" if hint else "")
                    + " (is the file for another model, e.g. SDXL's original block names?)"
                )
            mapping[name] = lookup[name]
        parts[component] = _renamed(adapter.config, adapter.tensors, mapping, ranks, alphas)
    return parts


def from_module_paths(parts: Mapping[str, tuple[LoraConfig, Mapping[str, torch.Tensor]]]) -> KohyaAdapter:
    """PEFT adapters keyed by module paths, one per component (``unet``, ``text_encoder``,
    ``text_encoder_2``), as one kohya adapter (``lora_te1`` / ``lora_te2`` when there are two text encoders)."""
    prefixes = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if "text_encoder_2" in parts else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    ranks, alphas, tensors = {}, {}, {}
    for component, (config, part) in parts.items():
        if component not in prefixes:
            raise ConfigError(f"unknown component {component!r}; kohya files hold {', '.join(prefixes)}")
        part_ranks, part_alphas = module_ranks_and_alphas(config, part, component)
        mapping = {path: kohya_name(prefixes[component], path) for path in part_ranks}
        tensors.update(_renamed(config, part, mapping, part_ranks, part_alphas)[1])
        ranks.update({mapping[p]: k for p, k in part_ranks.items()})
        alphas.update({mapping[p]: a for p, a in part_alphas.items()})
    base = next((c.base_model_name_or_path for c, _ in parts.values() if c.base_model_name_or_path), None)
    metadata = {"ss_sd_model_name": base} if base else {}
    return KohyaAdapter(config_for(ranks, alphas, base), tensors, metadata)


def _renamed(
    config: LoraConfig,
    tensors: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The factors of the modules in ``mapping`` under their new paths, with a config giving each its rank
    and alpha (rsLoRA folded into alpha)."""
    out = {}
    for old, new in mapping.items():
        for old_key, new_key in zip(factor_keys(old), factor_keys(new)):
            out[new_key] = tensors[old_key]
    new_ranks = {new: ranks[old] for old, new in mapping.items()}
    new_alphas = {new: alphas[old] for old, new in mapping.items()}
    fields = {"task_type": config.task_type} if config.task_type else {}
    return config_for(new_ranks, new_alphas, config.base_model_name_or_path, **fields), out


__all__ = [
    "COMPONENTS",
    "KohyaAdapter",
    "components_in",
    "config_for",
    "from_module_paths",
    "is_kohya_path",
    "kohya_name",
    "read_kohya",
    "split_name",
    "to_module_paths",
    "write_kohya",
]
