"""Ctrl-C during training: stop at a consistent point, so the run can be checkpointed and resumed.

While ``StepInterrupts`` is active (main thread only), Ctrl-C raises ``KeyboardInterrupt`` at once, except
inside ``protected()`` (the optimizer update and the bookkeeping of a finished step), where it is held
until the block ends. So when the loop sees the interrupt, the model, optimizer and data position all
describe the last completed step, and that step can be saved as a checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StepInterrupts:
    """Install on entry, restore the previous SIGINT handler on exit (a no-op outside the main thread)."""

    def __init__(self):
        self._previous = None
        self._in_update = False
        self._held = False

    def __enter__(self) -> StepInterrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self._in_update:
            self._held = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def protected(self):
        """A block that Ctrl-C does not cut in half; a Ctrl-C during it is raised when it ends."""
        self._in_update = True
        try:
            yield
        finally:
            self._in_update = False
        if self._held:
            self._held = False
            raise KeyboardInterrupt
