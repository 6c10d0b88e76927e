"""``loratune export-gguf``: an adapter in llama.cpp's GGUF LoRA format."""

from __future__ import annotations

from pathlib import Path

from loratune.cli.options import base_model_for, finite_float
from loratune.cli.writes import Writes, inputs_of, model_inputs

NAME = "export-gguf"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "export an adapter to llama.cpp's GGUF LoRA format (llama-cli --lora FILE.gguf)",
        "Write the adapter as a GGUF LoRA file that llama.cpp loads next to a GGUF of its base model with "
        "--lora: tensor names, shapes and metadata as llama.cpp's convert_lora_to_gguf.py writes them, Llama "
        "q/k rows permuted like the base's. Per-module alpha, rsLoRA and --scale are folded into lora_b. "
        "Refused: modules_to_save, LoRA on a tied output head or tied embeddings, architectures other than "
        "Llama, Mistral and Qwen2.",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (PEFT format)")
    p.add_argument("--out", "-o", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="M",
        help="the base model (alias, .gguf or HF directory; only its config is read); default: the "
        "adapter's base_model_name_or_path",
    )
    p.add_argument(
        "--dtype",
        choices=["f32", "f16", "bf16"],
        default="f32",
        help="tensor type of lora_a/lora_b (default: f32, as llama.cpp's converter)",
    )
    p.add_argument("--scale", type=finite_float, default=1.0, help="strength baked into the file (default: 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf that loratune wrote")


def writes(args) -> Writes:
    inputs = inputs_of([("the adapter", args.adapter)], model_inputs(args.model))
    return Writes(args.out, inputs, kind="file", overwrite=args.overwrite, what="GGUF file", record_kind="gguf-lora")


def run(args) -> int:
    from loratune.adapters.gguf_export import export_gguf
    from loratune.models.base_config import base_model_config

    out = Path(args.out)
    base_config = base_model_config(base_model_for(args, adapters=[args.adapter]))
    lora = export_gguf(args.adapter, out, base_config, dtype=args.dtype, scale=args.scale, overwrite=args.overwrite)
    folded = f", scaling folded into lora_b for {len(lora.folded)} modules" if lora.folded else ""
    print(f"wrote {out}: {len(lora.tensors) // 2} LoRA pairs, alpha {lora.alpha:g}, {args.dtype}{folded}")
    return 0
