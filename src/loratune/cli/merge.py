"""``loratune merge``: adapters merged into the base, written as a plain Hugging Face model directory."""

from __future__ import annotations

import json

from loratune.cli.loading import classifier_labels
from loratune.cli.options import add_model_options, base_model_for
from loratune.cli.writes import Writes, adapter_inputs, inputs_of, model_inputs
from loratune.errors import ConfigError

NAME = "merge"


def add_parser(verb) -> None:
    p = verb(
        NAME,
        "merge adapters into the base and write a plain Hugging Face model directory",
        "Write base + Σ strength·s·B·A into the weights (float32 math) and save a safetensors model directory "
        "with tokenizer and chat template that plain transformers loads, with zero adapter latency. The base "
        "loads at its stored precision and the result keeps it unless --out-dtype says otherwise. "
        "Over a 4-bit base (--quantize): dequantize it to float32, add the adapters in float32 and write "
        "--out-dtype (bf16 by default); --requantize instead writes a 4-bit model and reports the error "
        "re-quantizing adds.",
    )
    add_model_options(p, dtype=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing DIR that loratune wrote (see OVERWRITE)"
    )
    p.add_argument(
        "--out-dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="dtype of the written weights (default: the base's stored dtype; bf16 over a 4-bit base)",
    )
    p.add_argument(
        "--requantize",
        action="store_true",
        help="with a 4-bit base: re-quantize the merged weights and write a 4-bit model "
        "(bitsandbytes format); prints the relative error re-quantizing adds",
    )


def writes(args) -> Writes:
    inputs = inputs_of(adapter_inputs(args.adapter), model_inputs(args.model))
    return Writes(args.out, inputs, overwrite=args.overwrite)


def run(args) -> int:
    from loratune.models.merge import merge_to_directory
    from loratune.train.intrinsic import is_intrinsic_dir, merge_intrinsic

    if not args.adapter:
        raise ConfigError("merge needs at least one --adapter DIR[:SCALE]")
    if any(is_intrinsic_dir(path) for path, _ in args.adapter):
        if len(args.adapter) != 1 or args.adapter[0][1] != 1.0 or args.quantize:
            raise ConfigError("an intrinsic-dimension artefact merges alone, at strength 1, into an unquantized base")
        out, name = merge_intrinsic(
            args.adapter[0][0],
            args.out,
            model=args.model,
            out_dtype=args.out_dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
            overwrite=args.overwrite,
        )
        print(f"merged {args.adapter[0][0]} (intrinsic dimension) into {name} -> {out}")
        return 0
    model = base_model_for(args)
    labels = classifier_labels(args, model)
    extras = {"labels.json": json.dumps(labels.to_json(), indent=2) + "\n"} if labels is not None else None
    result = merge_to_directory(
        model,
        args.adapter,
        args.out,
        out_dtype=args.out_dtype,
        quantize=args.quantize,
        requantize=args.requantize,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        labels=labels,
        extras=extras,
    )
    names = ", ".join(f"{path}:{scale:g}" for path, scale in args.adapter)
    dtype = str(result.dtype).removeprefix("torch.")
    report = result.requantize_report
    if report is None:
        print(f"merged {names} into {model} -> {result.path} ({dtype})")
        return 0
    vs_delta = report.get("error_vs_delta")
    print(
        f"merged {names} into {model} and re-quantized to {result.quantize} -> {result.path}; re-quantizing adds "
        f"a relative weight error of {report['relative_error']:.4f} (worst layer "
        f"{report['worst_layer_relative_error']:.4f})"
        + (f", {vs_delta:.2f}x the size of the merged adapter change" if vs_delta is not None else "")
    )
    return 0
