"""Export a PEFT-format LoRA adapter to llama.cpp's GGUF LoRA format (what ``llama-cli --lora`` loads).

The file follows llama.cpp's own converter (``convert_lora_to_gguf.py``):

- metadata ``general.architecture`` (the base's GGUF architecture), ``general.type = "adapter"``,
  ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32);
- per adapted weight ``<gguf tensor name>.lora_a`` with numpy shape (r, in) and ``.lora_b`` with (out, r)
  — exactly PEFT's ``lora_A`` / ``lora_B`` — where the GGUF name comes from gguf's ``TensorNameMap``
  (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``);
- token embeddings: ``token_embd.weight.lora_a`` is PEFT's ``lora_embedding_A`` transposed (vocab, r),
  ``.lora_b`` is ``lora_embedding_B`` (dim, r): llama.cpp looks rows of A up by token id;
- Llama's q/k rows are permuted (GGUF stores them in the interleaved RoPE order), so ``lora_B`` of q/k gets
  the same row permutation as the base weight: ``ΔW' = P·(B·A) = (P·B)·A``.
- a mixture-of-experts block's expert stacks (``target_parameters``) become 3-D pairs, one matrix per expert,
  which llama.cpp applies with its expert-indexed product (``build_lora_mm_id``): ``blk.N.ffn_{gate,up,down}_exps
  .weight.lora_a`` with numpy shape (E, r, in) and ``.lora_b`` (E, out, r) — what llama.cpp's converter makes of
  per-expert LoRA modules. A fused ``gate_up_proj`` stack splits as its base does: both halves share A_e, the
  first I rows of B_e go to ``ffn_gate_exps``, the rest to ``ffn_up_exps``.

llama.cpp scales every pair by ``alpha / r`` with one global alpha and r read from the tensor. Whatever that
cannot express (``alpha_pattern``, rsLoRA's ``alpha/√r``, a baked-in strength) is folded into ``lora_b``,
so ``alpha_file / r · lora_b' · lora_a`` equals the adapter's own ``s · B · A`` for every module.

What llama.cpp cannot apply is refused by name: ``modules_to_save`` (llama.cpp reads only lora_a/lora_b
pairs), a LoRA on the output head of a tied-embedding model (the head is the embedding there), an embedding
LoRA on a tied model (llama.cpp would apply it to the head too), and architectures outside ``ARCHITECTURES``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from loratune.adapters.config import LoraConfig
from loratune.adapters.peft_format import read_adapter
from loratune.adapters.peft_keys import is_base_copy_key, parse_factor_key
from loratune.adapters.targets import rank_and_alpha
from loratune.errors import AdapterLoadError, ConfigError
from loratune.layers import lora_scaling
from loratune.outputs import guard_output, write_atomic

# Hugging Face architecture (config.json ``architectures[0]``, what llama.cpp's converter dispatches on) ->
# (GGUF architecture, whether the converter permutes q/k rows for it).
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "MixtralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen3MoeForCausalLM": (gguf.MODEL_ARCH.QWEN3MOE, False),
}

GGUF_DTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),  # llama.cpp's converter default
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

WRITER_KEY = "loratune.writer"  # the loratune version that wrote a file; llama.cpp ignores keys it does not know


@dataclass(frozen=True)
class GgufBase:
    """What the export needs to know about the base model, read from its ``config.json``."""

    hf_architecture: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    n_layers: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool
    hidden: int = 0
    expert_width: int = 0  # an expert's intermediate size (MoE bases)

    @classmethod
    def from_config(cls, config: Mapping) -> GgufBase:
        """Read a Hugging Face ``config.json`` dict. Raises ``ConfigError`` for an unsupported architecture."""
        names = config.get("architectures") or []
        hf_architecture = names[0] if names else str(config.get("model_type"))
        if hf_architecture not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise ConfigError(
                f"GGUF export does not support the base architecture {hf_architecture!r} (supported: {supported})"
            )
        arch, permute_qk = ARCHITECTURES[hf_architecture]
        n_head = int(config["num_attention_heads"])
        return cls(
            hf_architecture=hf_architecture,
            arch=arch,
            permute_qk=permute_qk,
            n_layers=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden=int(config.get("hidden_size") or 0),
            expert_width=int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0),
        )

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


@dataclass(frozen=True)
class GgufLora:
    """An adapter in llama.cpp's terms: float32 tensors by GGUF name, the file's alpha, and what was folded."""

    tensors: dict[str, np.ndarray]
    alpha: float
    folded: dict[str, float]  # module path -> factor multiplied into lora_b (only where it is not 1)


def permute_rope_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or its lora_B) from Hugging Face's half-split RoPE layout to
    GGUF's interleaved one, as llama.cpp's converter does: per head, rows (0..d/2, d/2..d) -> pairs."""
    out = rows.shape[0]
    # (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...): row j of each half becomes pair j.
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _pairs(tensors: Mapping[str, torch.Tensor], config: LoraConfig) -> dict[str, dict]:
    """Group factor tensors by module path; refuse tensors llama.cpp has no place for."""
    pairs: dict[str, dict] = {}
    others = []
    for key, tensor in tensors.items():
        parsed = parse_factor_key(key)
        if parsed is None:
            # PEFT's copy of an adapted embedding's own base weight carries no adapter information.
            if not is_base_copy_key(key):
                others.append(key)
            continue
        pairs.setdefault(parsed.path, {"embedding": parsed.embedding})[parsed.factor] = tensor
    if others or config.modules_to_save:
        names = ", ".join(config.modules_to_save or sorted(others)[:3])
        raise ConfigError(
            f"the adapter trains whole modules (modules_to_save: {names}); llama.cpp LoRA files hold only "
            "lora_a/lora_b pairs — merge the adapter instead (loratune merge) and convert the merged model"
        )
    for path, pair in pairs.items():
        if "A" not in pair or "B" not in pair:
            raise AdapterLoadError(f"adapter tensor pair of {path} is missing its lora_{'B' if 'A' in pair else 'A'}")
    return pairs


