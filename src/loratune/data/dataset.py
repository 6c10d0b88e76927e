"""A data file → tokenized, length-limited examples with statistics; a deterministic eval split.

Plain Python lists, no ``datasets``: rows are rendered and tokenized in batches through the fast
tokenizer, which is where the time goes (``datasets.map`` over the same function is no faster).
"""

from __future__ import annotations

import math
import os
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from loratune.data.formats import Example, check_format_name, detect_format, to_example
from loratune.data.readers import read_rows
from loratune.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_examples
from loratune.errors import ConfigError

TRUNCATION_MODES = ("truncate", "drop")
T = TypeVar("T")


@dataclass(frozen=True)
class LengthStats:
    """Token-length statistics of a set of examples (all zero when there are none)."""

    count: int
    min: int
    mean: float
    median: float
    p95: int
    max: int
    total: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        """Return the statistics of ``lengths`` (p95 by nearest rank)."""
        if not lengths:
            return cls(0, 0, 0.0, 0.0, 0, 0, 0)
        ordered = sorted(lengths)
        total = sum(ordered)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(len(ordered), ordered[0], total / len(ordered), statistics.median(ordered), p95, ordered[-1], total)


@dataclass(frozen=True)
class DataStats:
    """What building a dataset did: ``rows_read == kept + dropped_too_long + dropped_no_target``.

    ``too_long`` counts rows longer than ``max_length`` (whatever happened to them); ``truncated`` those cut
    and kept; ``dropped_too_long`` those dropped by ``truncation="drop"``; ``dropped_no_target`` those with
    no trained token (left), e.g. an answer truncated away. ``lengths`` describes the kept examples (after
    truncation), ``lengths_before`` every row before truncation. ``trained_tokens`` counts tokens that
    contribute to the loss in the kept examples.
    """

    path: str
    format: str
    max_length: int | None
    truncation: str
    rows_read: int
    too_long: int
    truncated: int
    dropped_too_long: int
    dropped_no_target: int
    kept: int
    lengths: LengthStats
    lengths_before: LengthStats
    total_tokens: int
    trained_tokens: int


def read_examples(
    path: str | os.PathLike, format: str = "auto", *, require_target: bool = True
) -> tuple[list[Example], str]:
    """Read a data file and convert every row; return ``(examples, format name)``.

    ``format="auto"`` detects the format from the first row; every row must then be in that format.
    ``require_target=False`` accepts chats without an assistant turn and prompts without completions.
    Raises ``DataError`` (file and line) for unreadable files and bad rows, ``ConfigError`` for an unknown
    format name.
    """
    check_format_name(format)
    examples: list[Example] = []
    fmt = None if format == "auto" else format
    for location, row in read_rows(path):
        if fmt is None:
            fmt = detect_format(row, location)
        examples.append(to_example(row, fmt, location, require_target=require_target))
    return examples, fmt


def check_length_options(max_length: int | None, truncation: str) -> None:
    """Raise ``ConfigError`` unless ``max_length`` is None or a positive int and ``truncation`` is a known mode."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ConfigError(f"data.max_length must be a positive integer or null, got {max_length!r}")
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"data.truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")


def _has_target(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def build_dataset(
    path: str | os.PathLike,
    tokenizer,
    *,
    format: str = "auto",
    max_length: int | None = 512,
    truncation: str = "truncate",
    train_on_prompt: bool = False,
) -> tuple[list[TokenizedExample], DataStats]:
    """Read, convert, tokenize and length-limit a data file; return ``(examples, stats)``.

    Rows longer than ``max_length`` tokens keep their first ``max_length`` tokens (``truncation="truncate"``)
    or are dropped (``"drop"``); rows left with no trained token are dropped. Kept examples stay in file order.
    Raises ``DataError`` for bad files or rows (naming file and line) and ``ConfigError`` for bad options.
    """
    check_length_options(max_length, truncation)
    examples, fmt = read_examples(path, format)
    tokenized = tokenize_examples(examples, tokenizer, train_on_prompt=train_on_prompt)

    kept: list[TokenizedExample] = []
    too_long = truncated = dropped_too_long = dropped_no_target = 0
    for example in tokenized:
        if max_length is not None and len(example) > max_length:
            too_long += 1
            if truncation == "drop":
                dropped_too_long += 1
                continue
            cut = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length], example.location)
            if not _has_target(cut.labels):
                dropped_no_target += 1
                continue
            truncated += 1
            kept.append(cut)
        elif not _has_target(example.labels):
            dropped_no_target += 1
        else:
            kept.append(example)

    stats = DataStats(
        path=str(path),
        format=fmt,
        max_length=max_length,
        truncation=truncation,
        rows_read=len(tokenized),
        too_long=too_long,
        truncated=truncated,
        dropped_too_long=dropped_too_long,
        dropped_no_target=dropped_no_target,
        kept=len(kept),
        lengths=LengthStats.of([len(example) for example in kept]),
        lengths_before=LengthStats.of([len(example) for example in tokenized]),
        total_tokens=sum(len(example) for example in kept),
        trained_tokens=sum(example.n_trained for example in kept),
    )
    return kept, stats


def split_eval(examples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split off a random ``fraction`` of ``examples`` for evaluation; return ``(train, eval)``.

    Deterministic for a given ``seed``; both parts keep the original order. A positive fraction of at least
    two examples gives at least one eval example and leaves at least one for training. Raises ``ConfigError``
    unless ``0 <= fraction < 1``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"data.eval_split must be a fraction in [0, 1), got {fraction!r}")
    n = len(examples)
    n_eval = round(n * fraction)
    if fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [example for index, example in enumerate(examples) if index not in chosen]
    held_out = [example for index, example in enumerate(examples) if index in chosen]
    return train, held_out
