"""Prefetch (``QueueConfig.prefetch``): a queue claims jobs beyond its free slots. On a
file store those jobs are leased like running ones; in memory they read ``queued`` until
they start. Only ``concurrency`` handlers run at once; a prefetched job that is cancelled or
handed back at shutdown never spends an attempt."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
from iii_embedded._stores._memory import MemoryStore
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def file_app(tmp_path: Path, queue: QueueConfig, clock: VirtualClock | None = None) -> III:
    store = StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))
    return III(
        Config(queues={queue.name: queue}, store=store),
        clock=clock or VirtualClock(),
        shutdown_grace_ms=0,
    )


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Yield to the loop until ``condition()`` holds (bounded; no wall-clock sleeps)."""
    with anyio.fail_after(10):
        while not await condition():
            await anyio.lowlevel.checkpoint()


async def enqueue(iii: III, payload: Any, queue: str = "work") -> str:
    receipt = await iii.trigger_async("job", payload, action=TriggerAction.Enqueue(queue=queue))
    return str(receipt["messageReceiptId"])


async def leased(iii: III) -> list[str]:
    return [j.id for j in await iii.runtime.store.list_jobs(state="running")]


async def until_leased(iii: III, count: int) -> None:
    """Wait until the store shows ``count`` jobs leased (running or prefetched)."""

    async def reached() -> bool:
        return len(await leased(iii)) == count

    await until(reached)


class Gate:
    """A handler that records its payloads and blocks until released."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.seen: list[Any] = []
        self.running = 0
        self.peak = 0

    async def __call__(self, payload: Any) -> None:
        self.seen.append(payload)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1


async def test_the_default_prefetch_is_four_times_concurrency_on_every_store(
    tmp_path: Path,
) -> None:
    queue = QueueConfig(name="work", concurrency=4)
    apps = [
        III(Config(queues={"work": queue})),
        III(Config(queues={"work": QueueConfig(name="work", concurrency=4, prefetch=0)})),
        file_app(tmp_path / "a", queue),
        file_app(tmp_path / "b", QueueConfig(name="work", concurrency=4, prefetch=1)),
    ]
    prefetch = []
    for app in apps:
        async with app.running():
            prefetch.append(app.runtime.runners["work"].prefetch)
    assert prefetch == [16, 0, 16, 1]


async def until_prefetched(iii: III, count: int, queue: str = "work") -> None:
    """Wait until the queue's runner holds ``count`` claimed jobs it has not started."""

    async def reached() -> bool:
        return iii.runtime.runners[queue].prefetched_count == count

    await until(reached)


def memory_app(queue: QueueConfig, clock: VirtualClock | None = None) -> III:
    return III(
        Config(queues={queue.name: queue}), clock=clock or VirtualClock(), shutdown_grace_ms=0
    )


async def test_in_memory_a_prefetched_job_reads_queued_until_its_handler_starts() -> None:
    clock = VirtualClock()
    iii = memory_app(QueueConfig(name="work", concurrency=1, prefetch=2), clock)
    gates = {0: anyio.Event(), 1: anyio.Event()}
    began = {n: anyio.Event() for n in range(3)}

    @iii.function("job")
    async def job(n: int) -> None:
        began[n].set()
        if n in gates:
            await gates[n].wait()

    async with iii.running():
        t0 = clock.now()
        ids = [await enqueue(iii, i) for i in range(3)]
        await began[0].wait()
        await until_prefetched(iii, 2)
        runs = [await iii.runs.get_async(i) for i in ids]
        stats = await iii.queue_stats_async("work")
        running = [j.id for j in await iii.runtime.store.list_jobs(state="running")]
        queued = [j.id for j in await iii.runtime.store.list_jobs(state="queued")]

        clock.advance(5)
        gates[0].set()
        await began[1].wait()
        # Read as soon as the handler began: the store has its start, no exchange needed.
        started = await iii.runs.get_async(ids[1])
        gates[1].set()
        await drain(iii)
        done = [await iii.runs.get_async(i) for i in ids]

    assert [(r.status, r.attempts, r.started_at) for r in runs if r is not None] == [
        ("running", 1, t0),
        ("queued", 0, None),
        ("queued", 0, None),
    ]
    assert (stats.running, stats.ready, stats.prefetched, stats.oldest_ready_age_s) == (
        1,
        2,
        2,
        0.0,
    )
    assert (running, queued) == (ids[:1], ids[1:])
    assert started is not None
    assert (started.status, started.attempts, started.started_at) == ("running", 1, t0 + 5)
    assert [(r.status, r.attempts) for r in done if r is not None] == [("completed", 1)] * 3


