"""litequeue 0.9 (the newest on the package index here): WAL, ``synchronous=NORMAL`` (set
by litequeue itself), autocommit: one commit for ``put``, one for ``pop`` (marks the
message locked) and one for ``done``. Payloads are strings (JSON here).

One ``LiteQueue`` object is one connection and is not safe to share between threads (its
``pop`` opens a transaction on it), so every producer and consumer thread gets its own,
all on one file (with a 30 s busy timeout). litequeue has no blocking receive: consumers
poll ``pop()`` and sleep 1 ms when it finds nothing. For the same reason idle latency is
not measured: it is whatever polling interval one picks.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from litequeue import LiteQueue

from .._util import Countdown, in_threads, scratch

BUSY_TIMEOUT_S = 30.0


def _queues(path: Path, count: int) -> list[LiteQueue]:
    # sqlite3's busy timeout raised from its default 5 s: with 16 producer and 8 consumer
    # connections, 20,000 messages failed with "database is locked" at 5 s.
    return [LiteQueue(str(path), timeout=BUSY_TIMEOUT_S) for _ in range(count)]


def enqueue(n: int, producers: int) -> dict[str, Any]:
    """``n`` messages put (committed) by ``producers`` threads; no consumer."""
    queues = _queues(scratch("litequeue") / "lq.db", producers)
    lock = threading.Lock()
    free = list(queues)

    def produce(first: int, count: int) -> None:
        with lock:
            q = free.pop()
        for i in range(first, first + count):
            q.put(json.dumps({"n": i}))

    return {"rate": n / in_threads(produce, n, producers)}


def end_to_end(n: int, workers: int, producers: int = 16) -> dict[str, Any]:
    """``workers`` polling consumer threads run while ``producers`` threads put ``n``
    messages; the time is from the first put until the last message was popped and
    handled (its ``done`` follows)."""
    path = scratch("litequeue") / "lq.db"
    producer_queues = _queues(path, producers)
    consumer_queues = _queues(path, workers)
    countdown = Countdown(n)
    stop = threading.Event()

    def consume(q: LiteQueue) -> None:
        while not stop.is_set():
            message = q.pop()
            if message is None:
                time.sleep(0.001)
                continue
            json.loads(message.data)
            countdown.tick()
            q.done(message.message_id)

    threads = [threading.Thread(target=consume, args=(q,), daemon=True) for q in consumer_queues]
    for t in threads:
        t.start()
    lock = threading.Lock()

    def produce(first: int, count: int) -> None:
        with lock:
            q = producer_queues.pop()
        for i in range(first, first + count):
            q.put(json.dumps({"n": i}))

    try:
        start = time.perf_counter()
        in_threads(produce, n, producers)
        finished = countdown.wait()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {"rate": n / (finished - start)}
