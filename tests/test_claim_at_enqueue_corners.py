"""Corners of claims at enqueue (see test_claim_at_enqueue.py): when the jobs an enqueue
claimed reach the runner with every slot taken, a retry decided while the queue learns
its next due time, and a cancel of a job claimed at enqueue that has not started."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_claim_at_enqueue import (
    count_claimed,
    enqueue,
    gated,
    one_running_one_prefetched_one_owed,
    until_idle,
    until_running,
)
from test_prefetch import file_app, memory_app, until_prefetched

from iii_embedded import III, QueueConfig, RetryAfter, TriggerAction
from iii_embedded._stores import NewJob
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


async def test_a_job_claimed_at_enqueue_with_every_slot_taken_starts_after_its_caller_resumes(
    tmp_path: Path,
) -> None:
    """One slot, held by a sync handler; an enqueue claims "child" (prefetch room). Its
    transaction ends, and the sync handler returns just then, before the enqueue's caller
    has resumed (the loop is blocked on purpose right after the claim is delivered). The
    handler's thread must not take "child" from the line then: the caller resumes first
    (a handler that waits for the run it enqueued registers its wait then)."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    order: list[str] = []
    blocker_began = threading.Event()
    blocker_go = threading.Event()
    decided = threading.Event()
    """Set once the blocker's thread has ended its handler and either started "child" or
    taken nothing from the line."""

    @iii.function("job")
    def job(name: str) -> None:  # runs in the queue's threads
        if name == "blocker":
            blocker_began.set()
            blocker_go.wait(10)
        else:
            order.append(name)
            decided.set()

    async with iii.running():
        runner = iii.runtime.runners["work"]
        pool: Any = runner.threads
        real_follow = pool._follow

        def follow(entry: Any) -> Any:
            following = real_follow(entry)
            if following is None:
                decided.set()
            return following

        pool._follow = follow  # read by each thread as it starts: before the first job
        await until_idle(iii)
        await enqueue(iii, "blocker")
        assert await anyio.to_thread.run_sync(blocker_began.wait, 10)
        await until_idle(iii)  # its start is written; the queue is drained again
        real_claimed = runner._claimed

        def claimed(claim: Any, jobs: Any) -> None:
            real_claimed(claim, jobs)
            blocker_go.set()
            assert decided.wait(10)  # blocks the loop: its caller has not resumed yet

        runner._claimed = claimed  # type: ignore[method-assign]
        counts = count_claimed(iii)
        await enqueue(iii, "child")
        order.append("caller resumed")
        runner._claimed = real_claimed  # type: ignore[method-assign]
        await drain(iii)
        stats = await iii.queue_stats_async("work")
    assert counts == [1]
    assert order == ["caller resumed", "child"]
    assert (stats.completed, stats.running, stats.ready) == (2, 0, 0)


class HeldDueRead:
    """Holds the queue's read of its next due time (``store.next_delayed_at``, asked by
    ``_learn_due``) from :meth:`hold` until :meth:`let_go`; ``reading`` is set when one
    begins, and ``answers`` collects what the store answered."""

    def __init__(self, iii: III) -> None:
        self.store: Any = iii.runtime.store
        self.real = self.store.next_delayed_at
        self.reading = anyio.Event()
        self.answer = anyio.Event()
        self.answers: list[float | None] = []

    async def _held(self, queue: str, after: float) -> float | None:
        self.reading.set()
        await self.answer.wait()
        got: float | None = await self.real(queue, after)
        self.answers.append(got)
        return got

    def hold(self) -> None:
        self.store.next_delayed_at = self._held

    def let_go(self) -> None:
        self.answer.set()
        self.store.next_delayed_at = self.real


async def test_a_retry_decided_while_the_queue_reads_its_due_time_runs_before_a_later_enqueue(
    tmp_path: Path,
) -> None:
    """The queue drains and asks the store for its next due time; a handler fails
    (``RetryAfter(5 s)``) while that read is on its way, so the read cannot see the retry.
    Once the retry is due, an enqueue must be stored queued behind it, not claimed."""
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=2, poll_interval_ms=60_000)
    iii = file_app(tmp_path, queue, clock)
    seen: list[str] = []
    fail = anyio.Event()

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)
        if seen == ["flaky"]:
            await fail.wait()
            raise RetryAfter(5_000)

    async with iii.running():
        runner = iii.runtime.runners["work"]
        read = HeldDueRead(iii)
        await until_idle(iii)
        await enqueue(iii, "flaky")
        with anyio.fail_after(10):
            while not (seen and runner.idle):
                await anyio.lowlevel.checkpoint()
        read.hold()
        runner.wake()  # as a redrive would: the queue claims, finds nothing, and learns
        with anyio.fail_after(10):
            await read.reading.wait()
        fail.set()
        with anyio.fail_after(10):
            while not runner._outcomes:  # the retry is decided, not yet written
                await anyio.lowlevel.checkpoint()
        read.let_go()
        await until_idle(iii)
        clock.advance(6)  # the retry is due
        counts = count_claimed(iii)
        await enqueue(iii, "later")
        await drain(iii)
    assert read.answers == [None]  # the read did not see the retry
    assert counts == [0]
    assert seen == ["flaky", "flaky", "later"]


