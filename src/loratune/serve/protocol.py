"""OpenAI's request bodies (the fields loratune serves) and the shapes of its answers.

Fields OpenAI clients send that change nothing here (``user``, zero penalties, ...) are accepted; a field
that would change the answer but is not supported is refused with a message, never silently ignored.
Values are checked as strictly as OpenAI checks them: a boolean is not a number, a string is neither a
number nor a boolean, NaN and infinities are no numbers at all. ``parse_body`` turns raw bytes into the JSON
object these models validate, refusing what would hurt the server before it is parsed (nesting deep enough to
exhaust the parser's recursion) and what no tokenizer can encode (lone UTF-16 surrogates).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from itertools import accumulate
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loratune.errors import LoratuneError
from loratune.inference.sequence import TokenLogprob

MAX_STOPS = 4
MAX_N = 16
MAX_LOGPROBS = 20
# Deeper than any body OpenAI's API takes (a chat request nests about 5 levels), far below the depth at which
# Python's JSON parser runs out of recursion (about 1,000).
MAX_DEPTH = 64
SEED_RANGE = (-(2**63), 2**64)  # what a torch.Generator takes: an int64 or a uint64
# Strict (a bool is no int, "2" no int, "yes" no bool) and finite (no NaN or infinity), as OpenAI's API is.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class RequestError(LoratuneError):
    """A request that cannot be answered as asked: ``status`` is the HTTP status, ``kind``/``code``/``param``
    fill OpenAI's error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


# --- the body, before any model sees it --------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string literal, escapes included
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def parse_body(raw: bytes) -> dict:
    """The JSON object in ``raw``; raises ``RequestError`` (400) for a body that is not UTF-8 JSON, not an
    object, nested deeper than ``MAX_DEPTH``, or holding a lone surrogate (``"\\ud800"``) in a string."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"the request body is not valid UTF-8 ({error})") from None
    if _nesting_exceeds(raw, MAX_DEPTH):
        raise RequestError(f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # (only an escape can carry one: UTF-8 cannot encode a surrogate)
        where = _lone_surrogate(data)
        if where is not None:
            field = ".".join(where) or None
            raise RequestError(
                f"{field or 'the request body'}: a string holds a lone UTF-16 surrogate (an escape such as "
                "\\ud800 without its pair), which is no Unicode character; send valid Unicode text",
                param=field,
            )
    return data


def _nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether the JSON text ``raw`` nests arrays and objects more than ``limit`` deep (brackets inside strings
    do not count). Linear, without recursion, and without any work for a body with few brackets."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return any(depth > limit for depth in accumulate(map(_DEPTH_STEP.__getitem__, brackets)))


def _lone_surrogate(value, where: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path (keys and indices) to the first string in ``value`` holding a lone surrogate, or None. (JSON
    joins a valid pair of escapes into one character, so any surrogate left is a lone one.)"""
    if isinstance(value, str):
        return where if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return where
        found = _lone_surrogate(item, (*where, str(key)))
        if found is not None:
            return found
    return None


# --- requests ----------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # an extra field (vLLM's); -1 or 0: off
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    adapters: dict[str, float] | None = None  # loratune's extra field: run this mix of adapters for this request
    ignore_eos: bool = False  # vLLM's extra field: run to max_tokens through end-of-text tokens (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported; leave it out or 0")
        for name in ("logit_bias", "best_of", "suffix", "tools", "functions", "response_format"):
            if (self.model_extra or {}).get(name) not in (None, {}, [], 1, "text", {"type": "text"}):
                raise ValueError(f"{name} is not supported by loratune serve")
        if self.adapters is not None and not self.adapters:
            raise ValueError("adapters needs at least one adapter name with a strength")
        return self

    @property
    def sampling_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def sampling_top_k(self) -> int | None:
        return self.top_k if self.top_k and self.top_k > 0 else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported; the prompt is not repeated in the answer")
        return self


class ContentPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", **STRICT)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]


# --- answers ---------------------------------------------------------------------------------------------------


def error_body(
    message: str, kind: str = "invalid_request_error", code: str | int | None = None, param: str | None = None
) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int) -> dict:
    """Legacy completions' logprobs object for ``entries`` (``offset``: characters before the first)."""
    tokens = [tokenizer.decode([e.token_id]) for e in entries]
    offsets, position = [], offset
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{tokenizer.decode([i]): p for i, p in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> list[dict]:
    """Chat completions' ``logprobs.content`` entries."""

    def one(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, p) for i, p in e.top]} for e in entries]
