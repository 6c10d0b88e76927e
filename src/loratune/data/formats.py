"""The five row formats people already use, and their conversion to one canonical ``Example``.

    text               {"text": ...}
    prompt_completion  {"prompt": ..., "completion": ...}
    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    messages           {"messages": [{"role": system|user|assistant, "content": ...}, ...]}   (OpenAI)
    sharegpt           {"conversations": [{"from": system|human|user|gpt|assistant, "value": ...}, ...]}

``messages``, ``sharegpt`` and ``alpaca`` rows become chat turns (they go through the tokenizer's chat
template); ``prompt_completion`` and ``text`` rows are used as written. Extra fields are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from difflib import get_close_matches

from loratune.errors import ConfigError, DataError

FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# The fields that identify each format, in detection order (the first match wins).
_SIGNATURES = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
)


@dataclass(frozen=True)
class Example:
    """One row in canonical form; exactly one of ``messages``, ``prompt``/``completion`` or ``text`` is set.

    ``messages`` is a list of ``{"role": system|user|assistant, "content": str}``. ``completion`` may be None
    for rows read without a target (generation prompts). ``location`` is ``path:line`` for error messages.
    """

    location: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    @property
    def kind(self) -> str:
        """``"chat"``, ``"prompt_completion"`` or ``"text"``: how the example is formatted and masked."""
        if self.messages is not None:
            return "chat"
        if self.prompt is not None:
            return "prompt_completion"
        return "text"


def check_format_name(name: str) -> str:
    """Return ``name`` if it is ``"auto"`` or one of ``FORMATS``; raise ``ConfigError`` naming the closest one."""
    if name == "auto" or name in FORMATS:
        return name
    choices = ("auto", *FORMATS)
    close = get_close_matches(str(name), choices, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown data format '{name}'; {hint}use one of: {', '.join(choices)}")


def _matching_format(row: dict) -> str | None:
    for name, fields in _SIGNATURES:
        if all(field in row for field in fields):
            return name
    return None


def detect_format(first_row: dict, location: str = "data") -> str:
    """Return the format name (one of ``FORMATS``) that a row's fields identify.

    Raises ``DataError`` naming ``location`` when the fields match no format.
    """
    found = _matching_format(first_row)
    if found is None and "chosen" in first_row and "rejected" in first_row:
        raise DataError(
            f"{location}: this row is a preference pair (chosen, rejected); train on preference pairs with "
            "train.objective: dpo"
        )
    if found is None:
        fields = ", ".join(repr(key) for key in first_row) or "none"
        raise DataError(
            f"{location}: cannot tell the data format from the fields ({fields}); expected "
            '{"text"}, {"prompt","completion"}, {"instruction","output"} (alpaca), {"messages"} or '
            '{"conversations"} (sharegpt), or set data.format'
        )
    return found


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _string(container: dict, key: str, location: str, what: str, fmt: str) -> str:
    if key not in container:
        raise DataError(f"{location}: missing field '{what}' (format {fmt})")
    value = container[key]
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{what}' must be a string, got {_kind(value)}")
    return value


def _turn_list(row: dict, key: str, location: str, fmt: str) -> list:
    value = row[key]
    if isinstance(value, str):  # CSV cells hold text; a JSON-encoded list is accepted there
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{location}: field '{key}' must be a list of turns, got a string") from None
    if hasattr(value, "tolist") and not isinstance(value, list):  # numpy arrays from some Parquet writers
        value = value.tolist()
    if not isinstance(value, list):
        raise DataError(f"{location}: field '{key}' must be a list of turns, got {_kind(value)}")
    if not value:
        raise DataError(f"{location}: field '{key}' is an empty list (format {fmt})")
    return value


def _chat_turns(row: dict, location: str, fmt: str) -> list[dict[str, str]]:
    if fmt == "messages":
        key, role_key, content_key, roles = "messages", "role", "content", {r: r for r in CHAT_ROLES}
        role_names = "system, user or assistant"
    else:
        key, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
        role_names = "system, human, user, gpt or assistant"
    turns = []
    for index, turn in enumerate(_turn_list(row, key, location, fmt)):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{location}: {where} must be an object, got {_kind(turn)}")
        role = _string(turn, role_key, location, f"{where}.{role_key}", fmt)
        if role not in roles:
            raise DataError(f"{location}: unknown role '{role}' in {where}; use {role_names}")
        content = _string(turn, content_key, location, f"{where}.{content_key}", fmt)
        turns.append({"role": roles[role], "content": content})
    return turns


def chat_messages(value, location: str, field: str) -> list[dict[str, str]]:
    """The turns of a row's field ``field`` holding chat messages in OpenAI's form (``[{"role": system|user|assistant,
    "content": str}, ...]``, as TRL's conversational rows do), checked; a ``DataError`` naming ``location`` and
    the field for anything else (a JSON-encoded list in a CSV cell is accepted)."""
    turns = []
    for index, turn in enumerate(_turn_list({field: value}, field, location, "chat messages")):
        where = f"{field}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{location}: {where} must be an object, got {_kind(turn)}")
        role = _string(turn, "role", location, f"{where}.role", "chat messages")
        if role not in CHAT_ROLES:
            raise DataError(f"{location}: unknown role '{role}' in {where}; use system, user or assistant")
        turns.append({"role": role, "content": _string(turn, "content", location, f"{where}.content", "chat messages")})
    return turns


def to_example(row: dict, fmt: str, location: str, *, require_target: bool = True) -> Example:
    """Convert one row of format ``fmt`` (one of ``FORMATS``) into an ``Example``.

    With ``require_target`` (training and evaluation data), a chat needs an assistant turn and a
    prompt/completion row a completion; without it (prompts to generate from) they may be missing.
    Raises ``DataError`` naming ``location`` for a missing field, a value of the wrong type, an unknown role,
    a chat without an assistant turn, or a row that is in another format than ``fmt``.
    """
    if fmt not in FORMATS:
        check_format_name(fmt)  # raises for an unknown name
        raise ConfigError("to_example needs a concrete format; detect it first with detect_format")
    required = dict(_SIGNATURES)[fmt]
    if not require_target:
        required = {"alpaca": ("instruction",), "prompt_completion": ("prompt",)}.get(fmt, required)
    missing = [field for field in required if field not in row]
    if missing:
        other = _matching_format(row)
        if other is not None and other != fmt:
            raise DataError(
                f"{location}: row is in format '{other}', but this file is read as format '{fmt}'; "
                "use one format per file"
            )
        raise DataError(f"{location}: missing field '{missing[0]}' (format {fmt})")

    if fmt == "text":
        return Example(location, text=_string(row, "text", location, "text", fmt))
    if fmt == "prompt_completion":
        prompt = _string(row, "prompt", location, "prompt", fmt)
        completion = _string(row, "completion", location, "completion", fmt) if "completion" in row else None
        return Example(location, prompt=prompt, completion=completion)
    if fmt == "alpaca":
        instruction = _string(row, "instruction", location, "instruction", fmt)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{location}: field 'input' must be a string, got {_kind(extra)}")
        user = instruction + ("\n\n" + extra if extra else "")
        messages = [{"role": "user", "content": user}]
        if "output" in row:
            messages.append({"role": "assistant", "content": _string(row, "output", location, "output", fmt)})
        return Example(location, messages=messages)

    messages = _chat_turns(row, location, fmt)
    if require_target and not any(turn["role"] == "assistant" for turn in messages):
        raise DataError(f"{location}: no assistant turn in '{required[0]}'; training needs at least one")
    return Example(location, messages=messages)
