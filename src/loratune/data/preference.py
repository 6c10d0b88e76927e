"""Preference pairs (DPO's data): rows → a prompt with a chosen and a rejected completion → token ids with the
completion marked → batches of [chosen rows; rejected rows].

Rows are TRL's preference formats, told apart by the first row (every row must then be of its kind):

    standard        {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}   (OpenAI's messages)

Without "prompt", what chosen and rejected start with is the prompt (TRL's implicit prompt, ``extract_prompt``):
their shared leading turns, or for text their shared leading characters (a space before the point where they part
goes to the completions).

Token ids:

- standard: SFT's prompt/completion rows, ``[BOS] + prompt + completion + EOS`` with prompt and completion tokenized
  separately (so the prompt's tokens are exactly what generation sees), the completion and EOS scored. TRL tokenizes
  prompt + completion + EOS together and splits them where they part: the same ids wherever the prompt ends on a
  token boundary (a prompt ending in a space usually does not);
- conversational: TRL's. The prompt is rendered with the chat template and its generation prompt, each conversation
  through its completion without it; everything after the tokens the prompt shares with both conversations is
  scored (the assistant turn, its end-of-turn token and whatever the template writes after it).

A pair is scored as two sequences, ``labels`` holding the completion's tokens and ``IGNORE_INDEX`` elsewhere, as in
SFT (``tokenize.py``). ``data.max_length`` applies to each sequence; a pair with a completion truncated away
entirely is dropped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loratune.data.batching import collate
from loratune.data.dataset import LengthStats, check_length_options
from loratune.data.formats import Example, chat_messages
from loratune.data.readers import read_rows
from loratune.data.tokenize import IGNORE_INDEX, TokenizedExample, prompt_ids, tokenize_examples
from loratune.errors import ConfigError, DataError

STANDARD, CONVERSATIONAL = "standard", "conversational"


@dataclass(frozen=True)
class PreferenceExample:
    """One row: a prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion. Standard rows
    hold strings; conversational rows lists of ``{"role", "content"}`` turns. ``location`` is ``path:line``."""

    location: str
    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def kind(self) -> str:
        """``"standard"`` or ``"conversational"``."""
        return STANDARD if isinstance(self.chosen, str) else CONVERSATIONAL


@dataclass(frozen=True)
class PreferencePair:
    """A pair as token ids: the prompt + chosen completion and the prompt + rejected one, each with ``labels`` on
    its completion's tokens."""

    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def location(self) -> str:
        return self.chosen.location

    def __len__(self) -> int:
        """The tokens the pair puts through the model (what batching by length groups on)."""
        return len(self.chosen) + len(self.rejected)


@dataclass(frozen=True)
class PreferenceStats:
    """What reading a preference file did: ``rows_read == kept + dropped_too_long + dropped_no_completion``.

    ``too_long`` counts pairs with a sequence longer than ``max_length`` (whatever happened to them), ``truncated``
    those cut and kept; ``lengths`` describes the kept sequences (chosen and rejected)."""

    path: str
    kind: str
    max_length: int | None
    rows_read: int
    too_long: int
    truncated: int
    dropped_too_long: int
    dropped_no_completion: int
    kept: int
    lengths: LengthStats
    chosen_tokens: int
    rejected_tokens: int


def is_preference_row(row: dict) -> bool:
    """Whether a row is a preference pair (it has ``chosen`` and ``rejected``)."""
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def read_preferences(path: str | os.PathLike) -> list[PreferenceExample]:
    """Every row of a preference file (JSONL, JSON, CSV or Parquet), checked; the first row decides the kind.

    Raises ``DataError`` naming file and line for a row that is not a preference pair, a field of the wrong type,
    bad chat turns, a row of the other kind than the first, or a conversational row whose prompt is empty."""
    examples: list[PreferenceExample] = []
    kind = None
    for location, row in read_rows(path):
        example = _preference_example(row, location)
        if kind is None:
            kind = example.kind
        elif example.kind != kind:
            raise DataError(
                f"{location}: a {example.kind} row (its 'chosen' is "
                f"{'text' if example.kind == STANDARD else 'a list of messages'}), but the file's first row is "
                f"{kind}; use one kind per file"
            )
        examples.append(example)
    return examples


