"""``loratune <verb> ...``: parse, validate, call the API, print.

A user error (bad config, missing file, wrong adapter) prints one line on stderr and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from loratune.cli.experiments import add_sweep_verb
from loratune.cli.options import (
    DTYPE_CHOICES,
    add_adapter_output,
    adapter_spec,
    density,
    device,
    finite_float,
    mix_rank,
    non_negative_int,
    positive_int,
    probability,
    retain_source,
    temperature,
)
from loratune.cli.rank_tools import add_rank_verbs
from loratune.cli.serve import add_serve_verb
from loratune.data.formats import FORMATS
from loratune.errors import LoratuneError

EPILOG = """\
models (M): a Hugging Face model directory, a .gguf file (converted once into ~/.cache/loratune and
loaded whole through transformers), or an alias: smollm2-135m (the built-in SmolLM2-135M-Instruct).
4-bit bases (--quantize, model.quantize): safetensors directories stream tensor by tensor, never holding
the full-precision model; a .gguf base is converted once through transformers, which holds the whole model
(fine for small models).
adapters: DIR or DIR:SCALE (strength, e.g. runs/x/adapter:0.5); repeat --adapter to combine several.
Without --model, a verb that takes adapters uses the base model they record.
OVERWRITE: --overwrite replaces only an output loratune wrote (it records what it wrote in
.loratune-output.json); it refuses the current directory, its parents, your home directory, a filesystem
root, and any directory holding other files. The new output is built beside the old one and swapped in,
so the old one stays whole if anything fails.
"""


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr (exit status 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_options(parser: argparse.ArgumentParser, dtype: bool = True, adapters: bool = True) -> None:
    parser.add_argument("--model", "-m", default=None, metavar="M",
                        help="base model: alias, .gguf or HF directory (default: the base recorded in the adapter; "
                             "without an adapter, smollm2-135m)")
    if adapters:
        parser.add_argument("--adapter", "-a", action="append", default=[], type=adapter_spec, metavar="DIR[:SCALE]",
                            help="adapter directory (PEFT format) with an optional strength; repeatable")
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, metavar="DTYPE",
                            help="auto (bf16 where supported), bf16, fp16 or fp32")
    parser.add_argument("--device", default="auto", type=device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    parser.add_argument("--quantize", choices=("nf4", "fp4"), default=None,
                        help="load the base with its Linear layers in 4 bits, as a QLoRA run trained it (automatic "
                             "for a model stored in 4 bits); safetensors bases stream tensor by tensor, a .gguf base "
                             "is converted through transformers, which holds the whole model (fine for small models)")


def build_parser() -> argparse.ArgumentParser:
    from loratune.version import __version__

    parser = Parser(
        prog="loratune",
        description="Fine-tune language models with LoRA; adapters in PEFT's format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loratune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    common = Parser(add_help=False)  # --debug also after the verb
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    def verb(name, help_text, description=None):
        return verbs.add_parser(name, help=help_text, description=description or help_text, epilog=EPILOG,
                                parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)

    p = verb("train", "fine-tune an adapter as a YAML config says",
             "Fine-tune a LoRA adapter (train.method: lora) or every weight (train.method: full, the baseline). "
             "Writes OUTPUT_DIR/adapter (PEFT format + tokenizer; OUTPUT_DIR/model for a full fine-tune), "
             "checkpoints/, metrics.jsonl, config.yaml, loss.png and summary.json.")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted key, YAML value (e.g. --set train.lr=1e-4); repeatable")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an existing run in output_dir (only a directory loratune wrote: see OVERWRITE below); "
                           "the old run stays whole until the new one completes")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a live progress bar")
    p.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="train as N processes on this machine (torchrun; DDP, or FSDP2 with --set "
                        "train.distributed=fsdp; each gets its share of the CPU threads or one GPU); the effective "
                        "batch is batch_size × grad_accum × N")

    p = verb("data", "preview the training data as the model will see it, with length statistics")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("-n", "--examples", type=non_negative_int, default=3, help="how many examples to show (default: 3)")

    p = verb("eval", "loss, perplexity and exact match of a model (+ adapters) on a data file",
             "Loss, perplexity and exact match of a language model (+ adapters) on a data file; for a classifier "
             "(an adapter or model with labels.json, trained with task: seq_cls) the loss and the GLUE metrics "
             "that fit it: accuracy, macro_f1 and mcc (Matthews), or pearson, spearman and mse for regression.")
    _model_options(p)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet in a supported format")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), metavar="FORMAT",
                   help=f"data format: auto (detected, default), {', '.join(FORMATS)}")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate longer rows (default: 512, or the model's context when shorter)")
    p.add_argument("--max-examples", type=positive_int, default=None, help="evaluate only the first N rows")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="generation limit for exact match (default: 32)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per batch (default: 32)")
    p.add_argument("--no-exact-match", action="store_true", help="skip generation; loss and perplexity only")
    p.add_argument("--retain", metavar="FILE", default=None, type=retain_source,
                   help="also the loss on FILE (or 'builtin': text smollm2-135m wrote) with the adapters and without "
                        "them: retain_loss, retain_loss_base and forgetting = their difference")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = verb("predict", "label each row of a data file with a classifier (labels and probabilities as JSONL)",
             "Run a classifier (an adapter trained with task: seq_cls, or a full fine-tune's model/ directory: "
             "either carries labels.json) over --data and write one JSON object per row: the text (and text_pair), "
             "the predicted label and the probability of each label; for regression, the score. Rows need the "
             "text columns the classifier was trained on; a label column is not needed.")
    _model_options(p)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL/JSON/CSV/TSV/Parquet rows to label")
    p.add_argument("--out", metavar="FILE.jsonl", default=None, help="write the predictions here (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate longer rows (default: 512, or the model's context when shorter)")
    p.add_argument("--max-examples", type=positive_int, default=None, help="label only the first N rows")
    p.add_argument("--batch-size", type=positive_int, default=32, help="rows per batch (default: 32)")

    p = verb("generate", "generate text from a prompt (chat-formatted unless --raw), streamed to the terminal",
             "Generate from --prompt, or chat interactively when no --prompt is given. The prompt goes through the "
             "model's chat template, exactly as chat-style training data did, unless --raw.")
    _model_options(p)
    p.add_argument("--prompt", "-p", help="the prompt; without it, an interactive chat on stdin")
    p.add_argument("--system", help="a system message (chat format only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as written, no chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation limit (default: 256)")
    p.add_argument("--temperature", type=temperature, default=0.0,
                   help="0 = greedy (default); above 0, sample from softmax(logits / T)")
    p.add_argument("--top-p", type=probability, default=None, metavar="P",
                   help="sampling: keep the smallest set of tokens with probability mass P, in (0, 1]")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K", help="sampling: keep the K most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    p = verb("merge", "merge adapters into the base and write a plain Hugging Face model directory",
             "Write base + Σ strength·s·B·A into the weights (float32 math) and save a safetensors model directory "
             "with tokenizer and chat template that plain transformers loads, with zero adapter latency. The base "
             "loads at its stored precision and the result keeps it unless --out-dtype says otherwise. "
             "Over a 4-bit base (--quantize): dequantize it to float32, add the adapters in float32 and write "
             "--out-dtype (bf16 by default); --requantize instead writes a 4-bit model and reports the error "
             "re-quantizing adds.")
    _model_options(p, dtype=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR that loratune wrote (see OVERWRITE)")
    p.add_argument("--out-dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the written weights (default: the base's stored dtype; bf16 over a 4-bit base)")
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
    p.add_argument("--scale", type=finite_float, default=1.0, help="strength baked into the file (default: 1.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf that loratune wrote")

    _mix_and_compress_verbs(verb)
    add_rank_verbs(verb)
    add_sweep_verb(verb)
    add_serve_verb(verb, _model_options)

    p = verb("inspect", "describe an adapter: base model, rank, targets, parameters, size",
             "Describe a PEFT adapter directory or a kohya .safetensors file (image-model LoRA: its components, "
             "Linear and Conv modules, ranks and alphas, and the training settings in its ss_* metadata).")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (PEFT format) or kohya .safetensors file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _mix_and_compress_verbs(verb) -> None:
    from loratune.adapters.convert import CONVERT_FORMATS
    from loratune.adapters.mix import METHOD_DEFINITIONS, METHODS

    p = verb("mix", "combine adapters of one base into one adapter (weighted sum, SVD, linear, TIES, DARE)",
             "Combine adapters trained on the same base model into one PEFT adapter (no model is loaded). "
             "Each input is ADAPTER:WEIGHT (weight 1 when omitted; negative weights subtract), a PEFT directory or "
             "a kohya .safetensors file; the result has the inputs' format unless --format says otherwise.\n\n"
             + METHOD_DEFINITIONS)
    p.add_argument("adapters", nargs="*", type=adapter_spec, metavar="ADAPTER:WEIGHT",
                   help="an adapter (directory or kohya file) and its weight; one adapter with a weight rescales it")
    p.add_argument("--method", required=True, metavar="NAME", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--rank", type=mix_rank, default=None, metavar="R",
                   help="rank of the result for svd (default: largest input rank) and for ties, dare_linear, "
                        "dare_ties, magnitude_prune (default: the sum of the input ranks; 'full': the numerical "
                        "rank, i.e. exact, which can be hundreds of MB)")
    p.add_argument("--density", type=density, default=None, metavar="D",
                   help="fraction of entries kept, in (0, 1]; required by ties, dare_linear, dare_ties, magnitude_prune")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default: 0)")
    p.add_argument("--majority-sign", default="total", choices=("total", "frequency"),
                   help="TIES sign election: sign of the summed values (total, default) or of the summed signs")
    p.add_argument("--int8", action="store_true", help="write the result int8-compressed (see: loratune compress)")
    add_adapter_output(p, "kohya when every input is a kohya file, else peft")

    p = verb("convert", "convert an image-model LoRA between the kohya (Civitai / A1111), PEFT and diffusers formats",
             "Convert losslessly (tensors copied bit for bit; each module's scale kept) between: kohya, one "
             ".safetensors file (lora_unet_*, lora_te*); peft, a directory (the UNet's adapter at OUT, each text "
             "encoder's in OUT/text_encoder/ and OUT/text_encoder_2/; a single UNet adapter is one too); diffusers, "
             "the single file diffusers' save_lora_weights writes (unet.*, text_encoder.*). Reading a kohya file "
             "needs the model's module names: --model is a diffusers pipeline directory (model_index.json, unet/, "
             "text_encoder/), a UNet directory or its config.json; only configs are read, no weights.")
    p.add_argument("source", metavar="FILE_OR_DIR", help="a kohya or diffusers .safetensors file, or a PEFT adapter directory")
    p.add_argument("--to", required=True, choices=CONVERT_FORMATS, help="the format to write")
    p.add_argument("--model", "-m", metavar="DIFFUSERS_DIR", help="the model a kohya file is for (to read its names)")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="directory (--to peft) or FILE.safetensors (--to kohya, --to diffusers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT that loratune wrote (see OVERWRITE)")

    p = verb("compress", "write an int8-compressed copy of an adapter (about 3-4x smaller than float32)",
             "Store A and B as int8 with one float32 scale per row (symmetric absmax: scale = max|row|/127, "
             "every element within scale/2 of the original) in adapter_model.int8.safetensors. loratune loads "
             "it transparently (every --adapter option), dequantizing to the adapter dtype; PEFT refuses it.")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for the compressed adapter (its tokenizer files are copied too)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR that loratune wrote (see OVERWRITE)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loratune`` command; returns the exit status.

    0 on success; 2 for a user error (one line on stderr: what is wrong and what to do); 130 when
    interrupted; 1 for an unexpected failure (a bug: one line, ``--debug`` shows the traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verb = f"loratune {args.verb}"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep transformers' load chatter off the terminal
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load "Loading weights" bar; ours shows training progress
    # bitsandbytes (imported by PEFT, diffusers and 4-bit loading) notes on every start that an optional CPU
    # kernel package is missing; nothing the user needs to act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from loratune.cli import commands

    handler = getattr(commands, f"run_{args.verb.replace('-', '_')}")
    notices = _show_notices(verb)
    # Warnings (e.g. an adapter trained on another base) as one line each, like errors, whatever filters the
    # caller set; restored afterwards (main() also runs in-process: tests, notebooks).
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = lambda message, *_, **__: print(f"{verb}: warning: {message}", file=sys.stderr)
        try:
            return handler(args) or 0
        except Exception as error:  # noqa: BLE001 - every failure becomes one line unless --debug
            if args.debug:
                raise
            status, message = describe_failure(error)
            if os.environ.get("RANK", "0") == "0":  # a distributed run's processes fail together; one says why
                print(f"{verb}: {' '.join(message.splitlines())}", file=sys.stderr)  # one line, whatever it quotes
            return status
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"{verb}: interrupted", file=sys.stderr)
            return 130
        finally:
            logging.getLogger("loratune").removeHandler(notices)


def describe_failure(error: Exception) -> tuple[int, str]:
    """(exit status, one line) for an exception that reached the command line."""
    if isinstance(error, LoratuneError):
        return 2, f"error: {error}"
    if isinstance(error, OSError):  # disk full, permission denied, a path of the wrong kind, ...
        where = f"{error.filename}: " if error.filename else ""
        return 2, f"error: {where}{error.strerror or error}"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return 2, ("error: out of memory; lower the batch size or max_length, or load the model in 4 bits "
                   "(--quantize nf4 / model.quantize: nf4)")
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return 1, (f"internal error: {type(error).__name__}: {first} — this is a bug in loratune; "
               "run again with --debug for the traceback and report it")


def _show_notices(verb: str) -> logging.Handler:
    """Show the library's notices (e.g. converting the built-in model on first use) as ``VERB: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{verb}: %(message)s"))
    logger = logging.getLogger("loratune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


if __name__ == "__main__":
    sys.exit(main())
