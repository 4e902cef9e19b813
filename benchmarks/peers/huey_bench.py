"""Huey 3.5.4 with ``SqliteHuey``: WAL, SQLite's default ``synchronous=FULL`` (Huey sets
no ``synchronous`` unless given ``fsync=``), one connection per thread, autocommit: one
commit per enqueue and one per dequeue (Huey deletes a task when it dequeues it, before it
runs: at-most-once, one commit fewer per job than an at-least-once claim + ack).

The consumer runs in this process with thread workers (``worker_type="thread"``, no
periodic scheduler). For throughput its polling is tuned in Huey's favour: an idle worker
polls after 1 ms, at most every 10 ms (Huey's defaults: 100 ms growing to 10 s). Idle
latency is measured with the defaults, as users run it. The sync call uses immediate mode
(``MemoryHuey(immediate=True)``), which runs the task inline and stores its result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from huey import MemoryHuey, SqliteHuey
from huey.consumer import Consumer

from .._util import Countdown, in_threads, latency_summary, scratch


def _task(huey: Any) -> Callable[[Callable[..., Any]], Any]:
    """``huey.task()``, typed for the checker (Huey has no annotations)."""
    decorator: Callable[[Callable[..., Any]], Any] = huey.task()
    return decorator


def _huey(results: bool = False) -> SqliteHuey:
    return SqliteHuey(filename=str(scratch("huey") / "huey.db"), results=results)


def _consumer(huey: SqliteHuey, workers: int, *, tuned: bool) -> Consumer:
    options: dict[str, Any] = {"workers": workers, "worker_type": "thread", "periodic": False}
    if tuned:
        options.update(initial_delay=0.001, backoff=1.15, max_delay=0.01)
    consumer: Consumer = huey.create_consumer(**options)
    return consumer


def enqueue(n: int, producers: int) -> dict[str, Any]:
    """``n`` tasks enqueued (committed) by ``producers`` threads; no consumer."""
    huey = _huey()

    @_task(huey)
    def noop(x: dict[str, int]) -> None:
        return None

    def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            noop({"n": i})

    return {"rate": n / in_threads(produce, n, producers)}


def end_to_end(n: int, workers: int, producers: int = 16) -> dict[str, Any]:
    """The consumer runs while ``producers`` threads enqueue ``n`` tasks; the time is from
    the first enqueue until the last task ran."""
    huey = _huey()
    countdown = Countdown(n)

    @_task(huey)
    def noop(x: dict[str, int]) -> None:
        countdown.tick()

    def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            noop({"n": i})

    consumer = _consumer(huey, workers, tuned=True)
    consumer.start()
    try:
        start = time.perf_counter()
        in_threads(produce, n, producers)
        finished = countdown.wait()
    finally:
        consumer.stop(graceful=True)
    return {"rate": n / (finished - start)}


def immediate(m: int) -> dict[str, Any]:
    """An inline call in immediate mode, its value fetched (``noop(x).get()``)."""
    huey = MemoryHuey(immediate=True)

    @_task(huey)
    def noop(x: int) -> int:
        return x

    for i in range(1000):  # warm up
        noop(i).get()
    start = time.perf_counter()
    for i in range(m):
        noop(i).get()
    return {"us": (time.perf_counter() - start) / m * 1e6}


def latency(samples: int, gap_s: float = 0.002) -> dict[str, Any]:
    """Enqueue → task start with an idle consumer (1 worker, Huey's default polling)."""
    huey = _huey()
    started = [0.0]
    ran = threading.Event()

    @_task(huey)
    def mark(x: int) -> None:
        started[0] = time.perf_counter()
        ran.set()

    consumer = _consumer(huey, 1, tuned=False)
    consumer.start()
    gaps: list[float] = []
    try:
        for i in range(samples):
            time.sleep(gap_s)
            ran.clear()
            sent = time.perf_counter()
            mark(i)
            if not ran.wait(60):
                raise TimeoutError("the task did not run within 60 s")
            gaps.append(started[0] - sent)
    finally:
        consumer.stop(graceful=True)
    return latency_summary(gaps)