def gguf_lora_tensors(
    tensors: Mapping[str, torch.Tensor], config: LoraConfig, base: GgufBase, *, scale: float = 1.0
) -> GgufLora:
    """Map PEFT adapter tensors to llama.cpp's GGUF LoRA tensors (float32 numpy arrays, GGUF names).

    ``scale`` bakes a strength into the file (1.0 = as trained). Raises ``ConfigError`` for what llama.cpp
    cannot represent (see the module docstring) and ``AdapterLoadError`` for a module whose tensors do not
    fit its config or a module path with no GGUF tensor of this architecture.
    """
    if not math.isfinite(scale):
        raise ConfigError(f"--scale must be a finite number, got {scale}")
    if config.use_dora:
        raise ConfigError(
            "llama.cpp has no DoRA adapters; merge this one into the base (`loratune merge`) and "
            "convert the merged model instead"
        )
    names = gguf.TensorNameMap(base.arch, base.n_layers)
    stacks = {path for path in _pairs(tensors, config) if _is_expert_stack(path, config)}
    alpha = float(config.lora_alpha)
    out: dict[str, np.ndarray] = {}
    folded: dict[str, float] = {}
    for path, pair in sorted(_pairs(tensors, config).items()):
        if path in stacks:
            factor = _expert_pairs(path, pair, config, base, names, scale, out)
            if not math.isclose(factor, 1.0, rel_tol=1e-12):
                folded[path] = factor
            continue
        found = names.get_type_and_name(path)
        if found is None:
            raise AdapterLoadError(
                f"adapted module {path} has no tensor in llama.cpp's {base.arch_name!r} architecture"
            )
        kind, gguf_name = found
        a, b = pair["A"].float(), pair["B"].float()
        if kind == gguf.MODEL_TENSOR.OUTPUT and base.tied_embeddings:
            raise ConfigError(
                f"the adapter adapts the output head ({path}), but the base ties it to the token embeddings, "
                "which llama.cpp stores once; retrain without the head or merge instead"
            )
        if pair["embedding"] and base.tied_embeddings:
            raise ConfigError(
                f"the adapter adapts the token embeddings ({path}) of a tied-embedding base: llama.cpp would "
                "apply it to the output head too; retrain without the embeddings or merge instead"
            )
        r, module_alpha = rank_and_alpha(config, path)
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterLoadError(
                f"adapter tensors of {path} have rank {a.shape[0]}/{b.shape[1]}, its config says r={r}"
            )
        # llama.cpp multiplies by alpha/r; fold the rest of the adapter's own factor into lora_b.
        factor = scale * lora_scaling(r, module_alpha, config.use_rslora) / (alpha / r)
        if not math.isclose(factor, 1.0, rel_tol=1e-12):
            b = b * factor
            folded[path] = factor
        if base.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            b = permute_rope_rows(b, base.n_head)
        elif base.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            b = permute_rope_rows(b, base.n_head_kv)
        if pair["embedding"]:
            a = a.T  # llama.cpp picks rows of lora_a by token id: (vocab, r)
        out[f"{gguf_name}.weight.lora_a"] = a.contiguous().numpy()
        out[f"{gguf_name}.weight.lora_b"] = b.contiguous().numpy()
    if not out:
        raise AdapterLoadError("the adapter holds no LoRA tensors")
    return GgufLora(tensors=out, alpha=alpha, folded=folded)


