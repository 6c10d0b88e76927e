"""From an OpenAI request to sequences in the engine and back to answers, independent of the HTTP layer.

``Service.prepare`` checks a request against what is served (model name, adapters, context, limits) and
tokenizes it (chat template included); ``Service.check`` runs it on the service's own thread, so a long
prompt never holds up the event loop that streams everyone's tokens. ``Service.events`` runs a prepared
request and yields ``(choice index, event)`` pairs as the engine produces them, cancelling the sequences
when the consumer stops listening (a closed connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from loratune.data import Example, encode_texts, prompt_ids
from loratune.errors import LoratuneError
from loratune.inference.decode import stop_token_ids
from loratune.inference.engine import Engine, QueueFull
from loratune.inference.sequence import Event, Failed, Finished, SamplingParams, Sequence
from loratune.serve.adapters import AdapterPool
from loratune.serve.delivery import Deliveries
from loratune.serve.metrics import ServeMetrics
from loratune.serve.protocol import SEED_RANGE, ChatCompletionRequest, CompletionRequest, RequestError


@dataclass
class Job:
    """A checked, tokenized request: ``prompts`` × ``n`` sequences running ``mix`` (name → strength)."""

    model_name: str
    mix: dict[str, float]
    tokenizer: object
    prompts: list[list[int]]
    n: int
    params: SamplingParams
    arrived: float
    stops: frozenset[int] = frozenset()  # token ids that end a sequence (none with ignore_eos)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.mix)


# A request body above this is refused unread (413). A prompt filling a 128k-token context is about half a
# megabyte of text; 8 MiB leaves room for any JSON around it while keeping a hostile upload from being buffered.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


class Service:
    """Everything a request needs: the model's name and context, the tokenizer, the engine and the adapters."""

    def __init__(
        self,
        model,
        tokenizer,
        base_id: str,
        engine: Engine,
        pool: AdapterPool,
        metrics: ServeMetrics,
        *,
        max_tokens_limit: int | None = None,
        max_tokens_default: int | None = None,
        request_timeout: float = 600.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.base_id = base_id
        self.engine = engine
        self.pool = pool
        self.metrics = metrics
        if None not in (max_tokens_default, max_tokens_limit) and max_tokens_default > max_tokens_limit:
            raise ValueError(f"max_tokens_default {max_tokens_default} is above max_tokens_limit {max_tokens_limit}")
        self.max_tokens_limit = max_tokens_limit
        self.max_tokens_default = max_tokens_default  # for a request that gives none (None: the context left)
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes  # a longer request body is a 413, read no further
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self._stops: dict[int, frozenset[int]] = {}  # written by the preparing thread only
        self._longest: dict[int, int] = {}  # characters of a tokenizer's longest token (the same thread)
        # one thread, so a tokenizer never encodes two requests at once (a fast tokenizer shared between threads
        # can fail with "Already borrowed")
        self._preparing = ThreadPoolExecutor(1, thread_name_prefix="loratune-prepare")
        self._deliveries: Deliveries | None = None  # the engine's events to the serving loop (made on it)
        self.draining = False

    def close(self) -> None:
        """Stop the engine (whatever still runs fails with 503) and the service's threads."""
        self.engine.stop()
        self.pool.close()
        self._preparing.shutdown(wait=False, cancel_futures=True)
        if self._deliveries is not None:
            self._deliveries.close()

    def model_ids(self) -> list[str]:
        return [self.base_id, *(a.name for a in self.pool.listed())]

    # --- checking a request --------------------------------------------------------------------------------
    async def check(self, request: CompletionRequest | ChatCompletionRequest) -> Job:
        """``prepare`` on the service's preparing thread, off the event loop (the request's time counts from
        now, its wait for that thread included)."""
        arrived = time.monotonic()
        job = await asyncio.get_running_loop().run_in_executor(self._preparing, self.prepare, request)
        return replace(job, arrived=arrived)

    def prepare(self, request: CompletionRequest | ChatCompletionRequest) -> Job:
        """Check and tokenize ``request``; raises ``RequestError`` with the status to answer."""
        mix = self._mix(request)
        tokenizer = self._tokenizer_for(mix)
        if isinstance(request, ChatCompletionRequest):
            self._check_length([sum(len(m["content"]) for m in request.chat())], tokenizer, "messages")
        else:
            texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            self._check_length([len(t) for t in texts if isinstance(t, str)], tokenizer, "prompt")
        try:
            if isinstance(request, ChatCompletionRequest):
                prompts = [prompt_ids(Example(location="messages", messages=request.chat()), tokenizer)]
                limit, alternatives = request.token_limit, request.logprob_alternatives
            else:
                prompts = self._completion_prompts(request.prompt, tokenizer)
                limit, alternatives = request.max_tokens, request.logprobs
        except LoratuneError as error:
            raise RequestError(str(error)) from None
        if any(not ids for ids in prompts):
            raise RequestError("the prompt is empty; give at least one token of text", param="prompt")
        vocab = len(tokenizer)
        if any(i < 0 or i >= vocab for ids in prompts for i in ids):
            raise RequestError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})", param="prompt")
        max_tokens = self._max_tokens(limit, max(len(ids) for ids in prompts))
        params = SamplingParams(
            max_tokens,
            request.sampling_temperature,
            request.top_p,
            request.sampling_top_k,
            request.seed,
            tuple(request.stop or ()),
            alternatives,
        )
        if not params.temperature:  # greedy: top_p and top_k mean nothing
            params = replace(params, top_p=None, top_k=None)
        stops = frozenset() if request.ignore_eos else self._stop_ids(tokenizer)
        return Job(request.model, mix, tokenizer, prompts, request.n, params, time.monotonic(), stops)

    def _mix(self, request) -> dict[str, float]:
        names = self.model_ids()
        if request.model not in names:
            raise RequestError(
                f"model {request.model!r} is not served here; available: {', '.join(names)}",
                404,
                code="model_not_found",
                param="model",
            )
        if request.adapters is not None:
            unknown = [n for n in request.adapters if self.pool.get(n) is None]
            if unknown:
                listed = ", ".join(a.name for a in self.pool.listed()) or "none"
                raise RequestError(
                    f"adapters names {unknown[0]!r}, which is not loaded; loaded adapters: {listed}",
                    404,
                    code="model_not_found",
                    param="adapters",
                )
            mix = {name: float(strength) for name, strength in request.adapters.items() if strength != 0}
            cap = self.engine.max_adapters
            if cap is not None and len(mix) > cap:
                raise RequestError(
                    f"'adapters' mixes {len(mix)} adapters, but this server runs at most {cap} distinct "
                    "adapters in one batch (--max-loras); mix fewer",
                    param="adapters",
                )
            whole = [n for n in mix if self.pool.get(n).replaces_modules]
            if whole and len(mix) > 1:
                raise RequestError(
                    f"adapter {whole[0]!r} replaces whole modules (modules_to_save), so it cannot be "
                    "mixed with others in one request; request it alone",
                    param="adapters",
                )
            return mix
        if request.model == self.base_id:
            return {}
        return {request.model: self.pool.get(request.model).strength}

    def _tokenizer_for(self, mix: dict[str, float]):
        if len(mix) == 1:
            own = self.pool.get(next(iter(mix))).tokenizer
            if own is not None:
                return own
        return self.tokenizer

    @staticmethod
    def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
        if isinstance(prompt, str):
            return [encode_texts(tokenizer, [prompt])[0]]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return encode_texts(tokenizer, list(prompt))
        return [list(p) for p in prompt]

    def _max_tokens(self, asked: int | None, prompt_length: int) -> int:
        left = None if self.context is None else self.context - prompt_length
        if left is not None and left < 1:
            raise RequestError(
                f"the prompt has {prompt_length} tokens, which fills the model's context of {self.context}; shorten it",
                param="messages",
            )
        if asked is None:
            return min(x for x in (left, self.max_tokens_default, self.max_tokens_limit, 2**31) if x is not None)
        if self.max_tokens_limit is not None and asked > self.max_tokens_limit:
            raise RequestError(
                f"max_tokens is {asked}, above this server's limit of {self.max_tokens_limit} "
                "(--max-tokens-limit); ask for fewer",
                param="max_tokens",
            )
        if left is not None and asked > left:
            raise RequestError(
                f"max_tokens is {asked}, but the prompt ({prompt_length} tokens) leaves {left} of the "
                f"model's context of {self.context}; ask for at most {left}",
                param="max_tokens",
            )
        return asked

    def _check_length(self, lengths: list[int], tokenizer, param: str) -> None:
        """Refuse a text of ``lengths`` characters that cannot fit the context, before tokenizing it: encoding
        megabytes takes seconds on the one preparing thread, and every other request would wait for it."""
        if self.context is None or not lengths:
            return
        longest = self._longest.get(id(tokenizer))
        if longest is None:
            longest = self._longest[id(tokenizer)] = max(map(len, tokenizer.get_vocab()), default=1)
        # no token covers more characters than its vocabulary entry has (×2: a normalizer may merge characters)
        most = self.context * longest * 2
        if max(lengths) > most:
            raise RequestError(
                f"the {param} is {max(lengths):,} characters long, more than the model's context of {self.context} "
                f"tokens can hold (at most {most:,} characters); shorten it",
                param=param,
            )

    def _stop_ids(self, tokenizer) -> frozenset[int]:
        found = self._stops.get(id(tokenizer))
        if found is None:
            found = self._stops[id(tokenizer)] = frozenset(stop_token_ids(self.model, tokenizer))
        return found

    # --- running it ----------------------------------------------------------------------------------------------
    def _deliveries_on(self, loop: asyncio.AbstractEventLoop) -> Deliveries:
        """The deliveries to ``loop`` (the loop serving the requests; made on its first request)."""
        if self._deliveries is None or self._deliveries.loop is not loop:
            if self._deliveries is not None:
                self._deliveries.close()
            self._deliveries = Deliveries(loop)
        return self._deliveries

    async def events(self, job: Job) -> AsyncIterator[tuple[int, Event]]:
        """Run ``job``; yield (choice index, event) until every sequence has finished or failed. Leaving the
        iteration early cancels what still runs."""
        if self.draining:
            raise RequestError("the server is shutting down; retry on another instance", 503, "server_shutdown")
        self.pool.acquire(job.adapter_names)
        deliveries = self._deliveries_on(asyncio.get_running_loop())
        inbox: asyncio.Queue = asyncio.Queue()
        seqs: list[Sequence] = []
        try:
            await self.pool.make_resident(job.adapter_names)
            deadline = time.monotonic() + self.request_timeout
            for p, ids in enumerate(job.prompts):
                for j in range(job.n):
                    index = p * job.n + j
                    params = job.params
                    if params.seed is not None and job.n > 1:  # n samples, each reproducible and different
                        params = replace(params, seed=_nth_seed(params.seed, j))
                    sink = _sink(deliveries, inbox, index)
                    seqs.append(Sequence(ids, job.mix, params, job.tokenizer, job.stops, sink, deadline))
            try:
                for seq in seqs:
                    self.engine.submit(seq)
            except QueueFull:
                raise RequestError(
                    "the server is busy (its queue is full); retry in a moment", 429, "rate_limit_error"
                ) from None
            open_ = len(seqs)
            while open_:
                index, event = await inbox.get()
                if isinstance(event, Finished | Failed):
                    open_ -= 1
                    self._observe(job, seqs[index], event)
                yield index, event
        finally:
            unfinished = [seq for seq in seqs if not seq.done]
            for seq in unfinished:
                seq.cancel()
            if unfinished:
                self.metrics.cancelled.labels(job.model_name).inc(len(unfinished))
            self.pool.release(job.adapter_names)

    def _observe(self, job: Job, seq: Sequence, event: Event) -> None:
        m = self.metrics
        if isinstance(event, Finished):
            m.prompt_tokens.labels(job.model_name).inc(event.prompt_tokens)
            m.generated_tokens.labels(job.model_name).inc(event.completion_tokens)
            if seq.first_token_at is not None:
                m.time_to_first_token.labels(job.model_name).observe(seq.first_token_at - job.arrived)
            m.request_seconds.labels(job.model_name).observe(time.monotonic() - job.arrived)


def _nth_seed(seed: int, j: int) -> int:
    """The seed of a request's ``j``-th sample: ``seed + j``, wrapped to stay a seed (below 2**64)."""
    return seed + j if seed + j < SEED_RANGE[1] else seed + j - 2**64


def _sink(deliveries: Deliveries, inbox: asyncio.Queue, index: int):
    return deliveries.sink(lambda event: inbox.put_nowait((index, event)))