def _preference_example(row: dict, location: str) -> PreferenceExample:
    if not is_preference_row(row):
        missing = next(field for field in ("chosen", "rejected") if field not in row)
        fields = ", ".join(repr(key) for key in row) or "none"
        raise DataError(
            f"{location}: missing field '{missing}'; a preference row has prompt, chosen and rejected (found {fields})"
        )
    chosen = row["chosen"]
    if isinstance(chosen, str) and not _looks_like_json_list(chosen):
        return _standard(row, location)
    return _conversational(row, location)


def _looks_like_json_list(text: str) -> bool:
    # a CSV cell holding a JSON-encoded message list (chat_messages decodes it)
    return text.lstrip().startswith("[{")


def _standard(row: dict, location: str) -> PreferenceExample:
    values = {}
    for field in ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected"):
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{location}: field '{field}' must be a string like 'chosen', got {_json_kind(value)}")
        values[field] = value
    if "prompt" not in values:  # TRL's implicit prompt: the text both start with (Anthropic HH's rows)
        chosen, rejected = values["chosen"], values["rejected"]
        shared = _common_prefix(chosen, rejected)
        if shared and chosen[shared - 1] == " ":  # TRL's rule: the space before the answers starts them
            shared -= 1
        if shared == 0:
            raise DataError(
                f"{location}: 'chosen' and 'rejected' share no leading text to use as the prompt; give 'prompt'"
            )
        if shared in (len(chosen), len(rejected)):
            raise DataError(
                f"{location}: one of 'chosen' and 'rejected' is the start of the other, so nothing is left to prefer "
                "after their shared prompt; give 'prompt'"
            )
        values = {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    return PreferenceExample(location, **values)


def _json_kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _conversational(row: dict, location: str) -> PreferenceExample:
    chosen = chat_messages(row["chosen"], location, "chosen")
    rejected = chat_messages(row["rejected"], location, "rejected")
    if "prompt" in row:
        given = row["prompt"]
        if isinstance(given, str) and not _looks_like_json_list(given):
            raise DataError(f"{location}: field 'prompt' must be a list of messages like 'chosen', got a string")
        prompt = chat_messages(given, location, "prompt")
    else:  # TRL's implicit prompt: the turns both conversations start with
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise DataError(
                f"{location}: 'chosen' and 'rejected' share no leading turn to use as the prompt; give 'prompt'"
            )
        if not chosen or not rejected:
            raise DataError(f"{location}: 'chosen' and 'rejected' are the same conversation; nothing to prefer")
    if prompt[-1]["role"] == "assistant":
        raise DataError(
            f"{location}: the prompt ends with an assistant turn; end it with the turn the completions answer"
        )
    return PreferenceExample(location, prompt, chosen, rejected)


def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer) -> list[PreferencePair]:
    """Token ids and completion labels of each pair (see the module docstring), untruncated, in order.

    Raises ``DataError`` (naming the row) for conversational rows with a tokenizer that has no chat template or
    with a completion that renders to nothing; ``ConfigError`` for standard rows with a tokenizer without an EOS
    token."""
    if not examples:
        return []
    if examples[0].kind == STANDARD:
        # SFT's prompt/completion tokenization: [BOS] + prompt + completion + EOS, the completion and EOS scored
        sides = [
            Example(e.location, prompt=e.prompt, completion=completion)
            for e in examples
            for completion in (e.chosen, e.rejected)
        ]
        tokenized = tokenize_examples(sides, tokenizer)
        return [PreferencePair(tokenized[i], tokenized[i + 1]) for i in range(0, len(tokenized), 2)]
    return _tokenize_conversations(examples, tokenizer)


