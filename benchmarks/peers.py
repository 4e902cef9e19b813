"""The peers, each run the way its documentation suggests for an embedded setup.

* Huey 3.5.4, ``SqliteHuey`` (WAL; SQLite's default ``synchronous=FULL``), its consumer
  with thread workers; and immediate mode for an inline call.
* persist-queue 1.1.0, ``SQLiteAckQueue`` (``multithreading=True``): put, then get + ack
  in worker threads.
* litequeue 0.9: put, then pop + done.
* Dramatiq 2.2.1, ``StubBroker`` (in memory, not durable) with an in-process ``Worker``.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="bench-peer-"))


# --- Huey -------------------------------------------------------------------------------


def huey_enqueue(n: int) -> dict[str, Any]:
    from huey import SqliteHuey

    huey = SqliteHuey(filename=str(_tmp() / "huey.db"))

    @huey.task()
    def noop(x: int) -> None:
        return None

    start = time.perf_counter()
    for i in range(n):
        noop(i)
    return {"rate": n / (time.perf_counter() - start)}


def huey_end_to_end(n: int, workers: int) -> dict[str, Any]:
    from huey import SqliteHuey

    huey = SqliteHuey(filename=str(_tmp() / "huey.db"), results=False)
    lock = threading.Lock()
    done = threading.Event()
    count = [0]

    @huey.task()
    def noop(x: int) -> None:
        with lock:
            count[0] += 1
            if count[0] == n:
                done.set()

    start = time.perf_counter()
    for i in range(n):
        noop(i)
    consumer = huey.create_consumer(
        workers=workers, worker_type="thread", periodic=False, initial_delay=0.001, max_delay=0.01
    )
    consumer.start()
    done.wait(600)
    elapsed = time.perf_counter() - start
    consumer.stop(graceful=True)
    return {"rate": n / elapsed}


def huey_immediate(m: int) -> dict[str, Any]:
    from huey import MemoryHuey

    huey = MemoryHuey(immediate=True, results=True)

    @huey.task()
    def noop(x: int) -> int:
        return x

    start = time.perf_counter()
    for i in range(m):
        noop(i)()
    return {"us": (time.perf_counter() - start) / m * 1e6}


# --- persist-queue ------------------------------------------------------------------------


def persistqueue_enqueue(n: int) -> dict[str, Any]:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(str(_tmp()), multithreading=True, auto_commit=True)
    start = time.perf_counter()
    for i in range(n):
        q.put(i)
    return {"rate": n / (time.perf_counter() - start)}


def persistqueue_end_to_end(n: int, workers: int) -> dict[str, Any]:
    from persistqueue import SQLiteAckQueue

    q = SQLiteAckQueue(str(_tmp()), multithreading=True, auto_commit=True)
    start = time.perf_counter()
    for i in range(n):
        q.put(i)
    remaining = [n]
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            item = q.get(block=True)
            q.ack(item)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rate": n / (time.perf_counter() - start)}


# --- litequeue -------------------------------------------------------------------------


def litequeue_enqueue(n: int) -> dict[str, Any]:
    from litequeue import LiteQueue

    q = LiteQueue(str(_tmp() / "lq.db"))
    start = time.perf_counter()
    for i in range(n):
        q.put(str(i))
    return {"rate": n / (time.perf_counter() - start)}


def litequeue_end_to_end(n: int) -> dict[str, Any]:
    from litequeue import LiteQueue

    q = LiteQueue(str(_tmp() / "lq.db"))
    start = time.perf_counter()
    for i in range(n):
        q.put(str(i))
    for _ in range(n):
        message = q.pop()
        q.done(message.message_id)
    return {"rate": n / (time.perf_counter() - start)}


# --- Dramatiq ----------------------------------------------------------------------------


def dramatiq_end_to_end(n: int, threads: int) -> dict[str, Any]:
    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.worker import Worker

    broker = StubBroker()
    broker.emit_after("process_boot")
    dramatiq.set_broker(broker)

    @dramatiq.actor(max_retries=0)
    def noop(x: int) -> None:
        return None

    start = time.perf_counter()
    for i in range(n):
        noop.send(i)
    worker = Worker(broker, worker_threads=threads, worker_timeout=5)
    worker.start()
    broker.join(noop.queue_name)
    worker.join()
    elapsed = time.perf_counter() - start
    worker.stop()
    return {"rate": n / elapsed}
