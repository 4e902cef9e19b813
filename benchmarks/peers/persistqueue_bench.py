"""persist-queue 1.1.0, ``SQLiteAckQueue``: WAL, SQLite's default ``synchronous=FULL``,
``multithreading=True`` (one shared writer connection behind a lock, autocommit): one
commit for ``put``, one for ``get`` (marks the item unacked) and one for ``ack``.
Payloads are pickled (its default serializer). Consumers are threads looping on
``get(block=True)`` + ``ack``; a blocked ``get`` is woken by ``put`` in the same process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from persistqueue import Empty, SQLiteAckQueue

from .._util import Countdown, in_threads, latency_summary, scratch


def _queue() -> SQLiteAckQueue:
    return SQLiteAckQueue(str(scratch("persistq")), multithreading=True, auto_commit=True)


def enqueue(n: int, producers: int) -> dict[str, Any]:
    """``n`` items put (committed) by ``producers`` threads; no consumer."""
    q = _queue()

    def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            q.put({"n": i})

    return {"rate": n / in_threads(produce, n, producers)}


def _consumers(
    q: SQLiteAckQueue, workers: int, on_item: Any, stop: threading.Event
) -> list[threading.Thread]:
    def consume() -> None:
        while not stop.is_set():
            try:
                item = q.get(block=True, timeout=0.05)
            except Empty:
                continue
            on_item(item)
            q.ack(item)

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    return threads


def end_to_end(n: int, workers: int, producers: int = 16) -> dict[str, Any]:
    """``workers`` consumer threads run while ``producers`` threads put ``n`` items; the
    time is from the first put until the last item was handled (its ack follows)."""
    q = _queue()
    countdown = Countdown(n)
    stop = threading.Event()
    threads = _consumers(q, workers, lambda _: countdown.tick(), stop)

    def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            q.put({"n": i})

    try:
        start = time.perf_counter()
        in_threads(produce, n, producers)
        finished = countdown.wait()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {"rate": n / (finished - start)}


def latency(samples: int, gap_s: float = 0.002) -> dict[str, Any]:
    """put → get returns in an idle consumer thread blocked in ``get``."""
    q = _queue()
    started = [0.0]
    ran = threading.Event()
    stop = threading.Event()

    def on_item(_: Any) -> None:
        started[0] = time.perf_counter()
        ran.set()

    threads = _consumers(q, 1, on_item, stop)
    gaps: list[float] = []
    try:
        for i in range(samples):
            time.sleep(gap_s)
            ran.clear()
            sent = time.perf_counter()
            q.put({"n": i})
            if not ran.wait(60):
                raise TimeoutError("the item was not received within 60 s")
            gaps.append(started[0] - sent)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return latency_summary(gaps)
