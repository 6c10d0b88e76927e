"""``loratune convert``: an image-model LoRA between the kohya, PEFT and diffusers formats, losslessly."""

from __future__ import annotations

from loratune.cli.writes import Writes, inputs_of
from loratune.errors import ConfigError

NAME = "convert"


def add_parser(verb) -> None:
    from loratune.adapters.convert import CONVERT_FORMATS

    p = verb(
        NAME,
        "convert an image-model LoRA between the kohya (Civitai / A1111), PEFT and diffusers formats",
        "Convert losslessly (tensors copied bit for bit; each module's scale kept) between: kohya, one "
        ".safetensors file (lora_unet_*, lora_te*); peft, a directory (the UNet's adapter at OUT, each text "
        "encoder's in OUT/text_encoder/ and OUT/text_encoder_2/; a single UNet adapter is one too); diffusers, "
        "the single file diffusers' save_lora_weights writes (unet.*, text_encoder.*). Reading a kohya file "
        "needs the model's module names: --model is a diffusers pipeline directory (model_index.json, unet/, "
        "text_encoder/), a UNet directory or its config.json; only configs are read, no weights.",
    )
    p.add_argument(
        "source", metavar="FILE_OR_DIR", help="a kohya or diffusers .safetensors file, or a PEFT adapter directory"
    )
    p.add_argument("--to", required=True, choices=CONVERT_FORMATS, help="the format to write")
    p.add_argument("--model", "-m", metavar="DIFFUSERS_DIR", help="the model a kohya file is for (to read its names)")
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="directory (--to peft) or FILE.safetensors (--to kohya, --to diffusers)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUT that loratune wrote (see OVERWRITE)"
    )


def writes(args) -> Writes:
    inputs = inputs_of([("the LoRA", args.source), ("the model", args.model)])
    if args.to == "peft":
        return Writes(args.out, inputs, overwrite=args.overwrite)
    return Writes(args.out, inputs, kind="file", overwrite=args.overwrite, record_kind=f"{args.to}-lora")


def run(args) -> int:
    from loratune.adapters.convert import kohya_to_peft, peft_to_kohya, source_format, to_diffusers_file
    from loratune.models.diffusers_names import diffusers_module_paths

    kind = source_format(args.source)
    if kind == args.to:
        raise ConfigError(f"{args.source} is in the {kind} format already; --to names the format to write")
    module_paths = diffusers_module_paths(args.model) if args.model is not None else None
    if args.to == "peft":
        counts = kohya_to_peft(
            args.source, args.out, module_paths, base_model=args.model and str(args.model), overwrite=args.overwrite
        )
    elif args.to == "kohya":
        counts = peft_to_kohya(args.source, args.out, overwrite=args.overwrite)
    else:
        counts = to_diffusers_file(args.source, args.out, module_paths, overwrite=args.overwrite)
    parts = ", ".join(f"{component}: {n} modules" for component, n in counts.items())
    print(f"converted {args.source} ({kind}) -> {args.out} ({args.to}; {parts})")
    return 0