def cancel_hooks(iii: III) -> list[str]:
    hooked: list[str] = []
    iii.on("job_cancelled", lambda job, **_: hooked.append(job.id))
    return hooked


@pytest.mark.parametrize("on_file", [False, True], ids=["in_memory", "file_based"])
async def test_a_job_waiting_in_the_buffer_behind_a_running_one_is_cancelled_unstarted(
    tmp_path: Path, on_file: bool
) -> None:
    """On the file store "second" was claimed at enqueue (the queue had drained) and waits
    in the buffer; in memory no enqueue claims, and the dispatcher prefetched it. Either
    way the cancel settles it unstarted: its handler never runs, its attempt is given
    back, and the queue ends with nothing running or ready."""
    queue = QueueConfig(name="work", concurrency=1, prefetch=1)
    iii = file_app(tmp_path, queue) if on_file else memory_app(queue)
    seen, gate = gated(iii)
    hooked = cancel_hooks(iii)
    async with iii.running():
        runner = iii.runtime.runners["work"]
        await until_idle(iii)
        counts = count_claimed(iii) if on_file else []
        await enqueue(iii, "first")
        await until_running(seen)
        second = await enqueue(iii, "second")
        await until_prefetched(iii, 1)
        assert [job.id for job in runner._buffer] == [second]
        result = await iii.runs.cancel_async(second)
        gate.set()
        await drain(iii)
        run = await iii.runs.get_async(second)
        stats = await iii.queue_stats_async("work")
    assert runner.claims_on_enqueue is on_file
    assert counts == ([1, 1] if on_file else [])
    expected = (
        ("running", "running; asked to stop") if on_file else ("queued", "cancelled while queued")
    )
    assert (result.cancelled, result.status_before, result.message) == (True, *expected)
    assert run is not None and (run.status, run.attempts) == ("cancelled", 0)
    assert seen == ["first"]
    assert hooked == [second]
    assert (stats.running, stats.ready, stats.prefetched, stats.completed) == (0, 0, 0, 1)


async def a_parked_job(iii: III, seen: list[str]) -> tuple[Any, str, list[int], Any]:
    """The state where "fourth", claimed at enqueue, is parked: the dispatcher's claim of
    the owed "third" is on its way (its exchange held after its commit), so "fourth" waits
    for it to reach the buffer. Returns the runner, fourth's id, the claims counted at
    enqueue (``count_claimed``), and a function that lets the exchange go on."""
    runner = await one_running_one_prefetched_one_owed(iii, seen)
    store: Any = iii.runtime.store
    real = store.exchange
    committed = anyio.Event()
    resume = anyio.Event()

    async def late(*args: Any, **kwargs: Any) -> Any:
        jobs = await real(*args, **kwargs)
        if kwargs["limit"] > 0:
            committed.set()
            await resume.wait()
        return jobs

    def let_go() -> None:
        store.exchange = real
        resume.set()

    store.exchange = late
    runner.prefetch = 3  # room frees up
    runner.poke()
    await anyio.lowlevel.checkpoint()  # the dispatcher asks for the owed job
    assert runner._claiming == 1
    counts = count_claimed(iii)
    fourth = await enqueue(iii, "fourth")
    with anyio.fail_after(10):
        await committed.wait()
    assert [[job.id for job in jobs] for _, jobs in runner._parked] == [[fourth]]
    return runner, fourth, counts, let_go


async def test_a_job_claimed_at_enqueue_and_parked_is_cancelled_unstarted(
    tmp_path: Path,
) -> None:
    """The dispatcher's claim of the owed "third" is on its way when "fourth" is claimed
    at enqueue, so "fourth" is parked until that claim reaches the buffer. Here the dispatcher
    resumes late (its exchange is held after committing), and the cancel comes while
    "fourth" is parked. It must be settled unstarted, as a job in the buffer is."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen, gate = gated(iii)
    hooked = cancel_hooks(iii)
    async with iii.running():
        _, fourth, counts, let_go = await a_parked_job(iii, seen)
        result = await iii.runs.cancel_async(fourth)
        let_go()
        gate.set()
        await drain(iii)
        run = await iii.runs.get_async(fourth)
        stats = await iii.queue_stats_async("work")
    assert counts == [1]
    assert (result.cancelled, result.status_before, result.message) == (
        True,
        "running",
        "running; asked to stop",
    )
    assert (stats.running, stats.ready) == (0, 0)
    assert run is not None and (run.status, run.attempts) == ("cancelled", 0)
    assert seen == ["first", "second", "third"]
    assert hooked == [fourth]


async def test_a_parked_job_cancelled_then_handed_back_at_shutdown_ends_cancelled(
    tmp_path: Path,
) -> None:
    """As above, but the runner begins shutting down before the parked job reaches the
    buffer: it is handed back, and a handed-back job a cancel reached ends ``cancelled``
    there and then, not ``queued`` until some later claim."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen, gate = gated(iii)
    hooked = cancel_hooks(iii)
    async with iii.running():
        runner, fourth, _, let_go = await a_parked_job(iii, seen)
        result = await iii.runs.cancel_async(fourth)
        runner.stop_claiming()  # shutdown's first step, as leaving ``running()`` takes
        let_go()
        gate.set()
        with anyio.fail_after(10):
            while runner.unsettled:
                await anyio.lowlevel.checkpoint()
        run = await iii.runs.get_async(fourth)
    assert (result.cancelled, result.message) == (True, "running; asked to stop")
    assert run is not None and (run.status, run.attempts) == ("cancelled", 0)
    assert "fourth" not in seen
    assert hooked == [fourth]


