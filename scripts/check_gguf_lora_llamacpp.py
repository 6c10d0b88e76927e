"""Check ``loratune export-gguf`` against llama.cpp itself (not CI: needs ``pip install llama-cpp-python``).

An adapter with a clear effect (random, non-zero B, r=8 on every linear layer of SmolLM2-135M, with a
``rank_pattern`` and an ``alpha_pattern`` so the per-module scaling has to be folded into lora_b) is exported
and loaded by llama.cpp next to the very Q4_1 GGUF that loratune's ``smollm2-135m`` is dequantized from,
and next to a float32 copy of it (same weights; llama.cpp's Q4_1 kernels quantize activations, f32 does not).
For one prompt, the LoRA-induced change of the logits (adapter minus base, at every position) from llama.cpp
is compared with loratune's: correlation, relative error, max difference, top-1 agreement; then greedy
generations. A deliberately wrong export (q/k lora_B without the RoPE row permutation) goes through the same
comparison, to show the check can fail.

    python scripts/check_gguf_lora_llamacpp.py [--std 0.02] [--new-tokens 32] [--dtype f32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import loratune
from loratune.adapters import lora_layers, read_adapter
from loratune.adapters.gguf_export import GgufBase, gguf_lora_tensors, write_gguf_lora
from loratune.models.aliases import alias_gguf_path, get_alias
from loratune.models.base_config import base_model_config

PROMPT = "What is the capital of France? Answer in one sentence, then name two famous landmarks there."


def make_adapter(model, path: Path, std: float, targets) -> None:
    """r=8 on ``targets`` (v_proj r=4, down_proj alpha 32) with B ~ N(0, std²), saved at ``path``."""
    torch.manual_seed(0)
    config = loratune.LoraConfig(
        r=8, lora_alpha=16, target_modules=targets, rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 32}
    )
    loratune.add_adapter(model, config)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=std)
    loratune.save_adapter(model, path)


def loratune_logits(model, ids: list[int], use_adapter: bool) -> np.ndarray:
    with torch.no_grad():
        if use_adapter:
            logits = model(torch.tensor([ids])).logits[0]
        else:
            with loratune.adapters.disabled_adapters(model):
                logits = model(torch.tensor([ids])).logits[0]
    return logits.float().numpy()


def loratune_greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` argmax tokens, not stopping at end-of-turn (exactly the loop run on llama.cpp below)."""
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(n):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids) :]


def llama_cpp_run(base_gguf: Path, lora_gguf: Path | None, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """(logits at every prompt position, greedy continuation of ``n`` tokens) from llama.cpp."""
    import llama_cpp
    from llama_cpp import Llama

    # llama.cpp's extra CPU weight buffers (AMX / repacked Q4) crash decode on this machine's CPU (AMX
    # advertised, tile state not granted in the container): plain CPU buffers, as for the LoRA tensors anyway.
    default_params = llama_cpp.llama_model_default_params

    def plain_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = plain_buffers
    options = dict(model_path=str(base_gguf), n_ctx=256, n_threads=2, logits_all=True, verbose=False, seed=0)
    if lora_gguf is not None:
        options["lora_path"] = str(lora_gguf)
    llm = Llama(**options)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    tokens = []
    for _ in range(n):  # plain argmax, as loratune's greedy decoding
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return logits, tokens


def f32_copy(src: Path, dst: Path) -> Path:
    """The GGUF at ``src`` with every tensor dequantized to float32 (same metadata otherwise): llama.cpp then
    multiplies in float32 instead of quantizing activations for the Q4_1 kernels, isolating the LoRA."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    flat_a, flat_b = ours.ravel().astype(np.float64), theirs.ravel().astype(np.float64)
    return {
        "corr": float(np.corrcoef(flat_a, flat_b)[0, 1]),
        "rel_err": float(np.linalg.norm(flat_a - flat_b) / np.linalg.norm(flat_a)),
        "max_abs_diff": float(np.abs(flat_a - flat_b).max()),
        "mean_abs_ours": float(np.abs(flat_a).mean()),
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--std", type=float, default=0.02, help="std of the random lora_B entries")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"], help="GGUF tensor type")
    parser.add_argument(
        "--targets",
        default="all-linear",
        help="all-linear or comma-separated module names (q_proj,k_proj isolates the permutation)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    base_gguf = alias_gguf_path(get_alias("smollm2-135m"))
    model, tokenizer = loratune.load_model("smollm2-135m", dtype="fp32", device="cpu")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    results: dict = {
        "prompt_tokens": len(ids),
        "base_gguf": base_gguf.name,
        "dtype": args.dtype,
        "std": args.std,
        "targets": args.targets,
    }

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
        make_adapter(model, tmp / "adapter", args.std, targets)
        ours_base = loratune_logits(model, ids, use_adapter=False)
        ours_lora = loratune_logits(model, ids, use_adapter=True)
        ours_gen = loratune_greedy(model, ids, args.new_tokens)
        with loratune.adapters.disabled_adapters(model):
            ours_gen_base = loratune_greedy(model, ids, args.new_tokens)

        # The right export (what `loratune export-gguf` writes) and a deliberately wrong one.
        base = GgufBase.from_config(base_model_config("smollm2-135m"))
        config, tensors = read_adapter(tmp / "adapter")
        files = {
            "export": write_gguf_lora(
                gguf_lora_tensors(tensors, config, base), base, tmp / "right.gguf", dtype=args.dtype
            ),
            "no_qk_permutation": write_gguf_lora(
                gguf_lora_tensors(tensors, config, dataclasses.replace(base, permute_qk=False)),
                base,
                tmp / "wrong.gguf",
                dtype=args.dtype,
            ),
        }

        ours_delta = ours_lora - ours_base
        results["adapter_effect"] = {
            "mean_abs_delta_logit": float(np.abs(ours_delta).mean()),
            "top1_changed_fraction": float((ours_lora.argmax(-1) != ours_base.argmax(-1)).mean()),
            "greedy_common_prefix_with_base": common_prefix(ours_gen, ours_gen_base),
        }
        bases = {"q4_1_base": base_gguf, "f32_base": f32_copy(base_gguf, tmp / "base-f32.gguf")}
        for base_label, base_file in bases.items():
            cpp_base, cpp_gen_base = llama_cpp_run(base_file, None, ids, args.new_tokens)
            section = {"base_vs_base": compare(ours_base, cpp_base)}
            section["base_vs_base"]["greedy_common_prefix"] = common_prefix(ours_gen_base, cpp_gen_base)
            for label, path in files.items():
                cpp_lora, cpp_gen = llama_cpp_run(base_file, path, ids, args.new_tokens)
                row = compare(ours_delta, cpp_lora - cpp_base)
                row["top1_agreement"] = float((ours_lora.argmax(-1) == cpp_lora.argmax(-1)).mean())
                row["greedy_common_prefix"] = common_prefix(ours_gen, cpp_gen)
                row["greedy_llama_cpp"] = tokenizer.decode(cpp_gen)
                section[label] = row
            results[base_label] = section
        results["greedy_loratune"] = tokenizer.decode(ours_gen)
        results["greedy_loratune_base"] = tokenizer.decode(ours_gen_base)

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
