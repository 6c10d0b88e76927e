"""Classification data: rows → (text, optional second text, label) → token ids and a label → batches; and for
token classification, rows ``{"tokens": [...], "tags": [...]}`` (or ``ner_tags``) → sub-token ids with each
word's tag on its first sub-token.

Rows are ``{"text", "label"}``, sentence pairs ``{"sentence1", "sentence2", "label"}``, or GLUE's own columns
(``sentence``; ``question``/``sentence``; ``premise``/``hypothesis``; ``question1``/``question2``), from any file
``data.readers`` reads. Labels are names or integers (classes) or numbers with fractions (regression, as STS-B);
one file never mixes kinds (``check_label_kinds``). The ``LabelSpace`` fixes the order of the head's outputs:
the distinct labels sorted, integers by value (so GLUE's 0..K-1 keep their value as the class index; 1, 5, 9 become
classes 0, 1, 2), names alphabetically; it is written beside an adapter as ``labels.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.data.readers import read_rows
from loratune.errors import ConfigError, DataError

# (first text column, second or None), tried in order; the first whose columns a row has decides
TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("text", None),
    ("sentence", None),
)
LABEL_COLUMN = "label"
TOKENS_COLUMN, TAG_COLUMNS = "tokens", ("tags", "ner_tags")
LABELS_FILE = "labels.json"
SINGLE_LABEL, REGRESSION, TOKEN_LABELS = "single_label_classification", "regression", "token_classification"
IGNORE = -100  # sub-tokens without a label: every sub-token of a word but its first, and special tokens


@dataclass(frozen=True)
class ClassExample:
    """One row: its text (and ``pair``, the second text of a pair task), its label as written (None when the
    file has none, e.g. for prediction), and where it came from."""

    text: str
    pair: str | None
    label: str | int | float | None
    location: str


@dataclass(frozen=True)
class TokenExample:
    """One token-classification row: its words and their tags as written (None for prediction)."""

    tokens: list[str]
    tags: list | None
    location: str


@dataclass(frozen=True)
class TokenizedClassExample:
    """Token ids and the target: a class index or float for a sequence, a list (one per sub-token, ``IGNORE``
    where untrained) for token classification; ``words``: for tokens, (sub-token position, word index) of the
    first sub-token of each word that fit in ``max_length``, and ``n_words`` the row's words."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | float | list[int] | None
    location: str
    words: tuple[tuple[int, int], ...] = ()
    n_words: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def _columns(row: dict, location: str) -> tuple[str, str | None]:
    for first, second in TEXT_COLUMNS:
        if first in row and (second is None or second in row):
            return first, second
    known = ", ".join(f"{a}/{b}" if b else a for a, b in TEXT_COLUMNS)
    raise DataError(
        f"{location}: no text column for classification (columns: {', '.join(map(str, row)) or 'none'}); "
        f"use one of: {known}"
    )


