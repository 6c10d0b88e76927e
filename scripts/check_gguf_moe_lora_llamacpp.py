"""Check ``loratune export-gguf`` of an MoE adapter (experts included) against llama.cpp itself (not CI: needs
``llama-cpp-python`` and a llama.cpp source tree for its ``convert_hf_to_gguf.py``).

A random Qwen3-MoE (SmolLM2's tokenizer, so that llama.cpp's converter knows it) is written as a Hugging Face
directory, converted to a float32 GGUF by llama.cpp's own converter, and given an adapter with a clear effect
(random, non-zero B, r=8 on the attention and both expert stacks of every block). llama.cpp loads the base with
the exported GGUF LoRA; the LoRA-induced change of the logits at every prompt position is compared with
loratune's (as ``check_gguf_lora_llamacpp.py`` does for a dense model), then greedy generations. A deliberately
wrong export (the gate and up halves of every expert swapped) goes through the same comparison, to show the
check can fail.

    python scripts/check_gguf_moe_lora_llamacpp.py --llama-cpp /path/to/llama.cpp [--experts 8] [--std 0.02]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loratune
from check_gguf_lora_llamacpp import PROMPT, common_prefix, compare, llama_cpp_run
from loratune.adapters import lora_layers, read_adapter
from loratune.adapters.gguf_export import GgufBase, gguf_lora_tensors, write_gguf_lora
from loratune.models.loader import resolve_model_dir


def build_moe(directory: Path, experts: int, seed: int = 0) -> None:
    """A random Qwen3-MoE with smollm2-135m's tokenizer, saved (float32) at ``directory``."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=experts,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # a router with a clear preference, so that routing is not decided by rounding
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def swapped_gate_up(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The export with every expert's gate and up lora_b exchanged: a wrong file the check must catch."""
    wrong = dict(tensors)
    for name in tensors:
        if ".ffn_gate_exps." in name and name.endswith("lora_b"):
            up = name.replace("ffn_gate_exps", "ffn_up_exps")
            wrong[name], wrong[up] = tensors[up], tensors[name]
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree (its converter)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--std", type=float, default=0.02, help="std of the random lora_B entries")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        build_moe(tmp / "moe", args.experts)
        converter = args.llama_cpp / "convert_hf_to_gguf.py"
        env_path = str(args.llama_cpp / "gguf-py")
        subprocess.run(
            [sys.executable, str(converter), str(tmp / "moe"), "--outtype", "f32", "--outfile", str(tmp / "base.gguf")],
            check=True,
            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
            capture_output=True,
        )
        model, tokenizer = loratune.load_model(str(tmp / "moe"), dtype="fp32")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        torch.manual_seed(0)
        loratune.add_adapter(model, loratune.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B["default"].normal_(std=args.std)
        loratune.save_adapter(model, tmp / "adapter")

        def ours(use_adapter: bool) -> np.ndarray:
            with torch.no_grad():
                if use_adapter:
                    return model(torch.tensor([ids])).logits[0].numpy()
                with loratune.adapters.disabled_adapters(model):
                    return model(torch.tensor([ids])).logits[0].numpy()

        def ours_greedy() -> list[int]:
            sequence = list(ids)
            with torch.no_grad():
                for _ in range(args.new_tokens):
                    sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
            return sequence[len(ids) :]

        ours_base, ours_lora, ours_gen = ours(False), ours(True), ours_greedy()
        config, tensors = read_adapter(tmp / "adapter")
        base = GgufBase.from_config(json.loads((tmp / "moe" / "config.json").read_text()))
        exported = gguf_lora_tensors(tensors, config, base)
        files = {
            "export": write_gguf_lora(exported, base, tmp / "right.gguf"),
            "gate_up_swapped": write_gguf_lora(
                type(exported)(swapped_gate_up(exported.tensors), exported.alpha, exported.folded),
                base,
                tmp / "wrong.gguf",
            ),
        }
        cpp_base, _ = llama_cpp_run(tmp / "base.gguf", None, ids, 0)
        results = {
            "experts": args.experts,
            "prompt_tokens": len(ids),
            "expert_tensors": sum("_exps" in n for n in exported.tensors) // 2,
            "base_vs_base": compare(ours_base, cpp_base),
            "adapter_effect": float(np.abs(ours_lora - ours_base).mean()),
        }
        for label, path in files.items():
            cpp_lora, cpp_gen = llama_cpp_run(tmp / "base.gguf", path, ids, args.new_tokens)
            row = compare(ours_lora - ours_base, cpp_lora - cpp_base)
            row["top1_agreement"] = float((ours_lora.argmax(-1) == cpp_lora.argmax(-1)).mean())
            row["greedy_common_prefix"] = common_prefix(ours_gen, cpp_gen)
            results[label] = row
        shutil.rmtree(tmp / "moe")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