@pytest.mark.parametrize("prefetch", [0, 2])
async def test_in_memory_a_run_waiting_for_a_slot_is_cancelled_alike_whether_prefetched_or_not(
    prefetch: int,
) -> None:
    iii = memory_app(QueueConfig(name="work", concurrency=1, prefetch=prefetch))
    gate = Gate()
    iii.register_function("job", gate)
    hooked: list[str] = []
    iii.on("job_cancelled", lambda job, **_: hooked.append(job.id))
    keyed = TriggerAction.Enqueue(queue="work", idempotency_key="k")
    waited: dict[str, Any] = {}
    async with iii.running():
        await enqueue(iii, 0)
        first = str((await iii.trigger_async("job", 1, action=keyed))["messageReceiptId"])
        await until_prefetched(iii, min(prefetch, 1))

        async def wait() -> None:
            waited["run"] = await iii.runs.wait_async(first)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.lowlevel.checkpoint()  # the waiter is registered
            result = await iii.runs.cancel_async(first)
        cancelled = await iii.runs.get_async(first)
        queued = [j.id for j in await iii.runtime.store.list_jobs(state="queued")]
        # The cancelled run gave its idempotency key back: the same key makes a new run.
        second = str((await iii.trigger_async("job", 2, action=keyed))["messageReceiptId"])
        gate.release.set()
        await drain(iii)
        final = await iii.runs.get_async(second)
        stats = await iii.queue_stats_async("work")
    assert (result.cancelled, result.status_before, result.message) == (
        True,
        "queued",
        "cancelled while queued",
    )
    assert cancelled is not None and (cancelled.status, cancelled.attempts) == ("cancelled", 0)
    assert waited["run"].status == "cancelled"
    assert first not in queued
    assert second != first and final is not None and final.status == "completed"
    assert sorted(gate.seen) == [0, 2]
    assert (stats.completed, stats.failed, stats.ready, stats.running) == (2, 0, 0, 0)
    assert hooked == [first]  # no runner settled it: the cancel fired the hook


async def test_a_job_prefetched_by_another_app_on_the_same_memory_store_is_asked_to_stop() -> None:
    store = MemoryStore()
    clock = VirtualClock()
    holder = III(
        Config(queues={"work": QueueConfig(name="work", concurrency=1, prefetch=2)}),
        clock=clock,
        store=store,
        shutdown_grace_ms=0,
    )
    other = III(
        Config(queues={"work": QueueConfig(name="work", concurrency=1)}),
        clock=clock,
        store=store,
        shutdown_grace_ms=0,
    )
    gate = Gate()
    holder.register_function("job", gate)
    other.register_function("job", gate)
    lease_s = StoreConfig().lease_ms / 1000
    # Closing either app closes the store they share: both stay up to the end.
    async with holder.running(), other.running():
        ids = [await enqueue(holder, i) for i in range(2)]
        await until_prefetched(holder, 1)  # job 0 runs, job 1 waits in holder's buffer
        result = await other.runs.cancel_async(ids[1])
        # The holder learns of it when it renews its leases, and settles it unstarted.
        clock.advance(lease_s / 3)

        async def settled() -> bool:
            run = await holder.runs.get_async(ids[1])
            return run is not None and run.status == "cancelled"

        await until(settled)
        gate.release.set()
        await drain(holder)
        run = await holder.runs.get_async(ids[1])
    assert (result.cancelled, result.message) == (True, "running; asked to stop")
    assert gate.seen == [0]
    assert run is not None and (run.status, run.attempts) == ("cancelled", 0)


async def test_in_memory_cancelling_a_line_job_a_thread_just_started_stops_it_running() -> None:
    iii = memory_app(QueueConfig(name="work", concurrency=1, prefetch=1))
    gates = [threading.Event(), threading.Event()]
    began = [threading.Event(), threading.Event()]

    @iii.function("job")
    def job(n: int) -> None:  # runs in the queue's threads
        began[n].set()
        gates[n].wait(timeout=10)

    async with iii.running():
        ids = [await enqueue(iii, i) for i in range(2)]
        runner = iii.runtime.runners["work"]

        async def in_line() -> bool:
            return ids[1] in runner._reserved

        await until(in_line)
        gates[0].set()
        # Blocks the loop on purpose: the thread starts job 1 from the line, and the loop
        # has not heard of it when the cancel comes.
        assert began[1].wait(10)
        result = await iii.runs.cancel_async(ids[1])
        gates[1].set()
        await drain(iii)
        run = await iii.runs.get_async(ids[1])
    assert (result.cancelled, result.status_before, result.message) == (
        True,
        "running",
        "running; asked to stop",
    )
    assert run is not None and (run.status, run.attempts) == ("cancelled", 1)
    assert run.started_at is not None


