"""Sync jobs queued behind running ones (``QueueRunner._chain``): with every slot taken, a
file-store queue's prefetched sync jobs wait in a line behind a running sync job, and its
thread starts the next one the moment the handler returns, with no round trip through the
event loop. The contract is unchanged: at most ``concurrency`` handlers at once, each job
run once, in claim order per line; a job in a line can be cancelled, is handed back unspent
at shutdown, goes to a free slot rather than wait for a stuck job, and runs in the slot a
timed-out job frees."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
from iii_embedded._queues import QueueRunner
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def file_app(
    tmp_path: Path, queue: QueueConfig, clock: VirtualClock | None = None, grace_ms: int = 0
) -> III:
    store = StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))
    return III(
        Config(queues={queue.name: queue}, store=store),
        clock=clock or VirtualClock(),
        shutdown_grace_ms=grace_ms,
    )


async def until(condition: Callable[[], bool | Awaitable[bool]]) -> None:
    """Yield to the loop until ``condition()`` holds (bounded; no wall-clock sleeps)."""
    with anyio.fail_after(10):
        while True:
            value = condition()
            if not isinstance(value, bool):
                value = await value
            if value:
                return
            await anyio.lowlevel.checkpoint()


async def enqueue_all(iii: III, count: int) -> list[str]:
    action = TriggerAction.Enqueue(queue="work")
    return [
        str((await iii.trigger_async("job", n, action=action))["messageReceiptId"])
        for n in range(count)
    ]


class Lines:
    """A sync handler: records which thread ran each job, how often, and the most that
    ran at once; the jobs in ``blocked`` wait for their gate."""

    def __init__(self, blocked: tuple[int, ...] = (), work: list[float] | None = None) -> None:
        self.gates = {n: threading.Event() for n in blocked}
        self.work = work
        self.lock = threading.Lock()
        self.thread_of: dict[int, int] = {}
        self.runs: Counter[int] = Counter()
        self.order: list[int] = []
        self.running = self.peak = 0

    def __call__(self, n: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.thread_of[n] = threading.get_ident()
            self.runs[n] += 1
            self.order.append(n)
        try:
            if n in self.gates:
                assert self.gates[n].wait(timeout=30), f"job {n} was never released"
            if self.work is not None:
                time.sleep(self.work[n])  # the handler's own work, not a wait for anything
            return n
        finally:
            with self.lock:
                self.running -= 1

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


def runner(iii: III) -> QueueRunner:
    return iii.runtime.runners["work"]


def waiting(iii: III) -> int:
    """Jobs waiting in a line behind a running job."""
    return len(runner(iii)._reserved)


async def test_jobs_behind_busy_slots_run_in_those_slots_threads_one_at_a_time(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2, prefetch=8))
    handler = Lines(blocked=(0, 1))
    iii.register_function("job", handler)
    async with iii.running():
        ids = await enqueue_all(iii, 10)
        # Jobs 0 and 1 hold both slots; the other eight wait in two lines, each next job
        # joining the shorter: 2, 4, 6, 8 behind job 0 and 3, 5, 7, 9 behind job 1.
        await until(lambda: waiting(iii) == 8)
        assert sorted(runner(iii).leased_ids()) == sorted(ids)  # their leases are renewed
        stats = await iii.queue_stats_async("work")
        assert (stats.running, stats.prefetched) == (10, 8)
        handler.gates[0].set()
        # Job 0's thread runs its line, in order, while job 1 still holds the other slot.
        await until(lambda: all(handler.runs[n] for n in (2, 4, 6, 8)))
        assert handler.runs[1] == 1 and not handler.gates[1].is_set()
        thread = handler.thread_of
        assert {thread[n] for n in (0, 2, 4, 6, 8)} == {thread[0]} != {thread[1]}
        assert [n for n in handler.order if n % 2 == 0] == [0, 2, 4, 6, 8]
        handler.gates[1].set()
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
        chained = runner(iii).chained
    # Job 0's line started in its thread; once it ended, that slot was free, and the jobs
    # waiting behind job 1 went to it rather than wait for job 1 (a second test below).
    assert chained >= 4
    assert handler.peak == 2
    assert handler.runs == Counter(range(10))
    assert [(r.status, r.attempts, r.output) for r in runs if r is not None] == [
        ("completed", 1, n) for n in range(10)
    ]


async def test_a_free_slot_takes_back_the_jobs_waiting_behind_a_stuck_one(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2, prefetch=6))
    handler = Lines(blocked=(0, 1))
    iii.register_function("job", handler)
    async with iii.running():
        ids = await enqueue_all(iii, 8)
        await until(lambda: waiting(iii) == 6)
        # Job 1's line (3, 5, 7) runs in its thread; then its slot is free, and the jobs
        # waiting behind job 0 (2, 4, 6), which is still running, go to it.
        handler.gates[1].set()
        await until(lambda: sum(handler.runs.values()) == 8 and runner(iii).running == 1)
        assert handler.gates[0].is_set() is False
        assert (waiting(iii), handler.running) == (0, 1)
        handler.gates[0].set()
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert handler.runs == Counter(range(8))
    assert handler.peak == 2
    assert [(r.status, r.attempts) for r in runs if r is not None] == [("completed", 1)] * 8


async def test_a_job_waiting_in_a_line_can_be_cancelled_and_never_runs(tmp_path: Path) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=3))
    handler = Lines(blocked=(0,))
    iii.register_function("job", handler)
    async with iii.running():
        ids = await enqueue_all(iii, 4)
        await until(lambda: waiting(iii) == 3)
        result = await iii.runs.cancel_async(ids[2])
        assert (result.cancelled, result.status_before) == (True, "running")
        assert waiting(iii) == 2
        handler.release_all()
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert handler.runs == Counter([0, 1, 3])
    assert handler.order == [0, 1, 3]
    assert [(r.status, r.attempts) for r in runs if r is not None] == [
        ("completed", 1),
        ("completed", 1),
        ("cancelled", 0),
        ("completed", 1),
    ]


async def test_when_a_job_times_out_its_line_runs_in_the_slot_it_frees_each_job_once(
    tmp_path: Path,
) -> None:
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=2, timeout_ms=1000, max_retries=0)
    iii = file_app(tmp_path, queue, clock)
    handler = Lines(blocked=(0,))
    iii.register_function("job", handler)
    try:
        async with iii.running():
            ids = await enqueue_all(iii, 3)
            await until(lambda: waiting(iii) == 2)
            clock.advance(1.0)  # job 0 times out; its thread is still in the handler
            await until(lambda: handler.runs[1] == handler.runs[2] == 1)
            assert handler.thread_of[0] not in (handler.thread_of[1], handler.thread_of[2])
            # Its thread returns now: the jobs that were behind it already ran elsewhere.
            handler.release_all()
            await drain(iii)
            runs = [await iii.runs.get_async(i) for i in ids]
    finally:
        handler.release_all()
    assert handler.runs == Counter([0, 1, 2])
    assert [(r.status, r.attempts) for r in runs if r is not None] == [
        ("failed", 1),
        ("completed", 1),
        ("completed", 1),
    ]
    dead = runs[0]
    assert dead is not None and dead.error is not None and "timed out" in dead.error.message


async def test_shutdown_hands_back_the_jobs_waiting_in_lines_unspent(tmp_path: Path) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=3))
    handler = Lines(blocked=(0,))
    iii.register_function("job", handler)
    try:
        async with iii.running():
            await enqueue_all(iii, 4)
            await until(lambda: waiting(iii) == 3)
        # The grace period is 0: job 0 is given back too, its thread left to finish alone.
    finally:
        handler.release_all()
    assert handler.runs == Counter([0])
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        jobs = await store.list_jobs()
    finally:
        await store.aclose()
    assert sorted((j.state, j.attempts, j.lease_owner) for j in jobs) == [("queued", 0, None)] * 4


async def test_many_short_sync_jobs_run_once_each_within_concurrency(tmp_path: Path) -> None:
    """Lines form and drain continuously while results come back: every job runs once,
    never more than ``concurrency`` at once, and many start in their line's thread."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=3))
    rng = random.Random(7)
    work = [rng.random() / 2000 for _ in range(300)]  # up to 0.5 ms of handler work each
    handler = Lines(work=work)
    iii.register_function("job", handler)
    async with iii.running():
        ids = await enqueue_all(iii, len(work))
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
        chained = runner(iii).chained
    assert handler.runs == Counter(range(len(work)))
    assert handler.peak <= 3
    assert [(r.status, r.attempts, r.output) for r in runs if r is not None] == [
        ("completed", 1, n) for n in range(len(work))
    ]
    assert chained > 0
