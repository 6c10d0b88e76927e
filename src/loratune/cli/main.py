"""``loratune <verb> ...``: parse, validate, call the API, print.

A user error (bad config, missing file, wrong adapter) prints one line on stderr and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from loratune.errors import LoratuneError

EPILOG = """\
models (M): a Hugging Face model directory, a .gguf file (converted once into ~/.cache/loratune and
loaded whole through transformers), or an alias: smollm2-135m (the built-in SmolLM2-135M-Instruct).
4-bit bases (--quantize, model.quantize): safetensors directories stream tensor by tensor, never holding
the full-precision model; a .gguf base is converted once through transformers, which holds the whole model
(fine for small models).
adapters: DIR or DIR:SCALE (strength, e.g. runs/x/adapter:0.5); repeat --adapter to combine several.
"""


def adapter_spec(value: str) -> tuple[str, float]:
    """``DIR[:SCALE]``: split at the last colon when what follows parses as a number."""
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, 1.0


def _model_options(parser: argparse.ArgumentParser, adapters: bool = True) -> None:
    parser.add_argument("--model", "-m", default="smollm2-135m", help="base model: alias, .gguf or HF directory (default: smollm2-135m)")
    if adapters:
        parser.add_argument("--adapter", "-a", action="append", default=[], type=adapter_spec, metavar="DIR[:SCALE]",
                            help="adapter directory (PEFT format) with an optional strength; repeatable")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where supported), bf16, fp16 or fp32")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    parser.add_argument("--quantize", choices=("nf4", "fp4"), default=None,
                        help="load the base with its Linear layers in 4 bits, as a QLoRA run trained it (automatic "
                             "for a model stored in 4 bits); safetensors bases stream tensor by tensor, a .gguf base "
                             "is converted through transformers, which holds the whole model (fine for small models)")


def build_parser() -> argparse.ArgumentParser:
    from loratune import __version__

    parser = argparse.ArgumentParser(
        prog="loratune",
        description="Fine-tune language models with LoRA; adapters in PEFT's format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loratune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    common = argparse.ArgumentParser(add_help=False)  # --debug also after the verb
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    def verb(name, help_text, description=None):
        return verbs.add_parser(name, help=help_text, description=description or help_text, epilog=EPILOG,
                                parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)

    p = verb("train", "fine-tune an adapter as a YAML config says",
             "Fine-tune a LoRA adapter. Writes OUTPUT_DIR/adapter (PEFT format + tokenizer), checkpoints/, "
             "metrics.jsonl, config.yaml, loss.png and summary.json.")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted key, YAML value (e.g. --set train.lr=1e-4); repeatable")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a live progress bar")

    p = verb("data", "preview the training data as the model will see it, with length statistics")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-n", "--examples", type=int, default=3, help="how many examples to show (default: 3)")

    p = verb("eval", "loss, perplexity and exact match of a model (+ adapters) on a data file")
    _model_options(p)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet in a supported format")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--max-length", type=int, default=512, help="truncate longer rows (default: 512)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N rows")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation limit for exact match (default: 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-exact-match", action="store_true", help="skip generation; loss and perplexity only")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = verb("generate", "generate text from a prompt (chat-formatted unless --raw), streamed to the terminal",
             "Generate from --prompt, or chat interactively when no --prompt is given. The prompt goes through the "
             "model's chat template, exactly as chat-style training data did, unless --raw.")
    _model_options(p)
    p.add_argument("--prompt", "-p", help="the prompt; without it, an interactive chat on stdin")
    p.add_argument("--system", help="a system message (chat format only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as written, no chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")

    p = verb("merge", "merge adapters into the base and write a plain Hugging Face model directory",
             "Write base + Σ strength·s·B·A into the weights (float32 math) and save a safetensors model directory "
             "with tokenizer and chat template that plain transformers loads, with zero adapter latency. "
             "Over a 4-bit base (--quantize): dequantize it to float32, add the adapters in float32 and write "
             "--out-dtype (bf16 by default); --requantize instead writes a 4-bit model and reports the error "
             "re-quantizing adds.")
    _model_options(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    p.add_argument("--out-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the written weights (default: bf16 over a 4-bit base, else the load --dtype)")
    p.add_argument("--requantize", action="store_true",
                   help="with a 4-bit base: re-quantize the merged weights and write a 4-bit model "
                        "(bitsandbytes format); prints the relative error re-quantizing adds")

    p = verb("export-gguf", "export an adapter to llama.cpp's GGUF LoRA format (llama-cli --lora FILE.gguf)",
             "Write the adapter as a GGUF LoRA file that llama.cpp loads next to a GGUF of its base model with "
             "--lora: tensor names, shapes and metadata as llama.cpp's convert_lora_to_gguf.py writes them, Llama "
             "q/k rows permuted like the base's. Per-module alpha, rsLoRA and --scale are folded into lora_b. "
             "Refused: modules_to_save, LoRA on a tied output head or tied embeddings, architectures other than "
             "Llama, Mistral and Qwen2.")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter directory (PEFT format)")
    p.add_argument("--out", "-o", required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--model", "-m", default=None, metavar="M",
                   help="the base model (alias, .gguf or HF directory; only its config is read); default: the "
                        "adapter's base_model_name_or_path")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                   help="tensor type of lora_a/lora_b (default: f32, as llama.cpp's converter)")
    p.add_argument("--scale", type=float, default=1.0, help="strength baked into the file (default: 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf")

    _mix_and_compress_verbs(verb)

    p = verb("inspect", "describe an adapter directory: base model, rank, targets, parameters, size")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _mix_and_compress_verbs(verb) -> None:
    from loratune.adapters.mix import METHOD_DEFINITIONS, METHODS

    p = verb("mix", "combine adapters of one base into one adapter (weighted sum, SVD, linear, TIES, DARE)",
             "Combine adapters trained on the same base model into one PEFT adapter (no model is loaded). "
             "Each input is ADAPTER_DIR:WEIGHT (weight 1 when omitted; negative weights subtract).\n\n"
             + METHOD_DEFINITIONS)
    p.add_argument("adapters", nargs="*", type=adapter_spec, metavar="ADAPTER_DIR:WEIGHT",
                   help="an adapter directory and its weight; one adapter with a weight rescales it")
    p.add_argument("--method", required=True, metavar="NAME", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="rank of the result for svd (default: largest input rank) and for ties, dare_linear, "
                        "dare_ties, magnitude_prune (default: the numerical rank, i.e. exact)")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="fraction of entries kept, in (0, 1]; required by ties, dare_linear, dare_ties, magnitude_prune")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default: 0)")
    p.add_argument("--majority-sign", default="total", metavar="{total,frequency}",
                   help="TIES sign election: sign of the summed values (total, default) or of the summed signs")
    p.add_argument("--int8", action="store_true", help="write the result int8-compressed (see: loratune compress)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the mixed adapter")
    p.add_argument("--overwrite", action="store_true", help="replace the adapter files in an existing DIR")

    p = verb("compress", "write an int8-compressed copy of an adapter (about 3-4x smaller than float32)",
             "Store A and B as int8 with one float32 scale per row (symmetric absmax: scale = max|row|/127, "
             "every element within scale/2 of the original) in adapter_model.int8.safetensors. loratune loads "
             "it transparently (every --adapter option), dequantizing to the adapter dtype; PEFT refuses it.")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the compressed adapter")
    p.add_argument("--overwrite", action="store_true", help="replace the adapter files in an existing DIR")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loratune`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warnings (e.g. an adapter trained on another base) as one line each, like errors.
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_: f"loratune {args.verb}: warning: {message}\n"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep transformers' load chatter off the terminal
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load "Loading weights" bar; ours shows training progress
    from loratune.cli import commands

    handler = getattr(commands, f"run_{args.verb.replace('-', '_')}")
    try:
        return handler(args) or 0
    except LoratuneError as exc:
        if args.debug:
            raise
        print(f"loratune {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loratune {args.verb}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format  # main() also runs in-process (tests, notebooks)


if __name__ == "__main__":
    sys.exit(main())