async def test_in_memory_a_prefetched_run_cancelled_during_the_grace_period_stays_cancelled() -> (
    None
):
    iii = III(
        Config(queues={"work": QueueConfig(name="work", concurrency=1, prefetch=2)}),
        clock=VirtualClock(),
        shutdown_grace_ms=5000,
    )
    gate = Gate()
    iii.register_function("job", gate)
    runner_result: dict[str, Any] = {}

    async def cancel_once_stopping(run_id: str) -> None:
        runner = iii.runtime.runners["work"]

        async def stopping() -> bool:
            return runner._stopping

        await until(stopping)  # the shutdown has handed the prefetched jobs back
        runner_result["cancel"] = await iii.runs.cancel_async(run_id)
        gate.release.set()

    async with anyio.create_task_group() as tg, iii.running():
        store = iii.runtime.store
        ids = [await enqueue(iii, i) for i in range(3)]
        await until_prefetched(iii, 2)
        tg.start_soon(cancel_once_stopping, ids[2])
    job = await store.get(ids[2])
    result = runner_result["cancel"]
    assert (result.cancelled, result.message) == (True, "cancelled while queued")
    assert job is not None and (job.state, job.attempts) == ("cancelled", 0)


async def test_prefetched_jobs_are_leased_but_only_concurrency_handlers_run(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2, prefetch=3))
    gate = Gate()
    iii.register_function("job", gate)
    async with iii.running():
        for i in range(10):
            await enqueue(iii, i)

        await until_leased(iii, 5)
        stats = await iii.queue_stats_async("work")
        assert (gate.running, stats.running, stats.prefetched, stats.ready) == (2, 5, 3, 5)
        gate.release.set()
        await drain(iii)
        jobs = await iii.runtime.store.list_jobs(state="completed")
    assert gate.peak == 2
    assert sorted(gate.seen) == list(range(10))
    assert sorted(j.attempts for j in jobs) == [1] * 10


async def test_prefetched_jobs_keep_their_leases_while_they_wait(tmp_path: Path) -> None:
    clock = VirtualClock()
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=2), clock)
    gate = Gate()
    iii.register_function("job", gate)
    lease_s = StoreConfig().lease_ms / 1000
    async with iii.running():
        for i in range(3):
            await enqueue(iii, i)

        await until_leased(iii, 3)
        # Three lease lengths pass while two of the jobs wait behind the first: every
        # lease_s / 3 the maintenance task renews the prefetched ones too, so none expires
        # and is recovered (which would run it twice).
        for _ in range(9):
            clock.advance(lease_s / 3)

            async def renewed() -> bool:
                jobs = await iii.runtime.store.list_jobs(state="running")
                return [j.lease_until for j in jobs] == [clock.now() + lease_s] * 3

            await until(renewed)
        gate.release.set()
        await drain(iii)
        jobs = await iii.runtime.store.list_jobs(state="completed")
    assert sorted(gate.seen) == [0, 1, 2]
    assert [j.attempts for j in jobs] == [1, 1, 1]


async def test_shutdown_hands_prefetched_jobs_back_without_spending_an_attempt(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=2))
    gate = Gate()
    iii.register_function("job", gate)
    async with iii.running():
        for i in range(5):
            await enqueue(iii, i)

        await until_leased(iii, 3)
    # The grace period is 0: the running handler is stopped too; nothing ran to its end.
    assert gate.seen == [0]
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        jobs = await store.list_jobs()
    finally:
        await store.aclose()
    assert sorted((j.state, j.attempts, j.lease_owner) for j in jobs) == [("queued", 0, None)] * 5


async def test_in_memory_shutdown_hands_prefetched_jobs_back_without_spending_an_attempt() -> None:
    iii = memory_app(QueueConfig(name="work", concurrency=1, prefetch=3))
    gate = Gate()
    iii.register_function("job", gate)
    async with iii.running():
        store = iii.runtime.store
        assert isinstance(store, MemoryStore)
        ids = [await enqueue(iii, i) for i in range(4)]
        await until_prefetched(iii, 3)
    # The store's own rows, not the readers' view (which shows unstarted jobs as queued
    # whatever their lease): every job is back in its queue, unleased, no attempt spent.
    rows = [store._rows[i] for i in ids]
    assert gate.seen == [0]
    assert [(r.state, r.attempts, r.lease_owner) for r in rows] == [("queued", 0, None)] * 4


