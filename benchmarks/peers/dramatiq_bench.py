"""Dramatiq 2.2.1 with ``StubBroker`` (its in-memory broker: not durable) and an
in-process ``Worker`` with 1 or 8 worker threads, default middleware (age and time limits,
retries, callbacks, pipelines, shutdown notifications). Messages are JSON-encoded as
usual. This is the in-memory peer: it is compared with iii-embedded's in-memory store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.worker import Worker

from .._util import Countdown, in_threads, latency_summary


def _actor(fn: Callable[[dict[str, int]], None]) -> tuple[StubBroker, Any]:
    broker = StubBroker()
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(broker=broker, actor_name="noop", max_retries=0)(fn)
    return broker, actor


def enqueue(n: int, producers: int) -> dict[str, Any]:
    """``n`` messages sent by ``producers`` threads; no worker."""
    _, actor = _actor(lambda x: None)

    def produce(first: int, count: int) -> None:
        send = actor.send
        for i in range(first, first + count):
            send({"n": i})

    return {"rate": n / in_threads(produce, n, producers)}


def end_to_end(n: int, threads: int, producers: int = 16) -> dict[str, Any]:
    """A worker with ``threads`` threads runs while ``producers`` threads send ``n``
    messages; the time is from the first send until the last actor call ran."""
    countdown = Countdown(n)
    broker, actor = _actor(lambda x: countdown.tick())
    worker = Worker(broker, worker_threads=threads, worker_timeout=100)
    worker.start()

    def produce(first: int, count: int) -> None:
        send = actor.send
        for i in range(first, first + count):
            send({"n": i})

    try:
        start = time.perf_counter()
        in_threads(produce, n, producers)
        finished = countdown.wait()
    finally:
        worker.stop()
    return {"rate": n / (finished - start)}


def latency(samples: int, gap_s: float = 0.002) -> dict[str, Any]:
    """send → actor start with an idle worker (1 thread)."""
    started = [0.0]
    ran = threading.Event()

    def mark(x: dict[str, int]) -> None:
        started[0] = time.perf_counter()
        ran.set()

    broker, actor = _actor(mark)
    worker = Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    gaps: list[float] = []
    try:
        for i in range(samples):
            time.sleep(gap_s)
            ran.clear()
            sent = time.perf_counter()
            actor.send({"n": i})
            if not ran.wait(60):
                raise TimeoutError("the message was not processed within 60 s")
            gaps.append(started[0] - sent)
    finally:
        worker.stop()
    return latency_summary(gaps)
