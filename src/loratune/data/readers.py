"""Read local data files into ``(location, row)`` pairs.

Supported: ``.jsonl`` (one JSON object per line; blank lines skipped), ``.json`` (a list of objects or
``{"data": [...]}``), ``.csv`` / ``.tsv`` (header row + one row per record, all values strings; GLUE ships
TSV) and ``.parquet``.

A location names where a row came from, for error messages: ``path:LINE`` for JSONL and CSV (1-based
physical line in the file; a CSV record spanning several lines is named by its first line) and
``path:row N`` for JSON and Parquet (0-based index into the file's list of rows, as ``data[N]``).
Every problem with a file is a ``DataError`` whose one-line message starts with that location.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

from loratune.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")

Row = dict
LocatedRow = tuple[str, Row]


def read_rows(path: str | os.PathLike) -> Iterator[LocatedRow]:
    """Yield ``(location, row)`` for every row of a local data file, in file order.

    ``row`` is a dict (a JSON object, a CSV record keyed by the header, a Parquet row).
    Raises ``DataError`` for a missing or unreadable file, an unsupported extension, invalid JSON, a row that
    is not an object, a CSV record with the wrong number of fields, and a file with no rows. The error is
    raised when the iterator reaches the problem, so rows before it have already been yielded.
    """
    name = str(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        shown = f"'{suffix}'" if suffix else "(no extension)"
        raise DataError(f"{name}: unsupported file type {shown}; use .jsonl, .json, .csv, .tsv or .parquet")
    if not path.exists():
        raise DataError(f"{name}: no such file")
    if not path.is_file():
        raise DataError(f"{name}: not a file")
    reader = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".tsv": _read_tsv,
        ".parquet": _read_parquet,
    }[suffix]
    count = 0
    for located in reader(path, name):
        count += 1
        yield located
    if count == 0:
        raise DataError(f"{name}: no rows")


def _kind(value) -> str:
    """A JSON-ish name for a value's type, for error messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _require_object(value, location: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{location}: expected a JSON object, got {_kind(value)}")
    return value


def _read_jsonl(path: Path, name: str) -> Iterator[LocatedRow]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            location = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{location}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{location}: invalid JSON ({err.msg})") from None
            yield location, _require_object(value, location)


def _read_json(path: Path, name: str) -> Iterator[LocatedRow]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{name}: not valid UTF-8 text") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{name}:{err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f'{name}: expected a list of objects or {{"data": [...]}}, got {_kind(value)}')
    for index, item in enumerate(value):
        location = f"{name}:row {index}"
        yield location, _require_object(item, location)


def _read_tsv(path: Path, name: str) -> Iterator[LocatedRow]:
    # GLUE's TSVs do not quote: a quote character is text, not a field delimiter
    return _read_csv(path, name, delimiter="\t", quoting=csv.QUOTE_NONE)


def _read_csv(path: Path, name: str, **dialect) -> Iterator[LocatedRow]:
    what = "TSV" if dialect.get("delimiter") == "\t" else "CSV"
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, **dialect)
            header = None
            while True:
                start_line = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    raise DataError(f"{name}:{start_line}: invalid {what} ({err})") from None
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                if header is None:
                    header = record
                    if len(set(header)) != len(header):
                        raise DataError(f"{name}:{start_line}: duplicate column names in the {what} header")
                    continue
                location = f"{name}:{start_line}"
                if len(record) != len(header):
                    raise DataError(
                        f"{location}: {len(record)} fields, but the header has {len(header)} ({', '.join(header)})"
                    )
                yield location, dict(zip(header, record))
    except UnicodeDecodeError:
        raise DataError(f"{name}: not valid UTF-8 text") from None


def _read_parquet(path: Path, name: str) -> Iterator[LocatedRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(err: Exception) -> DataError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return DataError(f"{name}: not a readable Parquet file ({first})")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise unreadable(err) from None
    index = 0
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            rows = batch.to_pylist()
        except (pa.ArrowException, OSError, ValueError) as err:
            raise unreadable(err) from None
        for row in rows:
            yield f"{name}:row {index}", row
            index += 1
