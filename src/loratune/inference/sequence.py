"""One generated sequence as the engine sees it: prompt, adapter, sampling, and the text it has produced.

The engine hands each new token to ``Sequence.accept``; the sequence turns tokens into text deltas for its
``sink`` (called from the engine thread) and decides when it is finished: a stop token, a stop string, or the
token limit. Streaming and non-streaming requests consume the same deltas, so their texts are equal.

Text grows incrementally: each token decodes with the tokens since the last complete piece of text before it,
never the whole answer again, so a long answer costs the same per token as a short one; the result is the
text of decoding all tokens at once (a byte-level token that ends inside a character waits for the rest of it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. ``temperature`` 0 is greedy; ``logprobs``: None for none, else how
    many alternatives to report beside each chosen token's log-probability."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Delta:
    """New text of a sequence, with the log-probabilities of the tokens it covers (when asked)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The sequence ended: ``reason`` is ``"stop"`` or ``"length"``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The sequence could not run to its end; ``status`` is the HTTP status the error maps to."""

    message: str
    kind: str = "server_error"
    status: int = 500


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Sequence:
    """A prompt (token ids) to continue with ``adapters`` — name → strength (empty: the bare base) — and the
    ``sink`` its events go to. ``cancel()`` is safe from any thread: the engine drops the sequence at its next
    step."""

    prompt_ids: list[int]
    adapters: dict[str, float]
    params: SamplingParams
    tokenizer: object
    stop_ids: frozenset[int]
    sink: Callable[[Event], None]
    deadline: float | None = None  # time.monotonic() after which it fails as timed out
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""
    cancelled: bool = False
    done: bool = False
    _pending: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    text: str = ""  # the text of ``tokens`` so far (without a trailing incomplete character)
    _prefix: int = 0  # tokens[_prefix:_read] decode to the end of ``text``: the next token's context
    _read: int = 0

    def __post_init__(self):
        if self.params.temperature:
            seed = self.params.seed if self.params.seed is not None else random.randrange(2**63)
            self.generator = torch.Generator().manual_seed(seed)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def routing_key(self) -> tuple[tuple[str, float], ...]:
        """What the sequence runs with, as a hashable value (sorted names and strengths)."""
        return tuple(sorted(self.adapters.items()))

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take the next token and emit what text is ready; ``done`` says when the sequence has finished."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if logprob is not None:
            self._pending.append(logprob)
        if token in self.stop_ids:
            self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))  # what was held back
            self._finish("stop", counted=1)
            return
        self.tokens.append(token)
        text = self._extend()
        cut = _first_stop(text, self.params.stop, max(0, len(self.emitted) - _longest(self.params.stop)))
        if cut is not None:
            self._emit(text[:cut])
            self._finish("stop")
            return
        ready = text[: len(text) - _held_back(text, self.params.stop)]
        # An incomplete UTF-8 sequence decodes to U+FFFD; wait for the token that completes it.
        self._emit(ready.rstrip("\ufffd"))
        if len(self.tokens) >= self.params.max_tokens:
            self._emit(self.tokenizer.decode(self.tokens, skip_special_tokens=True))  # with any partial character
            self._finish("length")

    def _extend(self) -> str:
        """``text`` with the newest token added, decoding only it and the window of tokens before it."""
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)
        return self.text

    def fail(self, failure: Failed) -> None:
        if not self.done:
            self.done = True
            self.sink(failure)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.sink(Delta(text[len(self.emitted) :], tuple(self._pending)))
            self.emitted, self._pending = text, []

    def _finish(self, reason: str, counted: int = 0) -> None:
        if self._pending:
            self.sink(Delta("", tuple(self._pending)))
            self._pending = []
        self.done = True
        self.sink(Finished(reason, len(self.prompt_ids), len(self.tokens) + counted))


def _longest(stops: tuple[str, ...]) -> int:
    return max((len(s) for s in stops), default=0)


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop string in ``text`` (searched from ``start``) begins, or None."""
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string (not emitted yet)."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held
