"""Fuzzing what users feed loratune: data files and config files that are truncated, of the wrong types, in
the wrong encoding or plain garbage. Whatever the input, loading it either works or raises loratune's own
one-line error; nothing else may escape (which on the command line would be a traceback).

The runs are derandomized so CI sees the same cases every time; ``LORATUNE_FUZZ_EXAMPLES=2000`` explores more.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.data import build_dataset
from loratune.errors import LoratuneError
from loratune.train import load_config
from run_helpers import addition_rows, config_dict

EXAMPLES = int(os.environ.get("LORATUNE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="LORATUNE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- building blocks -----------------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "text",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
]
ROLES = ["system", "user", "assistant", "human", "gpt", "tool", ""]


@st.composite
def turns(draw):
    """A list of chat turns with plausible and implausible keys and values."""
    key_role, key_content = draw(st.sampled_from([("role", "content"), ("from", "value"), ("role", "value")]))
    turn = st.fixed_dictionaries(
        {}, optional={key_role: st.sampled_from(ROLES) | json_values, key_content: st.text(max_size=20) | json_values}
    )
    return draw(st.lists(turn | json_values, max_size=4))


@st.composite
def rows(draw):
    """One row: a mix of the formats' fields with values of the right and the wrong types."""
    fields = draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True))
    row = {}
    for field in fields:
        if field in ("messages", "conversations"):
            row[field] = draw(turns() | json_values)
        else:
            row[field] = draw(st.text(max_size=30) | json_values)
    return row


def valid_jsonl() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in addition_rows(4)).encode()


def encode_rows(data: list, suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in data).encode()
    if suffix == ".json":
        return json.dumps(data).encode()
    import csv

    out = io.StringIO()
    keys = sorted({k for r in data if isinstance(r, dict) for k in r})
    writer = csv.writer(out)
    writer.writerow(keys)
    for r in data:
        writer.writerow([json.dumps(r.get(k)) if isinstance(r, dict) else "" for k in keys])
    return out.getvalue().encode()