def _text(row: dict, column: str, location: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{location}: {column!r} must be non-empty text")
    return value


def _label(row: dict, location: str, required: bool):
    if LABEL_COLUMN not in row or row[LABEL_COLUMN] is None or row[LABEL_COLUMN] == "":
        if required:
            raise DataError(f"{location}: no {LABEL_COLUMN!r}; every training and evaluation row needs its label")
        return None
    value = row[LABEL_COLUMN]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{location}: {LABEL_COLUMN!r} must be a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{location}: {LABEL_COLUMN!r} is {value}; give a finite number")
    return value


def read_classification(path: str | os.PathLike, *, require_labels: bool = True) -> list[ClassExample]:
    """The rows of a classification file. Every row must use the same text columns (a file mixing single
    sentences and pairs is refused at the first row that differs) and labels of one kind (``check_label_kinds``).
    Raises ``DataError`` naming file and line."""
    examples, layout = [], None
    for location, row in read_rows(path):
        columns = _columns(row, location)
        if layout is None:
            layout = columns
        elif columns != layout:
            raise DataError(
                f"{location}: uses columns {_describe(columns)} but earlier rows use {_describe(layout)}; "
                "a file holds one kind of row"
            )
        first, second = columns
        pair = _text(row, second, location) if second else None
        examples.append(
            ClassExample(_text(row, first, location), pair, _label(row, location, require_labels), location)
        )
    check_label_kinds([(ex.label, ex.location) for ex in examples], "label")
    return examples


def _written_as_integer(label) -> bool:
    if isinstance(label, int):
        return True
    return isinstance(label, str) and label.strip().lstrip("+-").isdigit()


def check_label_kinds(labels: Sequence[tuple], what: str = "label") -> None:
    """Refuse (``DataError`` naming the row and an earlier one) a file whose labels ``(label, location)`` mix
    kinds, which would otherwise turn silently into classes nobody meant: a name among numbers (``3`` among
    ``"positive"``/``"negative"``), or a fractional number among integers (``2.5`` among ``0``, ``1``, ``3``: a
    regression written partly as integers, or a typo). Labels of one kind: all names (classes), all integers
    (classes), or numbers with decimals (``2.5``, ``3.0``: a regression)."""
    first: dict[str, tuple] = {}  # kind → (label, location) of the first row of that kind
    for label, location in labels:
        if label is None:
            continue
        if not _is_number(label):
            kinds = {"name"}
        else:
            kinds = (
                {"number"}
                | ({"integer"} if _written_as_integer(label) else set())
                | ({"fraction"} if not float(label).is_integer() else set())
            )
        for kind in kinds:
            first.setdefault(kind, (label, location))
        for one, other, fix in (
            ("name", "number", f"a file's {what}s are all names or all numbers"),
            (
                "integer",
                "fraction",
                f"write every {what} of a regression as a decimal number (3.0), or every {what} "
                "of a classification as an integer or a name",
            ),
        ):
            if one in first and other in first and kinds & {one, other}:
                earlier, at = first[other if one in kinds else one]
                raise DataError(
                    f"{location}: {what} {label!r} is {_kind_name(label)}, but {earlier!r} at {at} is "
                    f"{_kind_name(earlier)}; {fix}"
                )


def _kind_name(label) -> str:
    if not _is_number(label):
        return "a name"
    if _written_as_integer(label):
        return "an integer"
    return "a number with a fraction" if not float(label).is_integer() else "a decimal number"


def _describe(columns: tuple[str, str | None]) -> str:
    return f"{columns[0]}/{columns[1]} (pairs)" if columns[1] else f"{columns[0]} (single texts)"


def is_pair_data(examples: Sequence[ClassExample]) -> bool:
    return bool(examples) and examples[0].pair is not None


@dataclass(frozen=True)
class LabelSpace:
    """The head's outputs: ``names`` in output order for classes (None for regression), whether the
    task is a pair task (each input two texts), and whether it labels each token (``token``)."""

    names: tuple[str, ...] | None
    pair: bool = False
    token: bool = False

    @property
    def regression(self) -> bool:
        return self.names is None

    @property
    def problem_type(self) -> str:
        return TOKEN_LABELS if self.token else REGRESSION if self.regression else SINGLE_LABEL

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return {0: "score"} if self.regression else dict(enumerate(self.names))

    def encode(self, example: ClassExample) -> int | float:
        """The target of a labelled example: a class index, or the float for regression. ``DataError`` for a
        class the space does not have."""
        if self.regression:
            if isinstance(example.label, str):
                try:
                    return float(example.label)
                except ValueError:
                    raise DataError(
                        f"{example.location}: label {example.label!r} is not a number; this task is "
                        "regression (its training labels were numbers)"
                    ) from None
            return float(example.label)
        name = _label_name(example.label)
        if name not in self._index:
            raise DataError(
                f"{example.location}: label {name!r} never occurs in the training data "
                f"(labels: {', '.join(self.names[:10])}{', …' if len(self.names) > 10 else ''})"
            )
        return self._index[name]

    @property
    def _index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def to_json(self) -> dict:
        """``labels.json``: ``id2label`` (index order = the head's output order) and ``problem_type``."""
        return {
            "id2label": {str(i): name for i, name in self.id2label.items()},
            "problem_type": self.problem_type,
            "num_labels": self.num_labels,
            "pair": self.pair,
            "task": "token_cls" if self.token else "seq_cls",
        }

    @classmethod
    def from_json(cls, data: dict, source: str = LABELS_FILE) -> LabelSpace:
        try:
            regression = data["problem_type"] == REGRESSION
            names = None if regression else tuple(data["id2label"][str(i)] for i in range(len(data["id2label"])))
        except (KeyError, TypeError):
            raise ConfigError(f"{source}: expected id2label and problem_type, as loratune writes them") from None
        return cls(names, bool(data.get("pair", False)), data.get("problem_type") == TOKEN_LABELS)

    def tag_id(self, tag, location: str) -> int:
        """The class index of a token's tag; ``DataError`` for a tag the space does not have."""
        name = _label_name(tag)
        if name not in self._index:
            raise DataError(
                f"{location}: tag {name!r} never occurs in the training data "
                f"(tags: {', '.join(self.names[:10])}{', …' if len(self.names) > 10 else ''})"
            )
        return self._index[name]


def _label_name(label) -> str:
    return str(int(label)) if isinstance(label, float) and label.is_integer() else str(label)


def _is_number(label) -> bool:
    if isinstance(label, (int, float)):
        return True
    try:
        float(label)
    except ValueError:
        return False
    return True


def label_space(examples: Sequence[ClassExample], regression: bool | None = None) -> LabelSpace:
    """The label space of training ``examples``: regression when every label is a number and one is not an
    integer (or ``regression`` says so); else the classes — integers in numeric order (the label is the index
    when they are 0..K-1), other labels sorted."""
    labels = [ex.label for ex in examples]
    numbers = all(_is_number(label) for label in labels)
    if regression is None:
        regression = numbers and any(not float(label).is_integer() for label in labels)
    pair = is_pair_data(examples)
    if regression:
        if not numbers:
            bad = next(ex for ex in examples if not _is_number(ex.label))
            raise DataError(f"{bad.location}: label {bad.label!r} is not a number, but the task is regression")
        return LabelSpace(None, pair)
    names = sorted({_label_name(label) for label in labels}, key=lambda n: (0, float(n), n) if numbers else (1, 0.0, n))
    if len(names) < 2:
        raise DataError(
            f"{examples[0].location if examples else 'data'}: the training data has a single label "
            f"({names[0] if names else 'none'}); classification needs at least two"
        )
    return LabelSpace(tuple(names), pair)


def check_layout(space: LabelSpace, examples: Sequence[ClassExample], what: str) -> None:
    """Raise ``DataError`` when ``examples`` are single texts for a pair task, or pairs for a single-text one."""
    if examples and is_pair_data(examples) != space.pair:
        want, got = ("pairs", "single texts") if space.pair else ("single texts", "pairs")
        raise DataError(f"{examples[0].location}: {what} holds {got}, but the task takes {want}")


def tokenize_classification(
    examples: Iterable[ClassExample], tokenizer, space: LabelSpace | None, max_length: int
) -> list[TokenizedClassExample]:
    """Token ids (the tokenizer's own special tokens and pair layout, truncated to ``max_length``) and the
    encoded label (None without a ``space`` or a label)."""
    examples = list(examples)
    if not examples:
        return []
    pairs = [ex.pair for ex in examples] if examples[0].pair is not None else None
    encoded = tokenizer([ex.text for ex in examples], pairs, truncation=True, max_length=max_length)
    type_ids = encoded.get("token_type_ids")
    out = []
    for i, ex in enumerate(examples):
        label = space.encode(ex) if space is not None and ex.label is not None else None
        out.append(
            TokenizedClassExample(encoded["input_ids"][i], type_ids[i] if type_ids else None, label, ex.location)
        )
    return out


def collate_classification(rows: Sequence[TokenizedClassExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) and
    ``labels`` (long for classes, float for regression; absent when a row has none)."""
    width = max(len(row) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    if rows[0].token_type_ids is not None:
        batch["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        batch["input_ids"][i, :n] = torch.tensor(row.input_ids)
        batch["attention_mask"][i, :n] = 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][i, :n] = torch.tensor(row.token_type_ids)
    if all(row.label is not None for row in rows) and isinstance(rows[0].label, list):
        batch["labels"] = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, row in enumerate(rows):
            batch["labels"][i, : len(row)] = torch.tensor(row.label)
    elif all(row.label is not None for row in rows):
        dtype = torch.float32 if isinstance(rows[0].label, float) else torch.long
        batch["labels"] = torch.tensor([row.label for row in rows], dtype=dtype)
    return batch


def read_token_classification(path: str | os.PathLike, *, require_labels: bool = True) -> list[TokenExample]:
    """The rows of a token-classification file: ``tokens`` (a list of words) and ``tags`` or ``ner_tags`` (one
    per word, strings or integers). Raises ``DataError`` naming file and line."""
    examples = []
    for location, row in read_rows(path):
        tokens = row.get(TOKENS_COLUMN)
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise DataError(f"{location}: {TOKENS_COLUMN!r} must be a non-empty list of words")
        column = next((c for c in TAG_COLUMNS if row.get(c) is not None), None)
        if column is None:
            if require_labels:
                raise DataError(
                    f"{location}: no 'tags' (or 'ner_tags'); every training and evaluation row needs one tag per token"
                )
            examples.append(TokenExample(tokens, None, location))
            continue
        tags = row[column]
        if not isinstance(tags, list) or len(tags) != len(tokens):
            raise DataError(f"{location}: {column!r} must be a list with one tag per token ({len(tokens)} tokens)")
        if not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tags):
            raise DataError(f"{location}: {column!r} must hold strings or integers")
        examples.append(TokenExample(tokens, tags, location))
    check_label_kinds([(tag, ex.location) for ex in examples for tag in dict.fromkeys(ex.tags or ())], "tag")
    return examples


def tag_space(examples: Sequence[TokenExample]) -> LabelSpace:
    """The tags of training ``examples`` in output order: integers in numeric order; strings with ``O`` first,
    then sorted."""
    tags = {_label_name(tag) for ex in examples for tag in ex.tags}
    if all(_is_number(tag) for tag in tags):
        names = sorted(tags, key=float)
    else:
        names = sorted(tags, key=lambda tag: (tag != "O", tag))
    if len(names) < 2:
        raise DataError(
            f"{examples[0].location if examples else 'data'}: the training data has a single tag; "
            "token classification needs at least two"
        )
    return LabelSpace(tuple(names), token=True)


def tokenize_tokens(
    examples: Iterable[TokenExample], tokenizer, space: LabelSpace | None, max_length: int
) -> list[TokenizedClassExample]:
    """Sub-token ids of each row's words (truncated to ``max_length``); each word's tag on its first sub-token,
    ``IGNORE`` elsewhere (label None without a ``space`` or tags). Needs a fast tokenizer (word ids)."""
    examples = list(examples)
    if not examples:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("token classification needs a fast tokenizer (tokenizer.json) to map words to sub-tokens")
    encoded = tokenizer(
        [ex.tokens for ex in examples], is_split_into_words=True, truncation=True, max_length=max_length
    )
    type_ids = encoded.get("token_type_ids")
    out = []
    for i, ex in enumerate(examples):
        word_ids = encoded.word_ids(i)
        first = [k for k, w in enumerate(word_ids) if w is not None and (k == 0 or word_ids[k - 1] != w)]
        labels = None
        if space is not None and ex.tags is not None:
            labels = [IGNORE] * len(word_ids)
            for k in first:
                labels[k] = space.tag_id(ex.tags[word_ids[k]], ex.location)
        out.append(
            TokenizedClassExample(
                encoded["input_ids"][i],
                type_ids[i] if type_ids else None,
                labels,
                ex.location,
                tuple((k, word_ids[k]) for k in first),
                len(ex.tokens),
            )
        )
    return out


def write_labels(directory: str | os.PathLike, space: LabelSpace) -> None:
    """Write ``labels.json`` into ``directory`` (beside an adapter or model)."""
    (Path(directory) / LABELS_FILE).write_text(json.dumps(space.to_json(), indent=2) + "\n", encoding="utf-8")


def read_labels(directory: str | os.PathLike) -> LabelSpace | None:
    """The ``LabelSpace`` in ``directory``'s ``labels.json``, or None when it has none."""
    file = Path(directory) / LABELS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file} cannot be read: {exc}") from None
    return LabelSpace.from_json(data, str(file))


__all__ = [
    "LABELS_FILE",
    "ClassExample",
    "LabelSpace",
    "TokenExample",
    "TokenizedClassExample",
    "check_label_kinds",
    "check_layout",
    "collate_classification",
    "is_pair_data",
    "label_space",
    "read_classification",
    "read_labels",
    "read_token_classification",
    "tag_space",
    "tokenize_classification",
    "tokenize_tokens",
    "write_labels",
]
