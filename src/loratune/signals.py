"""Stopping on a signal, in one place: Ctrl-C (SIGINT), SIGTERM (what schedulers, ``docker stop``, ``timeout`` and
Kubernetes send) and SIGHUP (a closed terminal) all stop a command the same way — as ``Stop``, a
``KeyboardInterrupt`` carrying the signal — so every ``except KeyboardInterrupt`` / ``finally`` on the way out
runs: temporary files are removed, locks released, a training run checkpoints its last completed step.

Inside ``deferred()`` (an optimizer update, a checkpoint being written) a signal is held and raised when the
block ends, so no state is ever cut in half. A command stops once: after the first ``Stop`` (the saving that
follows it, the way out, the process's exit) further signals are only acknowledged, so a scheduler that sends
SIGTERM twice, or Ctrl-C pressed again, never cuts the save nor kills the process before its exit status.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
    blocks = 0  # nesting of stop_on_signals()
    stopped: int | None = None  # the signal that stopped the command
    stopping = False
    acknowledge: Callable[[int], None] | None = None


_state = _State()


def _say(line: str) -> None:
    # straight to the descriptor: a handler may run while the main code is inside a write to sys.stderr, whose
    # buffer refuses a reentrant call
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode())


def _already_stopping(signum: int) -> None:
    _say(f"loratune: {signal.Signals(signum).name} received; already stopping")


def _on_signal(signum, frame) -> None:
    if _state.stopping:
        if _state.acknowledge is not None:
            _state.acknowledge(signum)
        return
    if _state.stopped is not None:
        _already_stopping(signum)
        return
    if _state.depth:
        _state.held = _state.held or signum
        return
    _state.stopped = signum
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
    if _state.blocks == 0:
        _state.stopped = None  # a new command (main() also runs in-process, one call after another)
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    _state.blocks += 1
    try:
        yield
    finally:
        _state.blocks -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stopped_by() -> int | None:
    """The signal that stopped the last command, if one did."""
    return _state.stopped


def ignore_for_exit() -> None:
    """Stop signals ignored from here on: the interpreter resets Python-level handlers to the default action
    while it exits, so a signal then would kill a stopped process and replace its exit status."""
    if _main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def handle_for_process() -> None:
    """Stop signals handled as in ``stop_on_signals`` for the rest of the process: the ``loratune`` command's
    exit (after its blocks end) is not cut by a signal that follows the one that stopped it."""
    if _main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_signal)


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
        _state.stopped = signum
        raise Stop(signum)


@contextlib.contextmanager
def stopping(acknowledge: Callable[[int], None] | None = None) -> Iterator[None]:
    """The block that runs after a stop (saving a checkpoint): further signals call ``acknowledge(signum)`` instead
    of interrupting it (default: a line on stderr)."""
    before = (_state.stopping, _state.acknowledge)
    _state.stopping = True
    _state.acknowledge = acknowledge or (
        lambda signum: _say(f"loratune: {signal.Signals(signum).name} received while stopping; finishing the save")
    )
    try:
        yield
    finally:
        _state.stopping, _state.acknowledge = before