@st.composite
def data_files(draw):
    """(suffix, bytes): rows of any shape, valid files cut short, re-encoded or replaced by garbage."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv"]))
    kind = draw(st.sampled_from(["rows", "truncated", "encoding", "garbage", "values"]))
    if kind == "rows":
        return suffix, encode_rows(draw(st.lists(rows(), max_size=4)), suffix)
    if kind == "values":
        return suffix, encode_rows(draw(st.lists(json_values, max_size=3)), suffix)
    valid = encode_rows(addition_rows(4), suffix)
    if kind == "truncated":
        return suffix, valid[: draw(st.integers(0, len(valid)))]
    if kind == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "cp1252"]))
        text = valid.decode() + json.dumps({"text": "café ünïcödé ✓"}) + "\n"
        return suffix, text.encode(codec, errors="replace")
    return suffix, draw(st.binary(max_size=200))


# --- data files ----------------------------------------------------------------------------------------------


@FUZZ
@given(data_files())
def test_any_data_file_loads_or_raises_a_loratune_error(tiny_tokenizer, tmp_path_factory, case):
    suffix, content = case
    path = tmp_path_factory.mktemp("fuzz-data") / f"data{suffix}"
    path.write_bytes(content)
    try:
        examples, stats = build_dataset(path, tiny_tokenizer, max_length=64)
    except LoratuneError as error:
        assert str(error) and "\n" not in str(error)
        assert str(path) in str(error)
    else:
        assert stats.rows_read >= len(examples)


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 2000))
def test_a_damaged_parquet_file_raises_a_loratune_error(tiny_tokenizer, tmp_path_factory, noise, cut):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("fuzz-parquet") / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i} " * 5} for i in range(20)]), path)
    content = path.read_bytes()
    path.write_bytes(content[:cut] + noise + content[cut + len(noise) :] if noise else content[:cut])
    try:
        build_dataset(path, tiny_tokenizer, max_length=64)
    except LoratuneError as error:
        assert "\n" not in str(error) and str(path) in str(error)


# --- config files ---------------------------------------------------------------------------------------------

SECTION_KEYS = {
    "model": ["name", "quantize", "dtype", "device", "double_quant", "unquantized_modules", "trust_remote_code"],
    "lora": [
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
        "exclude_modules",
        "bias",
    ],
    "data": ["train", "eval", "eval_split", "format", "max_length", "truncation", "packing", "eval_max_examples"],
    "train": [
        "epochs",
        "max_steps",
        "batch_size",
        "grad_accum",
        "lr",
        "scheduler",
        "warmup_steps",
        "seed",
        "save_every",
        "eval_every",
        "best_metric",
        "max_grad_norm",
        "log_every",
    ],
}


@st.composite
def config_documents(draw, data_file: str):
    """A config as plain data: the valid one with keys changed to random values, dropped or misspelt."""
    config = config_dict("smollm2-135m", data_file, "runs/fuzz")
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*SECTION_KEYS, "output_dir", "extra"]))
        if section in ("output_dir", "extra"):
            config[section] = draw(json_values)
            continue
        if not isinstance(config.get(section), dict) or (draw(st.booleans()) and draw(st.booleans())):
            config[section] = draw(json_values | st.just({}))
            continue
        key = draw(st.sampled_from(SECTION_KEYS[section]) | st.text(max_size=6))
        config[section][key] = draw(json_values | st.sampled_from(["auto", "all-linear", "nf4", "cosine", "-1"]))
    return config


@FUZZ
@given(st.data())
def test_any_config_document_loads_or_raises_a_loratune_error(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("fuzz-config")
    (root / "train.jsonl").write_bytes(valid_jsonl())
    document = data.draw(config_documents(str(root / "train.jsonl")))
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path)
    except LoratuneError as error:
        assert str(error) and "\n" not in str(error)


@FUZZ
@given(
    st.sampled_from(["cut", "bytes", "encoding"]),
    st.integers(0, 400),
    st.binary(max_size=80),
    st.sampled_from(["utf-16", "latin-1", "cp1252"]),
)
def test_a_damaged_config_file_raises_a_loratune_error(tmp_path_factory, kind, cut, noise, codec):
    root = tmp_path_factory.mktemp("fuzz-config-file")
    (root / "train.jsonl").write_bytes(valid_jsonl())
    text = yaml.safe_dump(config_dict("smollm2-135m", root / "train.jsonl", "runs/x")) + "# naïve comment ✓\n"
    content = {"cut": text.encode()[:cut], "bytes": noise, "encoding": text.encode(codec, errors="replace")}[kind]
    path = root / "config.yaml"
    path.write_bytes(content)
    try:
        load_config(path)
    except LoratuneError as error:
        assert str(error) and "\n" not in str(error)


@FUZZ
@given(
    st.lists(
        st.text(max_size=20)
        | st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(
                [
                    "train.lr",
                    "lora.r",
                    "data.max_length",
                    "model",
                    "train",
                    "lora.target_modules",
                    "output_dir",
                    "a.b.c",
                    "train.lr.x",
                    "",
                ]
            ),
            st.text(max_size=12),
        ),
        max_size=3,
    )
)
def test_any_set_override_is_applied_or_raises_a_loratune_error(tmp_path_factory, overrides):
    root = tmp_path_factory.mktemp("fuzz-set")
    (root / "train.jsonl").write_bytes(valid_jsonl())
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict("smollm2-135m", root / "train.jsonl", "runs/x")))
    try:
        load_config(path, overrides)
    except LoratuneError as error:
        assert str(error) and "\n" not in str(error)


# --- the whole verb ------------------------------------------------------------------------------------------


@settings(
    max_examples=max(EXAMPLES // 6, 10),
    deadline=None,
    derandomize="LORATUNE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data_files())
def test_loratune_data_never_shows_a_traceback(tiny_llama_dir, tmp_path_factory, case):
    from loratune.cli.main import main

    suffix, content = case
    root = tmp_path_factory.mktemp("fuzz-verb")
    data = root / f"data{suffix}"
    data.write_bytes(content)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(tiny_llama_dir, data, root / "run")))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(["data", str(config), "-n", "1"])
    lines = [line for line in err.getvalue().splitlines() if "warning:" not in line]
    if status != 0:
        assert status == 2 and len(lines) == 1 and lines[0].startswith("loratune data: error: "), err.getvalue()
