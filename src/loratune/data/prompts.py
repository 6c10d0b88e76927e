"""Prompt rows (GRPO's data): ``{"prompt": ..., any other columns}`` → the prompt's token ids, the columns kept for
the reward functions.

Rows are TRL's prompt-only formats, told apart by the first row (every row must then be of its kind):

    standard        {"prompt": str, ...}                   the text as it is, tokenized as SFT tokenizes a prompt
    conversational  {"prompt": [messages], ...}            rendered with the chat template and its generation prompt

The other columns (``answer``, ``pattern``, anything) are handed to the reward functions by name, one value per
completion, as TRL does. A prompt longer than ``data.max_length`` tokens keeps its last ``max_length`` tokens
(``truncation: truncate``; TRL truncates prompts on the left) or is dropped (``drop``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from loratune.data.formats import Example, chat_messages
from loratune.data.readers import read_rows
from loratune.data.tokenize import prompt_ids
from loratune.errors import ConfigError, DataError

STANDARD, CONVERSATIONAL = "standard", "conversational"


@dataclass(frozen=True)
class PromptRow:
    """One prompt: ``prompt`` (text, or a list of ``{"role", "content"}`` turns), its token ids, the row's other
    ``columns``, where it came from (``path:line``) and its ``index`` among the kept rows."""

    location: str
    prompt: str | list[dict[str, str]]
    ids: list[int]
    columns: dict = field(default_factory=dict)
    index: int = 0

    @property
    def kind(self) -> str:
        """``"standard"`` or ``"conversational"``."""
        return STANDARD if isinstance(self.prompt, str) else CONVERSATIONAL

    def __len__(self) -> int:
        """The prompt's tokens (what batching by length groups on)."""
        return len(self.ids)


@dataclass(frozen=True)
class PromptStats:
    """What reading a prompt file did: ``rows_read == kept + dropped_too_long``."""

    path: str
    kind: str
    max_length: int | None
    rows_read: int
    too_long: int
    dropped_too_long: int
    kept: int
    prompt_tokens: int


def read_prompts(path: str | os.PathLike, tokenizer, *, max_length: int | None = 512, truncation: str = "truncate"):
    """``(rows, stats)`` of a prompt file (JSONL, JSON, CSV or Parquet), kept rows in file order.

    Raises ``DataError`` naming file and line for a row without ``prompt``, a prompt of the wrong type, bad chat
    turns, a row of the other kind than the first, or an empty prompt."""
    if truncation not in ("truncate", "drop"):
        raise ConfigError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    rows: list[PromptRow] = []
    kind = None
    rows_read = too_long = dropped = 0
    for location, row in read_rows(path):
        rows_read += 1
        prompt = _prompt(row, location)
        this_kind = STANDARD if isinstance(prompt, str) else CONVERSATIONAL
        if kind is None:
            kind = this_kind
        elif this_kind != kind:
            raise DataError(
                f"{location}: a {this_kind} prompt, but the file's first row is {kind}; use one kind per file"
            )
        example = Example(location, prompt=prompt) if this_kind == STANDARD else Example(location, messages=prompt)
        ids = prompt_ids(example, tokenizer)
        if not ids:
            raise DataError(f"{location}: the prompt has no tokens")
        if max_length is not None and len(ids) > max_length:
            too_long += 1
            if truncation == "drop":
                dropped += 1
                continue
            ids = ids[-max_length:]  # the end of the prompt is what the completion follows
        columns = {key: value for key, value in row.items() if key != "prompt"}
        rows.append(PromptRow(location, prompt, ids, columns, len(rows)))
    if kind is None:
        raise DataError(f"{path}: no rows")
    stats = PromptStats(str(path), kind, max_length, rows_read, too_long, dropped, len(rows), sum(len(r) for r in rows))
    return rows, stats


def _prompt(row: dict, location: str) -> str | list[dict[str, str]]:
    if "prompt" not in row:
        fields = ", ".join(repr(key) for key in row) or "none"
        raise DataError(f"{location}: missing field 'prompt'; a GRPO row has a prompt and any columns (found {fields})")
    value = row["prompt"]
    if isinstance(value, str) and not value.lstrip().startswith("[{"):
        if not value:
            raise DataError(f"{location}: field 'prompt' is empty")
        return value
    turns = chat_messages(value, location, "prompt")
    if not turns:
        raise DataError(f"{location}: field 'prompt' has no messages")
    if turns[-1]["role"] == "assistant":
        raise DataError(f"{location}: the prompt ends with an assistant turn; end it with the turn to answer")
    return turns


def collate_prompts(rows: list[PromptRow], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of prompts as their indices (``rows``): the GRPO objective generates from them."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    return {"rows": torch.tensor([row.index for row in rows], dtype=torch.long)}


__all__ = ["CONVERSATIONAL", "STANDARD", "PromptRow", "PromptStats", "collate_prompts", "read_prompts"]
