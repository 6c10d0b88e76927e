"""The adapters a server knows, which of them are in memory, and who is using them.

Every known adapter has a name, a directory and a default strength. At most ``max_loaded`` are held in
memory; bringing one more in evicts the least recently used that no request is using (adapters given on the
command line are pinned, never evicted). An evicted adapter stays known and is read back from its directory
by the next request that names it.

Three threads take part, each with its own share of the work: the event loop asks (``load``, ``unload``,
``make_resident``, ``acquire``/``release``); the reader thread does the disk work (``serve.reading``: config,
tokenizer, tensors); the engine thread attaches the read tensors to the model, evicts and frees, between two
decoding steps (``Engine.call``), so no running stream waits for a disk. Every field of a ``ServedAdapter``
that changes is written under the pool's lock; ``unload`` waits on a future that the last ``release``
completes, not on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loratune.adapters import attach_adapter, delete_adapter, set_active
from loratune.adapters.peft_format import model_name_of
from loratune.errors import LoratuneError
from loratune.inference.engine import Engine
from loratune.serve import reading
from loratune.serve.protocol import RequestError

log = logging.getLogger("loratune.serve")

DEFAULT_MAX_LOADED = 16


@dataclass(eq=False)
class ServedAdapter:
    """A known adapter. ``name`` to ``replaces_modules`` never change; the fields after them are the pool's,
    written under its lock."""

    name: str
    path: Path
    strength: float = 1.0
    pinned: bool = False
    tokenizer: object | None = None  # the adapter directory's own tokenizer, when it has one
    replaces_modules: bool = False  # carries modules_to_save (whole modules, not low-rank terms)
    resident: bool = False  # attached to the model (written by the engine thread)
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0  # requests using it (and a load in progress)
    unloading: bool = False
    arriving: Future | None = None  # being read and attached
    idle: Future | None = None  # completed when in_flight drops to 0 (an unload waits on it)


class AdapterPool:
    """Known adapters of one served base model (see the module docstring)."""

    def __init__(
        self, model, engine: Engine, *, max_loaded: int = DEFAULT_MAX_LOADED, adapter_root: Path | None = None
    ):
        self.model = model
        self.engine = engine
        self.max_loaded = max_loaded
        self.adapter_root = None if adapter_root is None else Path(adapter_root).resolve()
        self._adapters: dict[str, ServedAdapter] = {}
        self._lock = threading.Lock()
        set_active(model, [])  # nothing acts outside a request's routing; attached adapters stay inactive
        # One reader: reads run one at a time, so a burst of loads crowds neither the CPU nor the memory. (Not at a
        # lower priority: descheduled while it holds the GIL, it would stall the engine thread instead.)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="loratune-adapter-reader")

    def close(self) -> None:
        """Stop the reader thread (reads not started are dropped)."""
        self._reader.shutdown(wait=False, cancel_futures=True)

    # --- what requests see ---------------------------------------------------------------------------------
    def listed(self) -> list[ServedAdapter]:
        """Known adapters in the order they were added (without those being unloaded)."""
        with self._lock:
            return [a for a in self._adapters.values() if not a.unloading]

    def in_memory(self) -> int:
        """How many known adapters are attached to the model now."""
        with self._lock:
            return sum(a.resident for a in self._adapters.values() if not a.unloading)

    def get(self, name: str) -> ServedAdapter | None:
        with self._lock:
            found = self._adapters.get(name)
            return None if found is None or found.unloading else found

    def acquire(self, names: list[str]) -> None:
        """Count a request as using ``names`` (so none of them is evicted or unloaded under it). Raises
        ``RequestError`` (404) for a name that is not known."""
        with self._lock:
            missing = [n for n in names if n not in self._adapters or self._adapters[n].unloading]
            if missing:
                raise RequestError(
                    f"adapter {missing[0]!r} is not loaded", 404, "invalid_request_error", "model_not_found"
                )
            for name in names:
                adapter = self._adapters[name]
                adapter.in_flight += 1
                adapter.last_used = time.monotonic()

    def release(self, names: list[str]) -> None:
        """The end of an ``acquire``."""
        with self._lock:
            for name in names:
                if name in self._adapters:
                    self._release(self._adapters[name])

    def _release(self, adapter: ServedAdapter) -> None:  # under the lock
        adapter.in_flight -= 1
        if adapter.in_flight == 0 and adapter.idle is not None:
            adapter.idle.set_result(None)
            adapter.idle = None

    async def make_resident(self, names: list[str]) -> None:
        """Bring back any of ``names`` that were evicted: read on the reader thread, attached by the engine
        between two steps. The caller must hold them (``acquire``)."""
        with self._lock:
            arrivals = [self._arrival(self._adapters[n]) for n in names if not self._adapters[n].resident]
        for arrival in arrivals:
            # shielded: the arrival is shared by every request waiting on it, and a request whose client goes
            # away is cancelled here, which must not cancel the others' wait (nor the attach under way)
            await asyncio.shield(asyncio.wrap_future(arrival))

    # --- loading and unloading -----------------------------------------------------------------------------
    def add_at_start(self, name: str, path: str | os.PathLike, strength: float = 1.0) -> ServedAdapter:
        """Load an adapter given on the command line (pinned), before the engine starts (in this thread)."""
        adapter = self._new(name, Path(path), strength, pinned=True)
        config, tensors = reading.read(adapter.path)
        with self._lock:
            self._adapters[name] = adapter
        self._attach(adapter, config, tensors)
        return adapter

    async def load(self, name: str, lora_path: str) -> ServedAdapter:
        """``POST /v1/load_lora_adapter``: load ``lora_path`` (inside ``--adapter-root``) as ``name``; returns
        once requests can use it."""
        if self.adapter_root is None:
            raise RequestError(
                "loading adapters at run time is off; start the server with --adapter-root DIR", 403, "permission_error"
            )
        adapter = await asyncio.wrap_future(self._reader.submit(self._new_inside_root, name, lora_path))
        with self._lock:
            if name in self._adapters:
                raise RequestError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
            self._adapters[name] = adapter
            adapter.in_flight += 1  # not evictable while it loads
            arrival = self._arrival(adapter)
        try:
            await asyncio.wrap_future(arrival)
        except Exception:
            with self._lock:
                self._release(adapter)
                self._forget(adapter)
            raise
        with self._lock:
            self._release(adapter)
        log.info("loaded adapter %s from %s", name, adapter.path)
        return adapter

    async def unload(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``: stop taking requests for ``name``, let running ones finish, then
        free it. Raises ``RequestError`` (404) for an unknown name."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.unloading:
                raise RequestError(f"adapter {name!r} is not loaded", 404, "invalid_request_error", "model_not_found")
            adapter.unloading = True
            if adapter.in_flight > 0:
                adapter.idle = Future()
            waits = [f for f in (adapter.idle, adapter.arriving) if f is not None]
        for wait in waits:
            # a failed read or attach leaves nothing to free
            await asyncio.wait([asyncio.wrap_future(wait)])
        await asyncio.wrap_future(self.engine.call(lambda: self._take_out(adapter)))
        with self._lock:
            self._forget(adapter)
        log.info("unloaded adapter %s", name)

    def _forget(self, adapter: ServedAdapter) -> None:  # under the lock
        if self._adapters.get(adapter.name) is adapter:
            del self._adapters[adapter.name]

    def inside_root(self, lora_path: str) -> Path:
        """``lora_path`` (absolute or relative to ``--adapter-root``) resolved, when it lies inside the root."""
        if not lora_path or "\x00" in lora_path:
            raise RequestError("lora_path must be a non-empty path")
        given = Path(lora_path)
        if ".." in given.parts:
            raise RequestError(f"lora_path {lora_path!r} contains '..'; give a path inside the adapter root")
        resolved = (given if given.is_absolute() else self.adapter_root / given).resolve()
        if not resolved.is_relative_to(self.adapter_root):
            raise RequestError(
                f"lora_path {lora_path!r} is outside the adapter root {self.adapter_root} "
                "(symbolic links out of it are refused too)"
            )
        return resolved

    # --- on the reader thread ----------------------------------------------------------------------------------
    def _new_inside_root(self, name: str, lora_path: str) -> ServedAdapter:
        return self._new(name, self.inside_root(lora_path), 1.0, pinned=False)

    def _new(self, name: str, path: Path, strength: float, pinned: bool) -> ServedAdapter:
        """A new entry for the adapter at ``path``, after reading its config (see ``reading.inspect``)."""
        reading.check_name(name)
        found = reading.inspect(path, model_name_of(self.model))
        return ServedAdapter(name, path, strength, pinned, found.tokenizer, found.replaces_modules)

    def _arrival(self, adapter: ServedAdapter) -> Future:
        """The future of ``adapter`` being read and attached, started unless it already is (call under the
        lock)."""
        if adapter.arriving is None:
            arrival: Future = Future()
            try:
                self._reader.submit(self._bring_in, adapter, arrival)
            except RuntimeError:  # the reader has stopped: the server is closing
                raise RequestError("the server is shutting down", 503, "server_shutdown") from None
            adapter.arriving = arrival
        return adapter.arriving

    def _bring_in(self, adapter: ServedAdapter, arrival: Future) -> None:
        """Read ``adapter``'s tensors (on the reader thread) and hand them to the engine to attach; ``arrival``
        completes when it is attached (or failed to be)."""
        try:
            config, tensors = reading.read(adapter.path)
            attached = self.engine.call(lambda: self._attach(adapter, config, tensors))
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits
            self._arrived(adapter, arrival, error)
            return
        attached.add_done_callback(lambda done: self._arrived(adapter, arrival, done.exception()))

    def _arrived(self, adapter: ServedAdapter, arrival: Future, error: BaseException | None) -> None:
        with self._lock:
            adapter.arriving = None
        if error is None:
            arrival.set_result(None)
        else:
            arrival.set_exception(error)

    # --- on the engine thread (or before it starts) -------------------------------------------------------------
    def _attach(self, adapter: ServedAdapter, config, tensors) -> None:
        if adapter.resident:
            return
        self._evict_for_one_more(keep=adapter.name)
        try:  # inactive: each request's rows route to it (and activating would walk the model once more)
            attach_adapter(self.model, config, tensors, adapter.path, name=adapter.name, as_plain=True, activate=False)
        except LoratuneError as error:
            raise RequestError(str(error)) from None
        with self._lock:
            adapter.resident = True

    def _take_out(self, adapter: ServedAdapter) -> None:
        if adapter.resident:
            with self._lock:
                adapter.resident = False
            delete_adapter(self.model, adapter.name)

    def _evict_for_one_more(self, keep: str) -> None:
        # Chosen and marked under the lock: a request that takes a victim right after sees it as not in memory
        # and reads it back (its attach runs after this one, before its sequence is submitted).
        with self._lock:
            resident = [a for a in self._adapters.values() if a.resident]
            idle = sorted(
                (a for a in resident if not a.pinned and a.in_flight == 0 and a.name != keep), key=lambda a: a.last_used
            )
            victims = idle[: max(0, len(resident) + 1 - self.max_loaded)]
            for victim in victims:
                victim.resident = False
        for victim in victims:
            delete_adapter(self.model, victim.name)
            log.info("evicted adapter %s (least recently used; --max-loaded %d)", victim.name, self.max_loaded)
