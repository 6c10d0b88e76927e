"""Handing the engine's events (text, a finish, a failure) to the event loop that answers the requests.

Waking an asyncio loop from another thread (``call_soon_threadsafe``) writes to the loop's wake-up socket; the
loop's thread then takes the GIL for the event's HTTP work (a streamed chunk's JSON, the socket write). Done in
the engine's thread, that wake-up made the engine wait for the GIL until the loop had finished that work, every
token, before it could start the next decoding step. Here the engine only puts the event on a queue (no GIL
hand-over) and goes on; one delivering thread wakes the loop, once for all the events that are waiting, while the
engine's next step runs in compiled code without the GIL.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable


class Deliveries:
    """Events put by any thread, delivered in order to callbacks on ``loop`` by a thread of this object's own."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="loratune-deliver", daemon=True)
        self._thread.start()

    def sink(self, deliver: Callable[[object], None]) -> Callable[[object], None]:
        """A function any thread may call with an event: ``deliver(event)`` then runs on the loop, in the order
        the events were put."""
        put = self._queue.put
        return lambda event: put((deliver, event))

    def close(self) -> None:
        """Deliver what is queued, then stop the delivering thread."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            waiting = [self._queue.get()]
            while not self._queue.empty():  # everything the engine put meanwhile: one wake-up for all of it
                waiting.append(self._queue.get_nowait())
            stop = None in waiting
            waiting = [item for item in waiting if item is not None]
            if waiting:
                try:
                    self.loop.call_soon_threadsafe(_deliver_all, waiting)
                except RuntimeError:  # the loop is closed: nobody is left to answer
                    return
            if stop:
                return


def _deliver_all(waiting: list[tuple[Callable[[object], None], object]]) -> None:
    for deliver, event in waiting:
        deliver(event)
