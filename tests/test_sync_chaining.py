"""Sync jobs waiting in line (``QueueRunner._chain``): with every slot taken, a file-store
queue's prefetched sync jobs wait in one line, and the thread of the first sync handler to
return starts the oldest of them at once, with no round trip through the event loop. The
contract is unchanged: at most ``concurrency`` handlers at once, each job run once, in claim
order; a slow handler holds back no job but its own; a waiting job can be cancelled, is
handed back unspent at shutdown, goes to a free slot rather than wait for a thread, and runs
in the slot a timed-out job frees."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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
        self.entered = {n: threading.Event() for n in blocked}
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
                self.entered[n].set()
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


def timing_out(
    tmp_path: Path, clock: VirtualClock, *, prefetch: int, blocked: tuple[int, ...]
) -> tuple[III, Lines]:
    """A queue of concurrency 1 whose handlers time out after 1 s, with no retry."""
    queue = QueueConfig(
        name="work", concurrency=1, prefetch=prefetch, timeout_ms=1000, max_retries=0
    )
    iii = file_app(tmp_path, queue, clock)
    handler = Lines(blocked=blocked)
    iii.register_function("job", handler)
    return iii, handler


def runner(iii: III) -> QueueRunner:
    return iii.runtime.runners["work"]


def waiting(iii: III) -> int:
    """Jobs waiting in a line behind a running job."""
    return len(runner(iii)._reserved)


async def test_waiting_jobs_run_in_the_thread_of_the_first_handler_to_return(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2, prefetch=8))
    handler = Lines(blocked=(0, 1))
    iii.register_function("job", handler)
    async with iii.running():
        ids = await enqueue_all(iii, 10)
        # Jobs 0 and 1 hold both slots; the other eight wait in line.
        await until(lambda: waiting(iii) == 8 and handler.running == 2)
        assert sorted(runner(iii).leased_ids()) == sorted(ids)  # their leases are renewed
        stats = await iii.queue_stats_async("work")
        assert (stats.running, stats.prefetched) == (10, 8)
        handler.gates[0].set()
        # Job 0's thread runs the whole line, in order, while job 1 holds the other slot.
        await until(lambda: all(handler.runs[n] for n in range(2, 10)))
        assert handler.running == 1 and not handler.gates[1].is_set()
        assert {handler.thread_of[n] for n in range(2, 10)} == {handler.thread_of[0]}
        assert handler.thread_of[0] != handler.thread_of[1]
        assert [n for n in handler.order if n != 1] == [0, *range(2, 10)]
        await until(lambda: runner(iii).chained == 8)
        handler.gates[1].set()
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert handler.peak == 2
    assert handler.runs == Counter(range(10))
    assert [(r.status, r.attempts, r.output) for r in runs if r is not None] == [
        ("completed", 1, n) for n in range(10)
    ]


async def test_a_stuck_handler_holds_back_no_job_but_its_own(tmp_path: Path) -> None:
    """While job 0 hangs, the other slot runs every later job, in claim order, as claims
    keep refilling the line (a line per running job kept a share of them behind job 0)."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2, prefetch=8))
    handler = Lines(blocked=(0,))
    iii.register_function("job", handler)
    try:
        async with iii.running():
            await enqueue_all(iii, 60)
            await until(lambda: handler.runs[59] == 1)
            assert handler.running == 1 and handler.peak == 2
            assert handler.order == list(range(60))
            handler.release_all()
            await drain(iii)
    finally:
        handler.release_all()
    assert handler.runs == Counter(range(60))


async def test_a_free_slot_takes_the_oldest_waiting_job_itself(tmp_path: Path) -> None:
    """An async job ends and frees a slot while a sync handler still runs: a worker starts
    the waiting jobs rather than leave them to that handler's thread."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2, prefetch=4))
    handler = Lines(blocked=(0,))
    iii.register_function("job", handler)
    async_done = anyio.Event()

    @iii.function("async_job")
    async def async_job(_: Any) -> None:
        await async_done.wait()

    try:
        async with iii.running():
            action = TriggerAction.Enqueue(queue="work")
            await iii.trigger_async("job", 0, action=action)
            await iii.trigger_async("async_job", None, action=action)
            ids = [
                str((await iii.trigger_async("job", n, action=action))["messageReceiptId"])
                for n in (1, 2, 3)
            ]
            await until(lambda: waiting(iii) == 3 and handler.running == 1)
            async_done.set()  # its slot frees; job 0 still runs
            await until(lambda: all(handler.runs[n] for n in (1, 2, 3)))
            await until(lambda: handler.running == 1)  # job 0 alone, still in its handler
            assert not handler.gates[0].is_set()
            assert handler.thread_of[0] not in {handler.thread_of[n] for n in (1, 2, 3)}
            assert handler.order == [0, 1, 2, 3]
            handler.release_all()
            await drain(iii)
            runs = [await iii.runs.get_async(i) for i in ids]
    finally:
        handler.release_all()
    assert [(r.status, r.attempts) for r in runs if r is not None] == [("completed", 1)] * 3


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


async def test_a_timed_out_jobs_thread_takes_nothing_from_the_line(tmp_path: Path) -> None:
    """Job 0 times out and its slot goes to job 1, from the line. When job 0's handler
    finally returns, its thread is no longer in a slot: job 2 waits for job 1's."""
    clock = VirtualClock()
    iii, handler = timing_out(tmp_path, clock, prefetch=2, blocked=(0, 1))
    try:
        async with iii.running():
            ids = await enqueue_all(iii, 3)
            await until(lambda: waiting(iii) == 2)
            clock.advance(1.0)  # job 0 times out; its thread is still in the handler
            await until(lambda: handler.runs[1] == 1)
            assert handler.thread_of[1] != handler.thread_of[0]
            assert waiting(iii) == 1
            handler.gates[0].set()  # job 0's handler returns: its thread goes idle
            await until(lambda: runner(iii).threads.idle == 1)
            assert handler.runs[2] == 0
            handler.gates[1].set()  # job 1's thread takes job 2
            await drain(iii)
            runs = [await iii.runs.get_async(i) for i in ids]
    finally:
        handler.release_all()
    assert handler.runs == Counter([0, 1, 2])
    assert handler.thread_of[2] == handler.thread_of[1]
    assert [(r.status, r.attempts) for r in runs if r is not None] == [
        ("failed", 1),
        ("completed", 1),
        ("completed", 1),
    ]
    dead = runs[0]
    assert dead is not None and dead.error is not None and "timed out" in dead.error.message


