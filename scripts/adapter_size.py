"""The size of a LoRA adapter file against its base checkpoint at 7B scale, from the architectures' configs alone.

The base is built on PyTorch's meta device (shapes, no weights: nothing is downloaded or allocated), loratune adds
the adapter, and only the adapter's tensors are made real (zeros) and written by loratune's own writer, as
`loratune train` writes them (float32 factors, PEFT's safetensors file) and compressed (`compress: int8`). The
base's size is its parameter count times two bytes (bf16, as 7B checkpoints are published).

    python scripts/adapter_size.py              # the table of docs/experiments.md
    python scripts/adapter_size.py --csv FILE   # also the raw numbers
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import loratune
from loratune.adapters.peft_format import adapter_slots

# The published configs' shapes (hidden, MLP width, blocks, heads, key/value heads, vocabulary).
ARCHITECTURES = {
    "Llama-2-7B": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "Mistral-7B": (MistralConfig, MistralForCausalLM, dict(hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
    "Qwen2.5-7B": (Qwen2Config, Qwen2ForCausalLM, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
}  # fmt: skip
ADAPTERS = [  # (rank, target modules)
    (8, ["q_proj", "v_proj"]),
    (16, ["q_proj", "v_proj"]),
    (8, "all-linear"),
    (64, "all-linear"),
]


def materialize_adapter(model: torch.nn.Module) -> None:
    """Replace the adapter's meta parameters with real zeros of the same shape and dtype (the base stays meta)."""
    wanted = {id(tensor) for _, tensor in adapter_slots(model, "default")}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in wanted:
                module._parameters[name] = torch.nn.Parameter(
                    torch.zeros(parameter.shape, dtype=parameter.dtype), requires_grad=parameter.requires_grad
                )


def measure(architecture: str, rank: int, targets, work: Path) -> dict:
    config_class, model_class, shape = ARCHITECTURES[architecture]
    with torch.device("meta"):
        model = model_class(config_class(**shape, max_position_embeddings=4096)).to(torch.bfloat16)
    base_parameters = sum(p.numel() for p in model.parameters())
    loratune.add_adapter(model, loratune.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    materialize_adapter(model)
    adapter_parameters = sum(t.numel() for _, t in adapter_slots(model, "default"))
    sizes = {}
    for compress in (None, "int8"):
        where = work / f"{architecture}-{rank}-{compress}"
        path = loratune.save_adapter(model, where, base_model_name_or_path=architecture, compress=compress)
        sizes[compress] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {
        "base": architecture,
        "r": rank,
        "targets": targets if isinstance(targets, str) else ",".join(targets),
        "base_parameters": base_parameters,
        "base_bf16_bytes": base_parameters * 2,
        "adapter_parameters": adapter_parameters,
        "adapter_file_bytes": sizes[None],
        "adapter_int8_file_bytes": sizes["int8"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, help="write the raw numbers here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(a, r, t, Path(work)) for a in ARCHITECTURES for r, t in ADAPTERS]
    print("| base (bf16 checkpoint) | adapter | parameters | file | int8 file | share of the base |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        share = row["adapter_file_bytes"] / row["base_bf16_bytes"]
        print(
            f"| {row['base']} ({row['base_bf16_bytes'] / 1e9:.1f} GB) | r={row['r']} {row['targets']} "
            f"| {row['adapter_parameters'] / 1e6:.1f}M | {row['adapter_file_bytes'] / 1e6:.1f} MB "
            f"| {row['adapter_int8_file_bytes'] / 1e6:.1f} MB | {share:.2%} |"
        )
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
