"""The batching engine: one thread owns the model and runs every request's decoding steps together.

Continuous batching: sequences join and leave the running batch between steps. Each step runs one forward
of the whole batch — the base once, every row's adapters (or mix of adapters, or none) through the stacked
mixed-adapter path — over a left-padded KV cache (``serve.kv``). New sequences are prefilled in chunks of at
most ``prefill_tokens`` tokens between decoding steps, so a long prompt never stalls running requests for
more than one chunk. Everything else (HTTP, tokenizing, streaming) happens outside this thread: it talks to
the engine through ``submit`` and ``call`` and hears back through each sequence's sink.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loratune.adapters.mixed_batch import mixed_batch
from loratune.inference import kv
from loratune.inference.decode import inference
from loratune.inference.sampling import sample_next
from loratune.inference.sequence import Failed, Sequence, TokenLogprob
from loratune.models.devices import model_device

log = logging.getLogger("loratune.serve")


class QueueFull(Exception):
    """More sequences wait than the engine accepts; the caller should retry later."""


@dataclass
class _Rows:
    """Sequences that share a KV cache, left-padded: ``mask`` (rows × columns) marks real tokens,
    ``positions`` (rows × 1) the position of each row's next token, ``last`` (rows × 1) its last token."""

    seqs: list[Sequence]
    cache: object
    mask: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor


@dataclass
class _Prefill:
    """Sequences whose prompts are being read, ``done`` columns so far."""

    seqs: list[Sequence]
    ids: torch.Tensor  # rows × width, left-padded
    mask: torch.Tensor
    done: int = 0
    cache: object = None


class EngineStats:
    """Counters the engine updates (read by the metrics endpoint; plain attributes, written by one thread)."""

    def __init__(self):
        self.waiting = 0  # sequences queued
        self.running = 0  # sequences being read or decoded