async def test_a_freed_slot_takes_the_line_before_later_claimed_jobs(tmp_path: Path) -> None:
    """An async job at the head of the buffer stops the line from growing; when job 0 times
    out, its slot goes to job 1 (in line, claimed earlier), not to the async job."""
    clock = VirtualClock()
    iii, handler = timing_out(tmp_path, clock, prefetch=3, blocked=(0,))

    @iii.function("async_job")
    async def async_job(_: Any) -> None:
        with handler.lock:
            handler.order.append(-1)

    try:
        async with iii.running():
            action = TriggerAction.Enqueue(queue="work")
            for fid, n in (("job", 0), ("job", 1), ("async_job", None), ("job", 3)):
                await iii.trigger_async(fid, n, action=action)
            await until(lambda: waiting(iii) == 1 and handler.running == 1)
            clock.advance(1.0)
            handler.gates[0].set()
            await drain(iii)
    finally:
        handler.release_all()
    assert handler.order == [0, 1, -1, 3]


async def test_shutdown_hands_back_the_jobs_waiting_in_line_unspent(tmp_path: Path) -> None:
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
    """The line fills and drains continuously while results come back: every job runs
    once, never more than ``concurrency`` at once, and many start in a handler's thread.
    (One batch: one by one, the enqueues could come slower than the handlers end, and
    the line would never fill.)"""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=3))
    rng = random.Random(7)
    work = [rng.random() / 2000 for _ in range(300)]  # up to 0.5 ms of handler work each
    handler = Lines(work=work)
    iii.register_function("job", handler)
    async with iii.running():
        ids = await iii.batch_trigger_async("job", list(range(len(work))), queue="work")
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
        chained = runner(iii).chained
    assert handler.runs == Counter(range(len(work)))
    assert handler.peak <= 3
    assert [(r.status, r.attempts, r.output) for r in runs if r is not None] == [
        ("completed", 1, n) for n in range(len(work))
    ]
    assert chained > 0


async def test_stopping_a_waiting_job_that_a_thread_already_ran_to_its_end(
    tmp_path: Path,
) -> None:
    """Job 1 leaves the line, runs and ends in job 0's thread before the loop hears of
    it; a stop for it then (a cancel learned from the store, say) finds it settled."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=3))
    handler = Lines(blocked=(0, 2))
    iii.register_function("job", handler)
    try:
        async with iii.running():
            ids = await enqueue_all(iii, 4)
            await until(lambda: waiting(iii) == 3)
            # The loop does not run meanwhile (this test holds it): job 0 returns, its
            # thread runs job 1, which ends, and then starts job 2.
            handler.gates[0].set()
            assert handler.entered[2].wait(10)  # blocking: the loop must not run here
            assert ids[1] in runner(iii)._reserved
            assert runner(iii).stop_job(ids[1], "cancelled") is True
            handler.release_all()
            await drain(iii)
            runs = [await iii.runs.get_async(i) for i in ids]
    finally:
        handler.release_all()
    assert handler.runs == Counter(range(4))
    assert [(r.status, r.attempts) for r in runs if r is not None] == [("completed", 1)] * 4


async def test_a_slot_freed_with_jobs_in_line_is_not_counted_twice(tmp_path: Path) -> None:
    """Job 0 times out while job 1 waits in line: the free slot is job 1's, so the next
    claim marks no job started; job 2 is recorded started when it really starts."""
    clock = VirtualClock()
    iii, handler = timing_out(tmp_path, clock, prefetch=1, blocked=(0, 1))
    try:
        async with iii.running():
            t0 = clock.now()
            ids = await enqueue_all(iii, 3)
            await until(lambda: waiting(iii) == 1 and handler.running == 1)
            clock.advance(1.0)  # job 0 times out; job 1 takes its slot
            await until(lambda: handler.runs[1] == 1)
            clock.advance(0.5)
            handler.gates[1].set()
            await until(lambda: handler.runs[2] == 1)
            await drain(iii)
            runs = [await iii.runs.get_async(i) for i in ids]
    finally:
        handler.release_all()
    assert [(r.status, r.started_at) for r in runs if r is not None] == [
        ("failed", t0),
        ("completed", t0 + 1.0),
        ("completed", t0 + 1.5),
    ]
