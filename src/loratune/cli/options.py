"""Argument types of the ``loratune`` command line: every option is checked where it is parsed, so a value
that cannot mean anything is a one-line usage error before any model is loaded."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

DTYPE_CHOICES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")


class Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr (exit status 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_options(parser: argparse.ArgumentParser, dtype: bool = True, adapters: bool = True) -> None:
    """``--model`` (and ``--adapter``, ``--dtype``), ``--device``, ``--trust-remote-code`` and ``--quantize``: how a
    verb that runs a model loads it."""
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="M",
        help="base model: alias, .gguf or HF directory (default: the base recorded in the adapter; "
        "without an adapter, smollm2-135m)",
    )
    if adapters:
        parser.add_argument(
            "--adapter",
            "-a",
            action="append",
            default=[],
            type=adapter_spec,
            metavar="DIR[:SCALE]",
            help="adapter directory (PEFT format) with an optional strength; repeatable",
        )
    if dtype:
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=DTYPE_CHOICES,
            metavar="DTYPE",
            help="auto (bf16 where supported), bf16, fp16 or fp32",
        )
    parser.add_argument("--device", default="auto", type=device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    parser.add_argument(
        "--quantize",
        choices=("nf4", "fp4"),
        default=None,
        help="load the base with its Linear layers in 4 bits, as a QLoRA run trained it (automatic "
        "for a model stored in 4 bits); safetensors bases stream tensor by tensor, a .gguf base "
        "is converted through transformers, which holds the whole model (fine for small models)",
    )


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(text: str, kind, lowest, message: str):
    value = _number(text, kind, "an integer" if kind is int else "a number")
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be {message}, got {value:g}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    return _at_least(text, int, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    return _at_least(text, int, 0, "0 or more")


def non_negative_float(text: str) -> float:
    """A number ≥ 0."""
    return _at_least(text, float, 0, "0 or more")


def seed(text: str) -> int:
    """A random seed: an integer from -2^63 to 2^64 - 1 (what torch's generators take)."""
    value = _number(text, int, "an integer")
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be from -2^63 to 2^64-1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds, above 0."""
    value = _number(text, float, "a number of seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {value:g}")
    return value


def non_negative_seconds(text: str) -> float:
    """A duration in seconds, 0 or more."""
    return _at_least(text, float, 0, "0 seconds or more")


def port(text: str) -> int:
    """A TCP port: 1 to 65535."""
    value = _number(text, int, "a port number")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {value}")
    return value


def finite_float(text: str) -> float:
    """Any finite number."""
    return _number(text, float, "a number")


def temperature(text: str) -> float:
    """A sampling temperature: 0 (greedy) or more."""
    return _at_least(text, float, 0, "0 (greedy) or more")


def probability(text: str) -> float:
    """A probability mass in (0, 1], as top-p takes."""
    value = _number(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def density(text: str) -> float:
    """A fraction of entries kept, in (0, 1]."""
    return probability(text)


def mix_rank(text: str) -> int | str:
    """A rank ≥ 1, or ``full`` (exact: the numerical rank)."""
    return "full" if text.strip().lower() == "full" else positive_int(text)


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` ...: anything torch parses as a device."""
    if text.strip().lower() == "auto":
        return "auto"
    import torch

    try:
        torch.device(text.strip())
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    return text.strip()


def adapter_spec(value: str) -> tuple[str, float]:
    """``DIR[:SCALE]``: split at the last colon when what follows parses as a number.

    When ``DIR`` exists but ``DIR:TEXT`` does not and ``TEXT`` is no number, the scale is what is wrong.
    """
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            if head and os.path.exists(head) and not os.path.exists(value):
                raise argparse.ArgumentTypeError(
                    f"the strength {tail!r} in {value!r} is not a number; write DIR:SCALE, e.g. {head}:0.5"
                ) from None
        else:
            if not math.isfinite(scale):
                raise argparse.ArgumentTypeError(f"the strength in {value!r} must be a finite number")
            return head, scale
    return value, 1.0


def energy_list(text: str) -> list[float]:
    """Comma-separated energy thresholds, each in (0, 1] (e.g. ``0.5,0.9,0.99``)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give one or more thresholds in (0, 1], e.g. 0.5,0.9,0.99")
    return [probability(part) for part in parts]


def retain_source(text: str) -> str:
    """A retain set: an existing data file, or ``builtin``."""
    if text != "builtin" and not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file (give a data file, or 'builtin')")
    return text


def add_adapter_output(parser, default_format: str) -> None:
    """``--out``, ``--format`` and ``--overwrite`` of a verb that writes an adapter in either file format
    (``default_format`` says, in the help, which format it writes unless told)."""
    parser.add_argument(
        "--out", required=True, metavar="OUT", help="directory for a PEFT adapter, FILE.safetensors for a kohya file"
    )
    from loratune.adapters.convert import FORMATS

    parser.add_argument(
        "--format", choices=FORMATS, default=None, help=f"format of the result (default: {default_format})"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUT that loratune wrote (see OVERWRITE)"
    )


DEFAULT_MODEL = "smollm2-135m"


def base_model_for(args, adapters=None) -> str:
    """``--model`` when given; else the base the adapters record (the alias of a built-in model); with no
    adapter either, the built-in model. Every adapter's config is read, so a wrong path fails before any
    model loads. Raises ``ConfigError`` when the adapters record different bases or none."""
    from loratune.adapters import read_adapter_config
    from loratune.errors import ConfigError, ModelNotFoundError
    from loratune.models.base_config import model_name_for
    from loratune.models.loader import resolve_model_dir

    paths = [path for path, _ in args.adapter] if adapters is None else list(adapters)
    recorded = {str(path): read_adapter_config(path).base_model_name_or_path for path in paths}
    if args.model:
        return args.model
    if not paths:
        return DEFAULT_MODEL
    names = set(recorded.values())
    if None in names:
        missing = next(path for path, name in recorded.items() if name is None)
        raise ConfigError(f"adapter {missing} records no base model; pass --model M")
    if len(names) > 1:
        listed = ", ".join(f"{path}: {name}" for path, name in recorded.items())
        raise ConfigError(f"the adapters record different base models ({listed}); pass --model M")
    name = model_name_for(names.pop())
    try:
        resolve_model_dir(name)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"base model recorded in the adapter: {exc}; pass --model M") from None
    return name
