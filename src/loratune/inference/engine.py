"""The batching engine: one thread owns the model and runs every request's decoding steps together.

Continuous batching: sequences join and leave the running batch between steps. Each step runs one forward
of the whole batch — the base once, every row's adapters (or mix of adapters, or none) through the stacked
mixed-adapter path — over a left-padded KV cache (``inference.kv``). New sequences are prefilled in chunks of
at most ``prefill_tokens`` tokens between decoding steps, so a long prompt never stalls running requests for
more than one chunk. Everything else (reading files, tokenizing, HTTP, streaming) happens outside this
thread: it talks to the engine through ``submit`` and ``call`` (short work on the model between two steps,
such as attaching an adapter read elsewhere) and hears back through each sequence's sink.

Admission: waiting sequences start in arrival order, as many as the batch has room for, their prompts within
``prefill_tokens``. With ``max_adapters`` N, a decoding batch never runs more than N distinct adapters (a
row with a mix counts each adapter of the mix). A sequence that would bring the batch over N waits; behind it
only sequences that add no adapter to the batch may start, and at most ``max_batch`` of them: after that
nothing new starts until it fits (the running rows finish, their adapters leave), so it is never starved.

``batch_invariant``: every row computed alone (``kernels.rows.batch_invariant``), so that a request's answer is
the same bits whatever else the batch holds, in bf16 too; it slows the reading of long prompts.

One writer per piece of state: the engine thread alone changes the batch and publishes ``stats`` (an
immutable snapshot, read from any thread); the waiting queue is shared under one lock.
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
from loratune.errors import ConfigError
from loratune.inference import kv
from loratune.inference.block_step import decode_logits
from loratune.inference.decode import inference
from loratune.inference.prefix_cache import PromptPrefixes
from loratune.inference.sampling import sample_next
from loratune.inference.sequence import Failed, Sequence, TokenLogprob
from loratune.kernels import rows as rows_kernel
from loratune.models.devices import model_device

log = logging.getLogger("loratune.serve")


class QueueFull(Exception):
    """More sequences wait than the engine accepts; the caller should retry later."""


class NotANumber(Exception):
    """A row of the model's output holds NaN, or its largest value is infinite: no token can be chosen from it."""


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
    """Sequences whose prompts are being read, ``done`` columns so far. Sequences with the same prompt and
    adapters (a GRPO group, a request's ``n`` choices) share one row: ``rows[i]`` is ``seqs[i]``'s row of ``ids``,
    whose routing is that of ``readers``, and the rows are copied out to every sequence when the prompts are
    read."""

    seqs: list[Sequence]
    ids: torch.Tensor  # distinct rows × width, left-padded
    mask: torch.Tensor
    rows: torch.Tensor  # per sequence, its row of ids
    readers: list[Sequence]  # per row, the first sequence reading it
    done: int = 0
    cache: object = None


@dataclass(frozen=True)
class EngineStats:
    """What the engine was doing when it last published (after each step, and when it wakes up): a snapshot
    written by the engine thread only, so every reader sees one consistent set of numbers."""

    waiting: int = 0  # sequences queued
    running: int = 0  # sequences being read or decoded
    steps: int = 0  # decoding steps run so far
    adapters: int = 0  # distinct adapters in the last decoding step
    most_adapters: int = 0  # the most distinct adapters any decoding step has run


