"""Write a Llama-architecture checkpoint with random weights (default: Llama-2-7B shapes, ~6.9B parameters)
straight into safetensors shards, layer by layer, so the whole model is never in memory. With ``--experts N``
it is a Qwen3-MoE instead (each block's MLP: N experts of width ``--expert-width`` behind a top-``--top-k``
router), each expert's projections stored as their own tensors, as MoE checkpoints on the Hub are.

Peak memory is about one shard (``--shard-gb``, default 2 GB). The tokenizer comes from ``--tokenizer-from``
(default: the cached ``smollm2-135m`` conversion; its vocabulary sets ``vocab_size``).

    python bench/make_random_llama.py /work/scratch-7b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def layer_tensors(i: int, args, kv_dim: int, std: float, gen: torch.Generator):
    """Yield (name, tensor) for decoder layer ``i``, bf16, normal(0, std) weights and unit norms."""
    p = f"model.layers.{i}."
    hidden, inter, head_dim = args.hidden, args.intermediate, args.hidden // args.heads
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
    }
    if args.experts:
        shapes["mlp.gate.weight"] = (args.experts, hidden)
        for e in range(args.experts):
            shapes[f"mlp.experts.{e}.gate_proj.weight"] = (args.expert_width, hidden)
            shapes[f"mlp.experts.{e}.up_proj.weight"] = (args.expert_width, hidden)
            shapes[f"mlp.experts.{e}.down_proj.weight"] = (hidden, args.expert_width)
    else:
        shapes["mlp.gate_proj.weight"] = (inter, hidden)
        shapes["mlp.up_proj.weight"] = (inter, hidden)
        shapes["mlp.down_proj.weight"] = (hidden, inter)
    for name, shape in shapes.items():
        yield p + name, (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)
    norms = {"input_layernorm": hidden, "post_attention_layernorm": hidden}
    if args.experts:  # Qwen3 normalises each head's queries and keys
        norms.update({"self_attn.q_norm": head_dim, "self_attn.k_norm": head_dim})
    for norm, size in norms.items():
        yield p + norm + ".weight", torch.ones(size, dtype=torch.bfloat16)


def all_tensors(args, vocab: int, gen: torch.Generator):
    kv_dim = args.hidden // args.heads * args.kv_heads
    yield "model.embed_tokens.weight", (torch.randn(vocab, args.hidden, generator=gen) * 0.02).to(torch.bfloat16)
    for i in range(args.layers):
        yield from layer_tensors(i, args, kv_dim, 0.02, gen)
    yield "model.norm.weight", torch.ones(args.hidden, dtype=torch.bfloat16)
    yield "lm_head.weight", (torch.randn(vocab, args.hidden, generator=gen) * 0.02).to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE with this many experts per block")
    parser.add_argument("--expert-width", type=int, default=768, help="each expert's intermediate size")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token")
    parser.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="a model directory whose tokenizer files are copied (default: smollm2-135m)",
    )
    args = parser.parse_args()

    if args.tokenizer_from is None:
        from loratune.models.loader import resolve_model_dir

        args.tokenizer_from = resolve_model_dir("smollm2-135m")
    tok_config = json.loads((args.tokenizer_from / "config.json").read_text())
    vocab = tok_config["vocab_size"]

    staging = args.out.with_name(f".{args.out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    limit = int(args.shard_gb * 1e9)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush(final: bool) -> None:
        name = f"part-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], str(staging / name), metadata={"format": "pt"})
        for key in shards[0]:
            weight_map[key] = name
        files.append(name)
        print(f"wrote {name} ({size / 1e9:.2f} GB)", flush=True)

    for key, tensor in all_tensors(args, vocab, gen):
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > limit and shards[0]:
            flush(False)
            shards[0], size = {}, 0
        shards[0][key] = tensor
        size += nbytes
        total += nbytes
    flush(True)
    # Rename the shards to the usual model-0000i-of-0000N names now that N is known.
    n = len(files)
    renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        os.replace(staging / old, staging / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "bos_token_id": tok_config.get("bos_token_id"),
        "eos_token_id": tok_config.get("eos_token_id"),
        "pad_token_id": tok_config.get("pad_token_id"),
    }
    if args.experts:
        config.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            head_dim=args.hidden // args.heads,
            num_experts=args.experts,
            num_experts_per_tok=args.top_k,
            moe_intermediate_size=args.expert_width,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    (staging / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (args.tokenizer_from / name).is_file():
            shutil.copy(args.tokenizer_from / name, staging / name)
    if args.out.exists():
        shutil.rmtree(args.out)
    staging.rename(args.out)
    print(f"{args.out}: {total / 2 / 1e9:.2f}B parameters in {n} shards")


if __name__ == "__main__":
    main()