class Engine:
    """Runs sequences on ``model`` in a background thread.

    ``max_batch``: most sequences decoding at once; ``prefill_tokens``: most prompt tokens read between two
    decoding steps; ``max_waiting``: most sequences queued before ``submit`` raises ``QueueFull``;
    ``on_step``: called (in the engine thread) after each decoding step with the number of rows and the time
    it took.
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 32,
        prefill_tokens: int = 512,
        max_waiting: int = 256,
        on_step: Callable[[int, float], None] | None = None,
    ):
        self.model = model
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.stats = EngineStats()
        self._device = model_device(model)
        self._waiting: deque[Sequence] = deque()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Condition()
        self._running: _Rows | None = None
        self._prefill: _Prefill | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="loratune-engine", daemon=True)
        self._checked_cache = False
        self._routing = contextlib.ExitStack()
        self._routing_key: tuple | None = None

    # --- from any thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail what is still queued or running and end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raises ``QueueFull`` when ``max_waiting`` sequences already wait."""
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(seq)
            self.stats.waiting = len(self._waiting)
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` in the engine thread between two steps (e.g. load an adapter); its result or exception
        arrives in the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        with self._wake:
            self._wake.notify()
        return future

    def _in_flight(self) -> list[Sequence]:
        running = self._running.seqs if self._running else []
        prefill = self._prefill.seqs if self._prefill else []
        return [*list(self._waiting), *prefill, *running]

    # --- the engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with inference(self.model):
            while True:
                with self._wake:
                    while not self._stop and not self._has_work():
                        self._wake.wait(timeout=1.0)
                    if self._stop:
                        break
                self._run_calls()
                try:
                    self._step()
                except Exception as error:
                    log.exception("engine step failed")
                    self._fail_all(Failed(f"generation failed: {type(error).__name__}: {error}"))
            self._run_calls()
            self._unroute()
            self._fail_all(Failed("the server is shutting down", "server_shutdown", 503))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._prefill or not self._calls.empty())

    def _run_calls(self) -> None:
        if not self._calls.empty():
            self._unroute()
        while not self._calls.empty():
            fn, future = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    future.set_exception(error)

    def _fail_all(self, failure: Failed) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*waiting, *self._in_flight()]:
            seq.fail(failure)
        self._running = self._prefill = None
        self.stats.running = self.stats.waiting = 0

    def _step(self) -> None:
        self._drop_finished()
        if self._prefill is None:
            self._prefill = self._next_prefill()
        if self._prefill is not None:
            try:
                self._prefill_chunk()
            except Exception as error:
                log.exception("prefill failed")
                for seq in self._prefill.seqs:
                    seq.fail(Failed(f"generation failed: {type(error).__name__}: {error}"))
                self._prefill = None
        self._run_calls()  # a load or unload waits for one prefill chunk or one step, not both
        if self._running is not None:
            started = time.perf_counter()
            rows = len(self._running.seqs)
            self._decode()
            if self.on_step is not None:
                self.on_step(rows, time.perf_counter() - started)
        self.stats.running = len(self._running.seqs) if self._running else 0

    def _next_prefill(self) -> _Prefill | None:
        """The oldest waiting sequences that fit: as many as the batch has room for, their prompts together
        within ``prefill_tokens`` (a longer prompt goes alone, in chunks)."""
        room = self.max_batch - (len(self._running.seqs) if self._running else 0)
        taken: list[Sequence] = []
        with self._wake:
            while self._waiting and len(taken) < room:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    continue
                if taken and sum(len(s.prompt_ids) for s in taken) + len(seq.prompt_ids) > self.prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
            self.stats.waiting = len(self._waiting)
        if not taken:
            return None
        width = max(len(s.prompt_ids) for s in taken)
        ids = torch.zeros((len(taken), width), dtype=torch.long)
        mask = torch.zeros((len(taken), width), dtype=torch.long)
        for i, seq in enumerate(taken):
            ids[i, width - len(seq.prompt_ids) :] = torch.as_tensor(seq.prompt_ids)
            mask[i, width - len(seq.prompt_ids) :] = 1
        return _Prefill(taken, ids.to(self._device), mask.to(self._device))

    def _prefill_chunk(self) -> None:
        job = self._prefill
        width = job.ids.shape[1]
        chunk = max(1, self.prefill_tokens // len(job.seqs))
        end = min(width, job.done + chunk)
        positions = (job.mask.cumsum(-1) - 1).clamp(min=0)
        with self._routed(job.seqs):
            out = self.model(
                input_ids=job.ids[:, job.done : end],
                attention_mask=job.mask[:, :end],
                position_ids=positions[:, job.done : end],
                cache=job.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        job.cache, job.done = out.cache, end
        if not self._checked_cache:
            kv.check_cache(job.cache)
            self._checked_cache = True
        if end < width:
            return
        self._prefill = None
        rows = _Rows(job.seqs, job.cache, job.mask, positions[:, -1:] + 1, torch.zeros_like(positions[:, -1:]))
        self._accept(rows, out.logits[:, -1, :])
        self._join(rows)

    def _decode(self) -> None:
        rows = self._running
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((rows.mask.shape[0], 1))], dim=-1)
        with self._routed(rows.seqs):
            out = self.model(
                input_ids=rows.last,
                attention_mask=rows.mask,
                position_ids=rows.positions,
                cache=rows.cache,
                use_cache=True,
            )
        rows.cache = out.cache
        rows.positions = rows.positions + 1
        self._accept(rows, out.logits[:, -1, :])
        self._drop_finished()

    @contextlib.contextmanager
    def _routed(self, seqs: list[Sequence]):
        """Route row i through ``seqs[i]``'s adapters for one forward. The routing stays on the layers between
        steps while the batch keeps its rows (no walk over the model per step); a change of rows or an
        engine call (which may load or free adapters) sets it again."""
        key = tuple(s.routing_key for s in seqs)
        if key != self._routing_key:
            self._unroute()
            self._routing.enter_context(mixed_batch(self.model, key))
            self._routing_key = key
        yield

    def _unroute(self) -> None:
        self._routing.close()
        self._routing_key = None

    def _accept(self, rows: _Rows, logits: torch.Tensor) -> None:
        """Pick each row's next token and hand it to its sequence."""
        logits = logits.float()
        chosen = logits.argmax(dim=-1)
        for i, seq in enumerate(rows.seqs):
            if seq.params.temperature:
                p = seq.params
                chosen[i] = sample_next(logits[i : i + 1], p.temperature, p.top_p, p.top_k, seq.generator)[0]
        tokens = chosen.tolist()
        rows.last = chosen[:, None].to(rows.last.device)
        now = time.monotonic()
        for i, seq in enumerate(rows.seqs):
            if seq.done or seq.cancelled:
                continue
            if seq.deadline is not None and now > seq.deadline:
                seq.fail(
                    Failed("the request took longer than the server's time limit (--request-timeout)", "timeout", 504)
                )
                continue
            logprob = _logprob(logits[i], tokens[i], seq.params.logprobs) if seq.params.logprobs is not None else None
            seq.accept(tokens[i], logprob)

    def _join(self, new: _Rows) -> None:
        keep = [i for i, s in enumerate(new.seqs) if not (s.done or s.cancelled)]
        if len(keep) < len(new.seqs):
            new = _select(new, keep)
            if new is None:
                return
        old = self._running
        if old is None:
            self._running = new
            return
        width_old, width_new = old.mask.shape[1], new.mask.shape[1]
        for rows, extra in ((old, width_new - width_old), (new, width_old - width_new)):
            if extra > 0:
                kv.pad_left(rows.cache, extra)
                rows.mask = torch.cat([rows.mask.new_zeros((rows.mask.shape[0], extra)), rows.mask], dim=-1)
        kv.stack_rows(old.cache, new.cache)
        self._running = _Rows(
            old.seqs + new.seqs,
            old.cache,
            torch.cat([old.mask, new.mask]),
            torch.cat([old.positions, new.positions]),
            torch.cat([old.last, new.last]),
        )

    def _drop_finished(self) -> None:
        rows = self._running
        if rows is None:
            return
        keep = [i for i, s in enumerate(rows.seqs) if not (s.done or s.cancelled)]
        if len(keep) < len(rows.seqs):
            self._running = _select(rows, keep)


def _select(rows: _Rows, keep: list[int]) -> _Rows | None:
    """The rows ``keep`` of ``rows`` (None when none is left), without columns that are padding for all."""
    if not keep:
        return None
    index = torch.tensor(keep, device=rows.mask.device)
    kv.keep_rows(rows.cache, index)
    mask = rows.mask.index_select(0, index)
    unused = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding columns
    kv.drop_left(rows.cache, unused)
    return _Rows(
        [rows.seqs[i] for i in keep],
        rows.cache,
        mask[:, unused:],
        rows.positions.index_select(0, index),
        rows.last.index_select(0, index),
    )


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits, dim=-1)
    best = torch.topk(logprobs, top) if top else None
    alternatives = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