class Engine:
    """Runs sequences on ``model`` in a background thread.

    ``max_batch``: most sequences decoding at once; ``prefill_tokens``: most prompt tokens read between two
    decoding steps; ``max_waiting``: most sequences queued before ``submit`` raises ``QueueFull``;
    ``max_adapters``: most distinct adapters in one decoding batch (None: no limit; see the module docstring
    for the admission rule); ``on_step``: called (in the engine thread) after each decoding step with the
    number of rows, the number of distinct adapters and the time it took; ``prefix_cache_mb``: the most memory
    the keys and values of recent prompts may take, kept so that a prompt read alone reads only what follows the
    longest start it shares with one of them under the same adapters (``inference.prefix_cache``; 0: off).
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 32,
        prefill_tokens: int = 512,
        max_waiting: int = 256,
        max_adapters: int | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        prefix_cache_mb: float = 64,
        batch_invariant: bool = False,
    ):
        if max_adapters is not None and max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1 (or None for no limit), got {max_adapters}")
        self.model = model
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.max_waiting = max_waiting
        self.max_adapters = max_adapters
        self.on_step = on_step
        self.batch_invariant = batch_invariant
        self._stats = EngineStats()
        self._published = threading.Condition()  # notified whenever the engine thread publishes stats
        self._device = model_device(model)
        self._waiting: deque[Sequence] = deque()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Condition()  # guards _waiting, _stop and _closed
        self._running: _Rows | None = None
        self._prefill: _Prefill | None = None
        self._stop = False
        self._closed = False  # the thread has ended: calls are refused
        self._thread = threading.Thread(target=self._loop, name="loratune-engine", daemon=True)
        self._checked_cache = False
        self._routing = contextlib.ExitStack()
        self._routing_key: tuple | None = None
        self._decoded: _Rows | None = None  # the rows the last step decoded, while nothing else happened since
        self._held: Sequence | None = None  # the oldest sequence that max_adapters holds back
        self._overtaken = 0  # how many sequences started ahead of it
        self._steps = 0  # what _publish reports (engine thread only)
        self._step_adapters = 0
        self._most_adapters = 0
        self._prefixes = PromptPrefixes(int(prefix_cache_mb * 2**20))

    # --- from any thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail what is still queued or running and end the thread."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def stats(self) -> EngineStats:
        """The latest snapshot the engine thread published."""
        return self._stats

    def wait_for_stats(self, predicate: Callable[[EngineStats], bool], timeout: float) -> EngineStats:
        """Block until a published snapshot satisfies ``predicate`` (or ``timeout`` seconds pass); return the
        latest snapshot either way."""
        with self._published:
            self._published.wait_for(lambda: predicate(self._stats), timeout)
            return self._stats

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raises ``QueueFull`` when ``max_waiting`` sequences already wait, ``ValueError`` when
        it uses more adapters than ``max_adapters`` (it could never start)."""
        if self.max_adapters is not None and len(seq.adapters) > self.max_adapters:
            raise ValueError(f"the sequence uses {len(seq.adapters)} adapters, above max_adapters {self.max_adapters}")
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(seq)
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` in the engine thread between two steps (e.g. attach an adapter read elsewhere); its result
        or exception arrives in the returned future (a ``RuntimeError`` once the engine has stopped). ``fn``
        holds up every running sequence while it runs: keep it short."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._closed:
                future.set_exception(RuntimeError("the engine has stopped"))
                return future
            self._calls.put((fn, future))
            self._wake.notify()
        return future

    def run(self, seqs: list[Sequence]) -> None:
        """Run ``seqs`` to their end on the calling thread, then return: for a caller that owns the model between
        uses, such as a training run generating its rollouts on the weights it trains (no thread, no queue
        limit). Only for an engine whose thread was never started; an error in a step propagates, the engine
        left empty."""
        if self._thread.is_alive():
            raise RuntimeError("Engine.run drives an engine on the calling thread; this one runs its own thread")
        self._prefixes.clear()  # (the caller may have changed the weights since its last run)
        with inference(self.model), rows_kernel.batch_invariant(self.batch_invariant):
            with self._wake:
                self._waiting.extend(seqs)
            try:
                while self._has_work():
                    self._run_calls()
                    self._step()
            except BaseException:
                self._fail_all(Failed("generation stopped"))
                raise
            finally:
                self._unroute()

    def _in_flight(self) -> list[Sequence]:
        running = self._running.seqs if self._running else []
        prefill = self._prefill.seqs if self._prefill else []
        return [*list(self._waiting), *prefill, *running]

    # --- the engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with inference(self.model), rows_kernel.batch_invariant(self.batch_invariant):
            while True:
                with self._wake:
                    while not self._stop and not self._has_work():
                        self._wake.wait()
                    if self._stop:
                        break
                self._run_calls()
                try:
                    self._step()
                except Exception as error:
                    log.exception("engine step failed")
                    self._fail_all(Failed(f"generation failed: {type(error).__name__}: {error}"))
                self._publish()
            with self._wake:
                self._closed = True  # calls made from now on are refused, so none is left unanswered
            self._run_calls()
            self._unroute()
            self._fail_all(Failed("the server is shutting down", "server_shutdown", 503))
            self._publish()

    def _publish(self) -> None:
        with self._wake:
            waiting = len(self._waiting)
        running = len(self._running.seqs) if self._running else 0
        running += len(self._prefill.seqs) if self._prefill else 0
        stats = EngineStats(waiting, running, self._steps, self._step_adapters, self._most_adapters)
        with self._published:
            self._stats = stats
            self._published.notify_all()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._prefill or not self._calls.empty())

    def _run_calls(self) -> None:
        if not self._calls.empty():
            self._unroute()
            self._prefixes.clear()  # a call may load or free adapters: no prompt read before stays valid
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
        self._running = self._prefill = self._held = None

    def _step(self) -> None:
        self._drop_finished()
        self._drop_cancelled_waiting()
        if self._prefill is None:
            self._prefill = self._next_prefill()
        if self._prefill is not None:
            job = self._prefill  # (held here: a chunk that completes the prompts takes it off self._prefill)
            try:
                self._prefill_chunk()
            except Exception as error:
                log.exception("prefill failed")
                self._prefill = None
                for seq in job.seqs:
                    seq.fail(Failed(f"generation failed: {type(error).__name__}: {error}"))
        self._run_calls()  # an engine call waits for one prefill chunk or one step, not both
        if self._running is not None:
            started = time.perf_counter()
            rows = len(self._running.seqs)
            adapters = len(_adapters_of(self._running.seqs))
            self._decode()
            self._steps += 1
            self._step_adapters = adapters
            self._most_adapters = max(self._most_adapters, adapters)
            if self.on_step is not None:
                self.on_step(rows, adapters, time.perf_counter() - started)

    def _drop_cancelled_waiting(self) -> None:
        """Take cancelled sequences out of the queue at once, not when admission reaches them: a full batch may
        not admit anyone for long, and meanwhile they would count as waiting and hold queue places."""
        with self._wake:
            if any(seq.cancelled for seq in self._waiting):
                self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)

    def _next_prefill(self) -> _Prefill | None:
        """The waiting sequences to start now (see the module docstring): in arrival order, as many as the
        batch has room for, their prompts together within ``prefill_tokens`` (a longer prompt goes alone, in
        chunks), the batch's distinct adapters within ``max_adapters``."""
        running = self._running.seqs if self._running else []
        room = self.max_batch - len(running)
        if room <= 0:
            return None
        in_batch = _adapters_of(running)
        taken: list[Sequence] = []
        tokens = 0
        held = None
        scanned_all = True
        with self._wake:
            left: deque[Sequence] = deque()
            while self._waiting:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    continue
                if len(taken) >= room or (taken and tokens + len(seq.prompt_ids) > self.prefill_tokens):
                    left.append(seq)
                    left.extend(self._waiting)
                    self._waiting.clear()
                    scanned_all = False
                    break
                new = seq.adapters.keys() - in_batch
                if held is not None and (new or self._overtaken >= self.max_batch):
                    left.append(seq)  # behind a held sequence: only a bounded number that add no adapter
                    continue
                if new and self.max_adapters is not None and len(in_batch) + len(new) > self.max_adapters:
                    held = seq
                    if seq is not self._held:
                        self._held, self._overtaken = seq, 0
                    left.append(seq)
                    continue
                if held is not None:
                    self._overtaken += 1
                taken.append(seq)
                tokens += len(seq.prompt_ids)
                in_batch |= new
            self._waiting = left
        if held is None and scanned_all:
            self._held = None  # (a scan cut short may not have reached it: keep its count)
        if not taken:
            return None
        row_of: dict[tuple, int] = {}  # (prompt, adapters) -> its row
        readers: list[Sequence] = []
        rows = []
        for seq in taken:
            key = (tuple(seq.prompt_ids), seq.routing_key)
            if key not in row_of:
                row_of[key] = len(readers)
                readers.append(seq)
            rows.append(row_of[key])
        width = max(len(s.prompt_ids) for s in taken)
        ids = torch.zeros((len(readers), width), dtype=torch.long)
        mask = torch.zeros((len(readers), width), dtype=torch.long)
        for i, seq in enumerate(readers):
            ids[i, width - len(seq.prompt_ids) :] = torch.as_tensor(seq.prompt_ids)
            mask[i, width - len(seq.prompt_ids) :] = 1
        index = torch.tensor(rows, device=self._device)
        job = _Prefill(taken, ids.to(self._device), mask.to(self._device), index, readers)
        if len(readers) == 1:  # one prompt: it may start as one read before (see inference.prefix_cache)
            found = self._prefixes.start_of(readers[0].routing_key, readers[0].prompt_ids, self.model.config)
            if found is not None:
                job.done, job.cache = found
        return job

    def _prefill_chunk(self) -> None:
        job = self._prefill
        self._decoded = None  # (its forward may share the running rows' routing, and leave plans of its own)
        width = job.ids.shape[1]
        chunk = max(1, self.prefill_tokens // len(job.readers))
        end = min(width, job.done + chunk)
        positions = (job.mask.cumsum(-1) - 1).clamp(min=0)
        with self._routed(job.readers):
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
        if len(job.readers) == 1:
            self._prefixes.keep(job.readers[0].routing_key, job.readers[0].prompt_ids, job.cache)
        if len(job.readers) < len(job.seqs):  # each shared row copied out to its sequences
            kv.keep_rows(job.cache, job.rows)
        mask, positions = job.mask[job.rows], positions[job.rows]
        rows = _Rows(job.seqs, job.cache, mask, positions[:, -1:] + 1, torch.zeros_like(positions[:, -1:]))
        self._accept(rows, out.logits[job.rows, -1, :])
        self._join(rows)

    def _decode(self) -> None:
        rows = self._running
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((rows.mask.shape[0], 1))], dim=-1)
        with self._routed(rows.seqs):
            # the same rows as the last step with nothing in between (no prefill, engine call, rerouting or row
            # surgery, each of which makes new _Rows or clears _decoded): the step may skip its checks
            unchanged, self._decoded = self._decoded is rows, None
            # the columns the steps after this one may append: the most tokens a row has left, less this one's
            room = max(seq.params.max_tokens - len(seq.tokens) for seq in rows.seqs) - 1
            logits, rows.cache = decode_logits(
                self.model, rows.last, rows.mask, rows.positions, rows.cache, unchanged=unchanged, room=room
            )
            self._decoded = rows
        rows.positions = rows.positions + 1
        self._accept(rows, logits)
        self._drop_finished()

    @contextlib.contextmanager
    def _routed(self, seqs: list[Sequence]):
        """Route row i through ``seqs[i]``'s adapters for one forward. The routing stays on the layers between
        steps while the batch keeps its rows (no walk over the model per step); a change of rows or an
        engine call (which may load or free adapters) sets it again."""
        key = tuple(s.routing_key for s in seqs)
        if key != self._routing_key:
            self._unroute()  # (which also ends what the last decoding step vouched for)
            self._routing.enter_context(mixed_batch(self.model, key))
            self._routing_key = key
        yield

    def _unroute(self) -> None:
        self._routing.close()
        self._routing_key = None
        self._decoded = None

    def _accept(self, rows: _Rows, logits: torch.Tensor) -> None:
        """Pick each row's next token and hand it to its sequence. A row that cannot go on (past its deadline,
        an output that is not a number, its sampling or its sequence failing) fails alone: its sequence gets
        the error, and the other rows take their tokens as if it were not there."""
        logits = logits.float()
        best, tokens = logits.max(dim=-1)
        tokens = tokens.tolist()
        # NaN anywhere in a row makes its max NaN; a max of +inf or -inf leaves no token to choose either
        broken = (~best.isfinite()).tolist()
        now = time.monotonic()
        for i, seq in enumerate(rows.seqs):
            if seq.done or seq.cancelled:
                continue
            try:
                tokens[i] = self._next_token(seq, logits[i], tokens[i], broken[i], now)
            except Exception as error:
                log.exception("a sequence failed; the others go on")
                seq.fail(_failure(error))
        rows.last = torch.tensor(tokens, dtype=rows.last.dtype, device=rows.last.device)[:, None]

    @staticmethod
    def _next_token(seq: Sequence, logits: torch.Tensor, greedy: int, broken: bool, now: float) -> int:
        """``seq``'s next token from its row of ``logits`` (``greedy``: their argmax), handed to it."""
        if seq.deadline is not None and now > seq.deadline:
            seq.fail(Failed("the request took longer than the server's time limit (--request-timeout)", "timeout", 504))
            return greedy
        if broken:
            raise NotANumber(
                "the model's output for this request is not a number (NaN or infinite), so no token can be "
                "chosen; an extreme adapter strength can cause this"
            )
        p = seq.params
        token = greedy
        if p.temperature:
            token = int(sample_next(logits[None], p.temperature, p.top_p, p.top_k, seq.generator)[0])
        seq.accept(token, _logprob(logits, token, p.logprobs) if p.logprobs is not None else None)
        return token

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


def _failure(error: Exception) -> Failed:
    """What a sequence whose own step raised ``error`` tells its client: a 400 for sampling options that cannot
    mean anything (the request's fault), else a 500."""
    if isinstance(error, ConfigError):
        return Failed(str(error), "invalid_request_error", 400)
    if isinstance(error, NotANumber):
        return Failed(str(error))
    return Failed(f"generation failed: {type(error).__name__}: {error}")


def _adapters_of(seqs: list[Sequence]) -> set[str]:
    """The distinct adapters ``seqs`` run (each adapter of a mix counts)."""
    return {name for seq in seqs for name in seq.adapters}


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