@pytest.mark.parametrize("on_file", [False, True], ids=["in_memory", "file_based"])
async def test_cancel_right_after_shutdown_hands_back_a_prefetched_job(
    tmp_path: Path, on_file: bool
) -> None:
    """Shutdown hands "second" back ``released``; a cancel asked in the same turn reaches
    the store first, then the runner while that outcome is on its way (``_writing``)."""
    queue = QueueConfig(name="work", concurrency=1, prefetch=1)
    iii = file_app(tmp_path, queue) if on_file else memory_app(queue)
    seen, gate = gated(iii)
    hooked = cancel_hooks(iii)
    async with iii.running():
        runner = iii.runtime.runners["work"]
        await enqueue(iii, "first")
        await until_running(seen)
        second = await enqueue(iii, "second")
        await until_prefetched(iii, 1)
        runner.stop_claiming()  # shutdown's first step: "second" handed back released
        result = await iii.runs.cancel_async(second)
        gate.set()
        with anyio.fail_after(10):
            while runner.unsettled:
                await anyio.lowlevel.checkpoint()
        run = await iii.runs.get_async(second)
    assert result.cancelled is True
    assert run is not None and run.status == "cancelled", (result.message, run and run.status)
    assert hooked == [second]


async def test_a_cancel_while_the_queue_reads_its_due_time_reaches_the_job_it_claimed(
    tmp_path: Path,
) -> None:
    """The dispatcher's claim takes "first" and finds the queue drained, so it asks the
    store for its next due time. A cancel that comes during that read must reach the job
    at once: it is in the buffer or running by then (until 2026-12-03 it waited in the
    dispatcher until the read returned, and the cancel missed it; only a lease renewal
    stopped it later)."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen, _gate = gated(iii)  # "first" waits for a gate nobody opens
    hooked = cancel_hooks(iii)
    async with iii.running():
        runner = iii.runtime.runners["work"]
        read = HeldDueRead(iii)
        await until_idle(iii)
        read.hold()
        runner.wake()  # as a poll for other processes' jobs: the enqueue is stored queued
        first = await enqueue(iii, "first")
        with anyio.fail_after(10):
            await read.reading.wait()
        result = await iii.runs.cancel_async(first)
        read.let_go()
        with anyio.fail_after(10):  # stopped now, not at the next lease renewal
            while runner.running or runner.unsettled:
                await anyio.lowlevel.checkpoint()
        run = await iii.runs.get_async(first)
    assert result.cancelled is True
    assert run is not None and run.status == "cancelled"
    assert hooked == [first]
    assert seen in ([], ["first"])  # stopped before or after its handler began


@pytest.mark.parametrize("on_file", [False, True], ids=["in_memory", "file_based"])
async def test_fifo_group_moves_on_after_a_pending_held_outcome_is_cancelled(
    tmp_path: Path, on_file: bool
) -> None:

    queue = QueueConfig(
        name="work", type="fifo", message_group_field="g", concurrency=1, prefetch=4
    )
    iii = file_app(tmp_path, queue) if on_file else memory_app(queue)
    seen: list[str] = []
    results: list[Any] = []

    @iii.function("job")
    async def job(p: dict[str, Any]) -> None:
        seen.append(p["name"])
        if "cancel" in p:
            results.append(await iii.runs.cancel_async(p["cancel"]))

    hooked = cancel_hooks(iii)
    act = TriggerAction.Enqueue(queue="work")
    async with iii.running():
        now = iii.runtime.clock.now()
        ghost = NewJob(
            id="ghost-1",
            queue="work",
            function_id="ghost",
            payload="{}",
            created_at=now,
            available_at=now,
            max_attempts=3,
            group="A",
        )
        await iii.runtime.store.enqueue([ghost])
        iii.runtime.runners["work"].wake()
        await iii.trigger_async("job", {"g": "B", "name": "c", "cancel": "ghost-1"}, action=act)
        await iii.trigger_async("job", {"g": "A", "name": "after"}, action=act)
        await drain(iii)
        run = await iii.runs.get_async("ghost-1")
    assert [r.cancelled for r in results] == [True]
    assert run is not None and (run.status, run.attempts) == ("cancelled", 0)
    assert hooked == ["ghost-1"]
    assert seen == ["c", "after"]
