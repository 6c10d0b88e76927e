"""Data: files → formatted examples → token ids + loss masks → batches.

Imports only the standard library, torch, pyarrow and ``loratune.errors``; never a higher layer.

    read_rows(path)                          (location, row) pairs from .jsonl/.json/.csv/.parquet
    read_examples(path, format)              rows → canonical Examples (format detected or named)
    tokenize_examples / tokenize_example     Examples → TokenizedExample(input_ids, labels, location)
    build_dataset(path, tokenizer, ...)      all of the above plus max_length handling → (examples, DataStats)
    split_eval(examples, fraction, seed)     deterministic train/eval split
    batch_order / collate                    deterministic batches; padded tensors
    pack / collate_packed                    several examples per row, position_ids restarting per example
    prompt_ids / reference / chat_prompt_ids generation-time prompts formatted as in training
    render_preview / format_stats            what ``loratune data`` prints
"""

from loratune.data.batching import PackedRow, batch_order, collate, collate_packed, pack
from loratune.data.dataset import (
    TRUNCATION_MODES,
    DataStats,
    LengthStats,
    build_dataset,
    check_length_options,
    read_examples,
    split_eval,
)
from loratune.data.formats import FORMATS, Example, check_format_name, detect_format, to_example
from loratune.data.preview import format_stats, render_preview, render_preview_rich, segments
from loratune.data.readers import SUPPORTED_SUFFIXES, read_rows
from loratune.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    chat_prompt_ids,
    encode_texts,
    prompt_ids,
    reference,
    tokenize_example,
    tokenize_examples,
)
from loratune.errors import DataError

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "SUPPORTED_SUFFIXES",
    "TRUNCATION_MODES",
    "DataError",
    "DataStats",
    "Example",
    "LengthStats",
    "PackedRow",
    "TokenizedExample",
    "batch_order",
    "build_dataset",
    "chat_prompt_ids",
    "check_format_name",
    "check_length_options",
    "collate",
    "collate_packed",
    "detect_format",
    "encode_texts",
    "format_stats",
    "pack",
    "prompt_ids",
    "read_examples",
    "read_rows",
    "reference",
    "render_preview",
    "render_preview_rich",
    "segments",
    "split_eval",
    "to_example",
    "tokenize_example",
    "tokenize_examples",
]