def _is_expert_stack(path: str, config: LoraConfig) -> bool:
    """Whether the adapter key path ``path`` (PEFT nests a module's second adapted parameter under
    ``base_layer``) is an adapted expert stack of ``config.target_parameters``."""
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    return any((owner + "." + name.rpartition(".")[2]).endswith(name) for name in config.target_parameters or ())


def _expert_pairs(path, pair, config: LoraConfig, base: GgufBase, names, scale: float, out: dict) -> float:
    """Write the 3-D lora_a / lora_b of the expert stack at ``path`` into ``out``; return what was folded into
    lora_b. Which projection it is shows in its shapes: ``gate_up_proj`` reads the hidden size and writes twice
    an expert's width, ``down_proj`` reads an expert's width."""
    owner = path
    while owner.endswith(".base_layer"):
        owner = owner.removesuffix(".base_layer")
    A, B = pair["A"].float(), pair["B"].float()
    r, module_alpha = rank_and_alpha(config, owner)
    width, hidden = base.expert_width, base.hidden
    if A.shape[0] % r or B.shape[1] != A.shape[0]:
        raise AdapterLoadError(f"expert adapter tensors of {path} do not hold r={r} rows per expert")
    E = A.shape[0] // r
    A_e = A.view(E, r, -1)
    B_e = B.view(B.shape[0], r, E).permute(2, 0, 1)  # E × out × r
    if A.shape[1] == hidden and B.shape[0] == 2 * width:
        parts = {"gate_proj": B_e[:, :width], "up_proj": B_e[:, width:]}
    elif A.shape[1] == width and B.shape[0] == hidden:
        parts = {"down_proj": B_e}
    else:
        raise AdapterLoadError(
            f"expert adapter {path} is {B.shape[0]} x {A.shape[1]} per expert, neither a gate_up_proj "
            f"({2 * width} x {hidden}) nor a down_proj ({hidden} x {width}) of this base"
        )
    factor = scale * lora_scaling(r, module_alpha, config.use_rslora) / (float(config.lora_alpha) / r)
    for projection, b in parts.items():
        found = names.get_type_and_name(f"{owner}.{projection}")
        if found is None:
            raise AdapterLoadError(f"expert stack {owner} has no {projection} in llama.cpp's {base.arch_name!r}")
        gguf_name = found[1]
        out[f"{gguf_name}.weight.lora_a"] = A_e.contiguous().numpy()
        out[f"{gguf_name}.weight.lora_b"] = (b * factor).contiguous().numpy()
    return factor


def write_gguf_lora(
    lora: GgufLora, base: GgufBase, out: str | os.PathLike, *, dtype: str = "f32", name: str | None = None
) -> Path:
    """Write ``lora`` as a GGUF LoRA file at ``out`` (temporary name, then renamed); return the path.

    ``dtype`` is the tensor type: ``f32`` (llama.cpp's converter default), ``f16`` or ``bf16``.
    Raises ``ConfigError`` for another dtype.
    """
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown GGUF dtype {dtype!r}; use one of: {', '.join(GGUF_DTYPES)}")
    qtype, file_type = GGUF_DTYPES[dtype]
    from loratune.version import __version__

    def write(temp: Path) -> None:
        writer = gguf.GGUFWriter(str(temp), base.arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.alpha)
        writer.add_string(WRITER_KEY, f"loratune {__version__}")
        if name:
            writer.add_name(name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, data in lora.tensors.items():
            writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(out, write)


def export_gguf(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    base_config: Mapping,
    *,
    dtype: str = "f32",
    scale: float = 1.0,
    overwrite: bool = False,
) -> GgufLora:
    """Export the PEFT adapter at ``adapter_dir`` to a llama.cpp GGUF LoRA file at ``out`` (an existing file only
    with ``overwrite``, and only one loratune wrote).

    ``base_config`` is the base model's ``config.json`` as a dict (architecture, heads, layers, tying).
    Returns what was written (tensors, alpha, folded factors). Raises ``AdapterLoadError`` for an unreadable
    or inconsistent adapter and ``ConfigError`` for what llama.cpp cannot represent or an ``out`` that may not
    be written.
    """
    with guard_output(
        out,
        kind="file",
        overwrite=overwrite,
        inputs=[("the adapter", adapter_dir)],
        what="GGUF file",
        record_kind="gguf-lora",
    ):
        base = GgufBase.from_config(base_config)
        config, tensors = read_adapter(adapter_dir)
        lora = gguf_lora_tensors(tensors, config, base, scale=scale)
        write_gguf_lora(lora, base, out, dtype=dtype, name=Path(adapter_dir).resolve().name)
    return lora