async def test_cancelling_a_prefetched_run_settles_it_unstarted(tmp_path: Path) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=2))
    gate = Gate()
    iii.register_function("job", gate)
    async with iii.running():
        ids = [await enqueue(iii, i) for i in range(3)]

        await until_leased(iii, 3)
        result = await iii.runs.cancel_async(ids[2])
        assert (result.cancelled, result.status_before) == (True, "running")
        gate.release.set()
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert sorted(gate.seen) == [0, 1]
    assert [(r.status, r.attempts) for r in runs if r is not None] == [
        ("completed", 1),
        ("completed", 1),
        ("cancelled", 0),
    ]


@pytest.mark.parametrize("on_file", [False, True], ids=["in_memory", "file_based"])
async def test_a_waiting_handler_does_not_hold_back_the_jobs_claimed_after_it(
    tmp_path: Path, on_file: bool
) -> None:
    queue = QueueConfig(name="work", concurrency=2, prefetch=4)
    iii = file_app(tmp_path, queue) if on_file else III(Config(queues={"work": queue}))
    gate = Gate()
    quick_done: list[int] = []
    all_quick = anyio.Event()

    @iii.function("job")
    async def job(n: int) -> None:
        if n == 0:
            await gate(n)
            return
        quick_done.append(n)
        if len(quick_done) == 6:
            all_quick.set()

    async with iii.running():
        for i in range(7):
            await enqueue(iii, i)
        with anyio.fail_after(10):
            await all_quick.wait()
        assert gate.running == 1  # job 0 still waits; the other six ran past it
        gate.release.set()
        await drain(iii)
    assert sorted(quick_done) == [1, 2, 3, 4, 5, 6]


async def test_a_prefetched_run_starts_when_its_handler_does_and_says_so_while_it_runs(
    tmp_path: Path,
) -> None:
    clock = VirtualClock()
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=2), clock)
    gates = {0: anyio.Event(), 1: anyio.Event()}
    began: dict[int, float] = {}

    @iii.function("job")
    async def job(n: int) -> None:
        began[n] = clock.now()
        if n in gates:
            await gates[n].wait()

    async with iii.running():
        t0 = clock.now()
        ids = [await enqueue(iii, i) for i in range(3)]
        await until_leased(iii, 3)
        waiting = await iii.runs.get_async(ids[1])
        assert waiting is not None and (waiting.status, waiting.started_at) == ("running", None)

        clock.advance(5)  # jobs 1 and 2 wait in the buffer meanwhile
        gates[0].set()

        async def start_written() -> bool:
            run = await iii.runs.get_async(ids[1])
            return run is not None and run.started_at is not None

        # Job 1 (prefetched) now runs and blocks: its start reaches the store while it runs.
        await until(start_written)
        running = await iii.runs.get_async(ids[1])
        assert running is not None and (running.status, running.started_at) == ("running", t0 + 5)
        clock.advance(2)
        gates[1].set()
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert began == {0: t0, 1: t0 + 5, 2: t0 + 7}
    assert [(r.status, r.attempts, r.started_at) for r in runs if r is not None] == [
        ("completed", 1, t0),
        ("completed", 1, t0 + 5),
        ("completed", 1, t0 + 7),  # its start was written with its completion
    ]


@pytest.mark.parametrize("on_file", [False, True], ids=["in_memory", "file_based"])
async def test_a_prefetched_sync_run_reads_running_with_its_start_while_it_runs(
    tmp_path: Path, on_file: bool
) -> None:
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=1)
    iii = file_app(tmp_path, queue, clock) if on_file else memory_app(queue, clock)
    gates = [threading.Event(), threading.Event()]

    @iii.function("job")
    def job(n: int) -> None:  # runs in the queue's threads
        gates[n].wait(timeout=30)

    async with iii.running():
        t0 = clock.now()
        ids = [await enqueue(iii, i) for i in range(2)]
        await until_prefetched(iii, 1)
        waiting = await iii.runs.get_async(ids[1])
        clock.advance(3)
        gates[0].set()  # job 1 follows job 0 in its thread (the line)

        async def start_shown() -> bool:
            run = await iii.runs.get_async(ids[1])
            return run is not None and run.status == "running" and run.started_at is not None

        await until(start_shown)
        running = await iii.runs.get_async(ids[1])
        gates[1].set()
        await drain(iii)
    # Waiting for its slot: leased on a file store; in memory, as before its claim.
    assert waiting is not None
    assert (waiting.status, waiting.attempts) == (("running", 1) if on_file else ("queued", 0))
    assert running is not None
    assert (running.status, running.attempts, running.started_at) == ("running", 1, t0 + 3)
