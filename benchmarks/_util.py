"""Helpers shared by the scenario modules; they run inside the worker subprocess."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ``benchmarks.run`` points this at a directory it removes at the end of the run.
SCRATCH_ENV = "III_BENCH_SCRATCH"


def scratch(prefix: str, *, keep: bool = False) -> Path:
    """A new empty directory for one scenario's databases, removed when the process exits
    (unless ``keep``: a prepared store that later runs reuse)."""
    base = os.environ.get(SCRATCH_ENV)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=base))
    if not keep:
        atexit.register(shutil.rmtree, path, True)
    return path


def shares(n: int, parts: int) -> list[int]:
    """Split ``n`` items into ``parts`` near-equal shares that add up to ``n``."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def in_threads(work: Callable[[int, int], None], n: int, threads: int) -> float:
    """Run ``work(first_index, count)`` in ``threads`` threads that start together; return
    the wall time from their common start until the last one finished."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def body(first: int, count: int) -> None:
        barrier.wait()
        try:
            work(first, count)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    workers: list[threading.Thread] = []
    first = 0
    for count in shares(n, threads):
        workers.append(threading.Thread(target=body, args=(first, count), daemon=True))
        first += count
    for t in workers:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


class Countdown:
    """Counts processed jobs from any thread; ``done`` is set when ``n`` were counted."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.done = threading.Event()
        self.finished_at = 0.0
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self.count += 1
            if self.count == self.n:
                self.finished_at = time.perf_counter()
                self.done.set()

    def wait(self, timeout: float = 600.0) -> float:
        """Wait until all ``n`` were counted; return the time the last one was."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"only {self.count} of {self.n} jobs ran in {timeout} s")
        return self.finished_at


def latency_summary(gaps_s: list[float]) -> dict[str, Any]:
    """p50 and p99 (nearest rank) of latencies given in seconds, in milliseconds."""
    ordered = sorted(gaps_s)
    rank99 = max(0, min(len(ordered) - 1, round(0.99 * len(ordered)) - 1))
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[rank99] * 1000,
        "samples": len(ordered),
    }
