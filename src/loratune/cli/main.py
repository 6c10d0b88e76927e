"""``loratune <verb> ...``: parse, validate, call the API, print.

A user error (bad config, missing file, wrong adapter) prints one line on stderr and exits with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

from loratune.cli import (
    compare,
    compress,
    convert,
    data,
    evaluate,
    export_gguf,
    extract,
    generate,
    inspect_adapter,
    merge,
    mix,
    predict,
    rank,
    resize,
    serve,
    sweep,
    train,
)
from loratune.cli.options import Parser
from loratune.errors import LoratuneError

# Each verb is a module: NAME, add_parser(verb), writes(args) -> Writes (what it writes and reads, for the guard
# every writing verb goes through) and run(args) -> exit status. In the order ``--help`` lists them.
VERBS = (
    train,
    data,
    evaluate,
    predict,
    generate,
    merge,
    export_gguf,
    mix,
    convert,
    compress,
    rank,
    resize,
    extract,
    compare,
    sweep,
    serve,
    inspect_adapter,
)

EPILOG = """\
models (M): a Hugging Face model directory, a .gguf file (converted once into ~/.cache/loratune and
loaded whole through transformers), or an alias: smollm2-135m (the built-in SmolLM2-135M-Instruct).
4-bit bases (--quantize, model.quantize): safetensors directories stream tensor by tensor, never holding
the full-precision model; a .gguf base is converted once through transformers, which holds the whole model
(fine for small models).
adapters: DIR or DIR:SCALE (strength, e.g. runs/x/adapter:0.5); repeat --adapter to combine several.
Without --model, a verb that takes adapters uses the base model they record.
OVERWRITE: --overwrite replaces only an output loratune wrote: every output records each file written
(size and checksum) in .loratune-output.json (a single file: in .NAME.loratune-output.json beside it), and
--overwrite refuses when anything else is there or a file changed since. It refuses the current directory,
its parents, your home directory, a filesystem root, and an output that is, contains or lies inside one of
the command's inputs. The new output is built beside the old one and swapped in, so the old one stays whole
if anything fails. One command at a time writes an output: a second one says which process has it.
"""


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
        return verbs.add_parser(
            name,
            help=help_text,
            description=description or help_text,
            epilog=EPILOG,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for module in VERBS:
        module.add_parser(verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loratune`` command; returns the exit status.

    0 on success; 2 for a user error (one line on stderr: what is wrong and what to do); 128 + the signal when
    stopped by one (130: Ctrl-C, 143: SIGTERM, 129: SIGHUP); 1 for an unexpected failure (a bug: one line,
    ``--debug`` shows the traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # what a stopped verb says to run again
    verb = f"loratune {args.verb}"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep transformers' load chatter off the terminal
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-load "Loading weights" bar; ours shows training progress
    # bitsandbytes (imported by PEFT, diffusers and 4-bit loading) notes on every start that an optional CPU
    # kernel package is missing; nothing the user needs to act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from loratune import signals
    from loratune.cli.writes import guarded

    module = next(m for m in VERBS if args.verb == m.NAME)
    notices = _show_notices(verb)
    # Warnings (e.g. an adapter trained on another base) as one line each, like errors, whatever filters the
    # caller set; restored afterwards (main() also runs in-process: tests, notebooks).
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = lambda message, *_, **__: print(f"{verb}: warning: {message}", file=sys.stderr)
        try:
            with signals.stop_on_signals(), guarded(module.writes(args)):
                return module.run(args) or 0
        except Exception as error:
            if args.debug:
                raise
            status, message = describe_failure(error)
            if os.environ.get("RANK", "0") == "0":  # a distributed run's processes fail together; one says why
                print(f"{verb}: {' '.join(message.splitlines())}", file=sys.stderr)  # one line, whatever it quotes
            return status
        except KeyboardInterrupt as stop:
            if args.debug:
                raise
            signum = signals.signal_of(stop)
            print(f"{verb}: {'interrupted' if signum == signal.SIGINT else f'stopped by {stop}'}", file=sys.stderr)
            return 128 + signum
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
        return 2, (
            "error: out of memory; lower the batch size or max_length, or load the model in 4 bits "
            "(--quantize nf4 / model.quantize: nf4)"
        )
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return 1, (
        f"internal error: {type(error).__name__}: {first} — this is a bug in loratune; "
        "run again with --debug for the traceback and report it"
    )


def _show_notices(verb: str) -> logging.Handler:
    """Show the library's notices (e.g. converting the built-in model on first use) as ``VERB: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{verb}: %(message)s"))
    logger = logging.getLogger("loratune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def entry() -> None:
    """The ``loratune`` command: ``main()`` with stop signals handled from the first import to the process's
    exit, so a signal during start-up stops it quietly (128 + the signal) and one after a stop is acknowledged."""
    from loratune import signals

    signals.handle_for_process()
    try:
        status = main()
    except KeyboardInterrupt as stop:  # before main()'s own handling began (parsing, imports)
        status = 128 + signals.signal_of(stop)
    if signals.stopped_by() is not None:
        signals.ignore_for_exit()
    sys.exit(status)


if __name__ == "__main__":
    entry()
