"""Stopping on a signal, in one place: Ctrl-C (SIGINT), SIGTERM (what schedulers, ``docker stop``, ``timeout`` and
Kubernetes send) and SIGHUP (a closed terminal) all stop a command the same way — as ``Stop``, a
``KeyboardInterrupt`` carrying the signal — so every ``except KeyboardInterrupt`` / ``finally`` on the way out
runs: temporary files are removed, locks released, a training run checkpoints its last completed step.

Inside ``deferred()`` (an optimizer update, a checkpoint being written) a signal is held and raised when the
block ends, so no state is ever cut in half. Inside ``stopping()`` (the saving that follows a stop) further
signals are only acknowledged: the save completes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stop(KeyboardInterrupt):
    """Raised in the main thread by a stop signal; ``exit_status`` is the shell's 128 + signal number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_of(error: BaseException) -> int:
    """The signal a ``KeyboardInterrupt`` stands for (a plain one: SIGINT)."""
    return getattr(error, "signum", signal.SIGINT)


class _State:
    held: int | None = None  # a signal that arrived inside deferred()
    depth = 0  # nesting of deferred()
    stopping = False
    acknowledge: Callable[[int], None] | None = None


_state = _State()


def _on_signal(signum, frame) -> None:
    if _state.stopping:
        if _state.acknowledge is not None:
            _state.acknowledge(signum)
        return
    if _state.depth:
        _state.held = _state.held or signum
        return
    raise Stop(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the block, SIGINT, SIGTERM and SIGHUP raise ``Stop`` in the main thread (the previous handlers come back
    afterwards). Nothing happens outside the main thread, where Python cannot handle signals."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block no stop signal cuts in half: one that arrives meanwhile is raised as ``Stop`` when it ends."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if _state.depth == 0 and _state.held is not None:
        signum, _state.held = _state.held, None
        raise Stop(signum)


@contextlib.contextmanager
def stopping(acknowledge: Callable[[int], None] | None = None) -> Iterator[None]:
    """The block that runs after a stop (saving a checkpoint): further signals call ``acknowledge(signum)`` instead
    of interrupting it (default: a line on stderr)."""
    before = (_state.stopping, _state.acknowledge)
    _state.stopping = True
    _state.acknowledge = acknowledge or (
        lambda signum: print(
            f"loratune: {signal.Signals(signum).name} received while stopping; finishing the save first",
            file=sys.stderr,
            flush=True,
        )
    )
    try:
        yield
    finally:
        _state.stopping, _state.acknowledge = before
