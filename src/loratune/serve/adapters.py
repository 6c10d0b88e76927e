"""The adapters a server knows, which of them are in memory, and who is using them.

Every known adapter has a name, a directory and a default strength. At most ``max_loaded`` are held in
memory; loading one more evicts the least recently used that no request is using (adapters given on the
command line are pinned, never evicted). An evicted adapter stays known and is read back from its directory
by the next request that names it. Changes to the model happen in the engine thread (``Engine.call``); the
bookkeeping here is guarded by one lock, so HTTP handlers can read it from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loratune.adapters import delete_adapter, load_adapter, read_adapter_config, set_active
from loratune.adapters.peft_format import model_name_of
from loratune.errors import AdapterLoadError, ConfigError, LoratuneError
from loratune.inference.engine import Engine
from loratune.outputs import being_written
from loratune.serve.protocol import RequestError

log = logging.getLogger("loratune.serve")

DEFAULT_MAX_LOADED = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ServedAdapter:
    name: str
    path: Path
    strength: float = 1.0
    pinned: bool = False
    tokenizer: object | None = None  # the adapter directory's own tokenizer, when it has one
    resident: bool = False
    replaces_modules: bool = False  # carries modules_to_save (whole modules, not low-rank terms)
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    unloading: bool = False


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

    # --- what requests see ---------------------------------------------------------------------------------
    def listed(self) -> list[ServedAdapter]:
        """Known adapters in the order they were added (without those being unloaded)."""
        with self._lock:
            return [a for a in self._adapters.values() if not a.unloading]

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
        with self._lock:
            for name in names:
                if name in self._adapters:
                    self._adapters[name].in_flight -= 1

    async def make_resident(self, names: list[str]) -> None:
        """Read back any of ``names`` that were evicted (in the engine thread, between steps)."""
        with self._lock:
            missing = [self._adapters[n] for n in names if not self._adapters[n].resident]
        if missing:
            await asyncio.wrap_future(self.engine.call(lambda: [self._bring_in(a) for a in missing]))

    # --- loading and unloading -----------------------------------------------------------------------------
    def add_at_start(self, name: str, path: str | os.PathLike, strength: float = 1.0) -> ServedAdapter:
        """Load an adapter given on the command line (pinned), before the engine starts."""
        adapter = self._checked(name, Path(path), strength, pinned=True)
        self._bring_in(adapter)
        with self._lock:
            self._adapters[name] = adapter
        return adapter

    async def load(self, name: str, lora_path: str) -> ServedAdapter:
        """``POST /v1/load_lora_adapter``: load ``lora_path`` (inside ``--adapter-root``) as ``name``."""
        if self.adapter_root is None:
            raise RequestError(
                "loading adapters at run time is off; start the server with --adapter-root DIR", 403, "permission_error"
            )
        path = self.inside_root(lora_path)
        adapter = await asyncio.to_thread(self._checked, name, path, 1.0, False)
        with self._lock:
            if name in self._adapters:
                raise RequestError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
            self._adapters[name] = adapter
            adapter.in_flight += 1  # not evictable while it loads
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self._bring_in(adapter)))
        except LoratuneError as error:
            with self._lock:
                del self._adapters[name]
            raise RequestError(str(error)) from None
        finally:
            adapter.in_flight -= 1
        log.info("loaded adapter %s from %s", name, path)
        return adapter

    async def unload(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``: stop taking requests for ``name``, let running ones finish, then
        free it. Raises ``RequestError`` (404) for an unknown name."""
        with self._lock:
            adapter = self._adapters.get(name)
            if adapter is None or adapter.unloading:
                raise RequestError(f"adapter {name!r} is not loaded", 404, "invalid_request_error", "model_not_found")
            adapter.unloading = True
        while adapter.in_flight > 0:
            await asyncio.sleep(0.01)
        await asyncio.wrap_future(self.engine.call(lambda: self._take_out(adapter)))
        with self._lock:
            del self._adapters[name]
        log.info("unloaded adapter %s", name)

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

    def _checked(self, name: str, path: Path, strength: float, pinned: bool) -> ServedAdapter:
        """A new entry for the adapter at ``path``, after reading its config: raises ``RequestError`` when it
        is not an adapter directory or records another base model."""
        if not name or name.strip() != name or name.startswith("__"):
            raise RequestError(f"adapter name {name!r} is not usable; give a plain name such as 'support-bot'")
        _refuse_while_written(path)
        try:
            config = read_adapter_config(path)
        except (AdapterLoadError, ConfigError) as error:
            raise RequestError(str(error)) from None
        ours, theirs = model_name_of(self.model), config.base_model_name_or_path
        if ours and theirs and not _same_base(ours, theirs):
            raise RequestError(
                f"adapter {path} was trained on {theirs!r}, but this server runs {ours!r}; serve it with its own base"
            )
        tokenizer = None
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        return ServedAdapter(name, path, strength, pinned, tokenizer, replaces_modules=bool(config.modules_to_save))

    # --- in the engine thread ------------------------------------------------------------------------------------
    def _bring_in(self, adapter: ServedAdapter) -> None:
        if adapter.resident:
            return
        self._evict_for_one_more(keep=adapter.name)
        _refuse_while_written(adapter.path)
        try:
            load_adapter(self.model, adapter.path, name=adapter.name, as_plain=True)
        except (AdapterLoadError, ConfigError) as error:
            raise RequestError(str(error)) from None
        set_active(self.model, [])  # nothing acts outside a request's routing
        adapter.resident = True

    def _take_out(self, adapter: ServedAdapter) -> None:
        if adapter.resident:
            delete_adapter(self.model, adapter.name)
            adapter.resident = False

    def _evict_for_one_more(self, keep: str) -> None:
        # Chosen and marked under the lock: a request that takes a victim right after sees it as not in memory
        # and reads it back (its call runs after this one, before its sequence is submitted).
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


def _refuse_while_written(path: Path) -> None:
    """A 409 while another loratune process writes the adapter (or the run around it): it may be half replaced."""
    writer = being_written(path)
    if writer is not None:
        raise RequestError(
            f"adapter {path} cannot be read now: {writer}; load it when that finishes",
            409,
            "invalid_request_error",
            "adapter_busy",
        )


def _same_base(ours: str, theirs: str) -> bool:
    """Whether two recorded base names mean the same model: equal, or paths to the same directory."""
    if ours == theirs:
        return True
    mine, other = Path(ours), Path(theirs)
    return mine.exists() and other.exists() and mine.resolve() == other.resolve()
