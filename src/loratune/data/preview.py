"""Human-readable views of a dataset for ``loratune data``: examples as the model sees them, with the trained
tokens marked, and a table of length statistics."""

from __future__ import annotations

import re
from collections.abc import Sequence

from loratune.data.dataset import DataStats, LengthStats
from loratune.data.tokenize import IGNORE_INDEX, TokenizedExample

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def segments(example: TokenizedExample, tokenizer) -> list[tuple[str, bool]]:
    """Return the example's text as ``(decoded text, trained)`` runs of consecutive tokens, in order.

    Special tokens are shown as written (``<|im_end|>``). A character split across two runs (a multi-byte
    character in byte-level BPE) may show as a replacement character.
    """
    runs: list[tuple[str, bool]] = []
    start = 0
    ids, labels = example.input_ids, example.labels
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((tokenizer.decode(ids[start:end], skip_special_tokens=False), labels[start] != IGNORE_INDEX))
            start = end
    return runs


def _header(example: TokenizedExample, index: int, total: int) -> str:
    counts = f"{len(example)} tokens, {example.n_trained} trained"
    return f"── example {index + 1} of {total} · {example.location} · {counts} ──"


def render_preview(examples: Sequence[TokenizedExample], tokenizer, n: int = 3) -> str:
    """Return the first ``n`` examples as plain text as the model sees them, trained spans wrapped in
    ``[[...]]`` (everything outside the brackets is context only), each under a one-line header."""
    blocks = []
    for index, example in enumerate(examples[:n]):
        body = "".join(
            f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text
            for text, trained in segments(example, tokenizer)
        )
        blocks.append(_header(example, index, len(examples)) + "\n" + body)
    return "\n\n".join(blocks)


_RICH_TAG = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def _escape_rich(text: str) -> str:
    """Escape text for rich markup (as ``rich.markup.escape`` does), without importing rich here."""
    text = _RICH_TAG.sub(lambda match: f"{match.group(1)}{match.group(1)}\\{match.group(2)}", text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        text += "\\"
    return text


def render_preview_rich(examples: Sequence[TokenizedExample], tokenizer, n: int = 3, style: str = "bold green") -> str:
    """Like ``render_preview`` but returns rich console markup: trained spans in ``style``, headers dim."""
    blocks = []
    for index, example in enumerate(examples[:n]):
        body = "".join(
            f"[{style}]{_escape_rich(text)}[/]" if trained else _escape_rich(text)
            for text, trained in segments(example, tokenizer)
        )
        blocks.append(f"[dim]{_escape_rich(_header(example, index, len(examples)))}[/]\n{body}")
    return "\n\n".join(blocks)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0.0%"


def _length_row(name: str, lengths: LengthStats) -> str:
    return (
        f"  {name:<16}{lengths.count:>8}{lengths.min:>8}{lengths.mean:>9.1f}"
        f"{lengths.median:>9.1f}{lengths.p95:>8}{lengths.max:>8}"
    )


def format_stats(stats: DataStats) -> str:
    """Return a plain-text summary: rows kept and dropped, how many rows ``max_length`` touches and what
    happened to them, token totals, and a table of token-length statistics before and after the limit."""
    limit = "none" if stats.max_length is None else str(stats.max_length)
    lines = [
        f"data: {stats.path} (format {stats.format})",
        f"rows: {stats.rows_read} read, {stats.kept} kept",
        f"longer than max_length ({limit}): {stats.too_long} ({_percent(stats.too_long, stats.rows_read)}); "
        f"truncation: {stats.truncation} -> {stats.truncated} truncated, {stats.dropped_too_long} dropped",
        f"dropped with no trained token (left): {stats.dropped_no_target}",
        f"tokens: {stats.total_tokens} in kept rows, {stats.trained_tokens} trained "
        f"({_percent(stats.trained_tokens, stats.total_tokens)})",
        "",
        f"  {'token lengths':<16}{'rows':>8}{'min':>8}{'mean':>9}{'median':>9}{'p95':>8}{'max':>8}",
        _length_row("all rows", stats.lengths_before),
        _length_row("kept (limited)", stats.lengths),
    ]
    return "\n".join(lines)
