"""Handing the engine's events to the serving loop (``serve.delivery``): in order, from a thread of its own, and
every event queued before ``close`` still delivered."""

from __future__ import annotations

import asyncio
import threading
import time

from loratune.serve.delivery import Deliveries


def delivering() -> int:
    """How many delivering threads run now."""
    return sum(t.name == "loratune-deliver" for t in threading.enumerate())


def test_events_put_from_another_thread_arrive_in_order_on_the_loop():
    async def main():
        loop = asyncio.get_running_loop()
        deliveries = Deliveries(loop)
        got: list[tuple[int, int, bool]] = []
        done = asyncio.Event()

        def deliver(event):
            got.append((*event, threading.current_thread() is threading.main_thread()))
            if len(got) == 2000:
                done.set()

        sinks = [deliveries.sink(deliver) for _ in range(2)]
        producers = [threading.Thread(target=lambda k=k: [sinks[k]((k, i)) for i in range(1000)]) for k in range(2)]
        for producer in producers:
            producer.start()
        await asyncio.wait_for(done.wait(), 10)
        deliveries.close()
        return got

    got = asyncio.run(main())
    assert all(on_loop for *_, on_loop in got)  # delivered by the loop's own thread
    for k in range(2):
        assert [i for source, i, _ in got if source == k] == list(range(1000))


def test_close_delivers_what_is_queued_and_a_closed_loop_stops_the_thread():
    before = delivering()
    loop = asyncio.new_event_loop()
    deliveries = Deliveries(loop)
    got = []
    sink = deliveries.sink(got.append)
    for i in range(5):
        sink(i)
    deliveries.close()  # the thread hands the five over, then stops
    assert delivering() == before
    loop.run_until_complete(asyncio.sleep(0))  # the loop runs what was handed to it
    assert got == [0, 1, 2, 3, 4]
    loop.close()
    after = Deliveries(loop)  # a loop closed before its events: the thread ends instead of failing forever
    after.sink(got.append)("late")
    for _ in range(500):
        if delivering() == before:
            break
        time.sleep(0.01)
    assert delivering() == before and got == [0, 1, 2, 3, 4]