def _tokenize_conversations(examples: Sequence[PreferenceExample], tokenizer) -> list[PreferencePair]:
    # the conversations through each completion, rendered and tokenized in batches (no generation prompt)
    conversations = [
        Example(e.location, messages=e.prompt + completion) for e in examples for completion in (e.chosen, e.rejected)
    ]
    rendered = tokenize_examples(conversations, tokenizer, train_on_prompt=True)
    pairs = []
    for index, example in enumerate(examples):
        # the prompt with the template's generation prompt: where the completion starts
        prompt = prompt_ids(Example(example.location, messages=example.prompt), tokenizer)
        sides = [rendered[2 * index].input_ids, rendered[2 * index + 1].input_ids]
        # TRL's rule: the completion starts where the prompt and both conversations part (the whole prompt when the
        # template renders it as their prefix, as ChatML templates do)
        start = min(_common_prefix(prompt, full) for full in sides)
        if any(len(full) == start for full in sides):
            raise DataError(
                f"{example.location}: a completion renders to no tokens after the prompt with this chat template"
            )
        pairs.append(
            PreferencePair(
                *(
                    TokenizedExample(list(full), [IGNORE_INDEX] * start + full[start:], example.location)
                    for full in sides
                )
            )
        )
    return pairs


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items (token ids, characters) ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_preferences(
    path: str | os.PathLike, tokenizer, *, max_length: int | None = 512, truncation: str = "truncate"
) -> tuple[list[PreferencePair], PreferenceStats]:
    """Read, tokenize and length-limit a preference file; return ``(pairs, stats)``, kept pairs in file order.

    A sequence longer than ``max_length`` keeps its first ``max_length`` tokens (``truncation="truncate"``) or its
    pair is dropped (``"drop"``); a pair left without a completion token on either side is dropped. Raises
    ``DataError`` for bad files or rows (naming file and line) and ``ConfigError`` for bad options."""
    check_length_options(max_length, truncation)
    examples = read_preferences(path)
    pairs = tokenize_preferences(examples, tokenizer)
    kept: list[PreferencePair] = []
    too_long = truncated = dropped_too_long = dropped_no_completion = 0
    for whole in pairs:
        long = max_length is not None and max(len(whole.chosen), len(whole.rejected)) > max_length
        pair = whole
        if long:
            too_long += 1
            if truncation == "drop":
                dropped_too_long += 1
                continue
            pair = PreferencePair(_cut(whole.chosen, max_length), _cut(whole.rejected, max_length))
        if not (pair.chosen.n_trained and pair.rejected.n_trained):
            dropped_no_completion += 1
            continue
        if long:
            truncated += 1
        kept.append(pair)
    stats = PreferenceStats(
        path=str(path),
        kind=examples[0].kind,
        max_length=max_length,
        rows_read=len(pairs),
        too_long=too_long,
        truncated=truncated,
        dropped_too_long=dropped_too_long,
        dropped_no_completion=dropped_no_completion,
        kept=len(kept),
        lengths=LengthStats.of([len(side) for pair in kept for side in (pair.chosen, pair.rejected)]),
        chosen_tokens=sum(pair.chosen.n_trained for pair in kept),
        rejected_tokens=sum(pair.rejected.n_trained for pair in kept),
    )
    return kept, stats


def _cut(example: TokenizedExample, max_length: int) -> TokenizedExample:
    return TokenizedExample(example.input_ids[:max_length], example.labels[:max_length], example.location)


def collate_preferences(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch of P pairs as 2P right-padded rows: the chosen sequences, then the rejected ones (TRL's
    concatenated layout, one forward for both); ``input_ids``, ``labels`` (the completions) and ``attention_mask``.
    Raises ``ValueError`` for an empty batch."""
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    return collate([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], pad_id)


def check_preference_options(data) -> None:
    """Raise ``ConfigError`` for ``data`` options that preference pairs cannot take."""
    refused = {
        "data.packing": data.packing,
        "data.train_on_prompt": data.train_on_prompt,
        f"data.format: {data.format}": data.format != "auto",
    }
    for option, given in refused.items():
        if given:
            raise ConfigError(
                f"{option} does not apply to preference pairs (train.objective: dpo scores each completion "
                "after its own prompt); remove it"
            )


__all__ = [
    "CONVERSATIONAL",
    "STANDARD",
    "PreferenceExample",
    "PreferencePair",
    "PreferenceStats",
    "build_preferences",
    "check_preference_options",
    "collate_preferences",
    "is_preference_row",
    "read_preferences",
    "tokenize_preferences",
]
