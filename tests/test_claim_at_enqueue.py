"""Claims at enqueue (docs/design.md, "Claims at enqueue"): on the file store, a standard
queue whose last claim found nothing more to claim, and that has room, gets the jobs
enqueued on its loop stored already claimed. Nothing that waits in the store may be
overtaken by them: a delayed job that fell due, a retry, a redriven job, a job stored
queued because the queue had no room. A job so claimed is delivered to its queue even if
the caller stops waiting, is handed back at shutdown, and gives its attempt back if its
process dies before it starts."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from test_prefetch import file_app

from iii_embedded import (
    III,
    Config,
    QueueConfig,
    RetryAfter,
    StoreConfig,
    StoreError,
    TriggerAction,
)
from iii_embedded._stores import EnqueueClaim, Job, completed_outcome, make_new_job
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def gated(iii: III) -> tuple[list[str], anyio.Event]:
    """Register a handler that records each payload; the one named "first" waits for
    the returned event."""
    seen: list[str] = []
    gate = anyio.Event()

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)
        if name == "first":
            await gate.wait()

    return seen, gate


async def enqueue(iii: III, payload: Any, *, delay_ms: int = 0) -> str:
    receipt = await iii.trigger_async(
        "job", payload, action=TriggerAction.Enqueue(queue="work", delay_ms=delay_ms)
    )
    return str(receipt["messageReceiptId"])


async def until_running(seen: list[str]) -> None:
    """Wait until a handler of ``gated`` has started."""
    with anyio.fail_after(10):
        while not seen:
            await anyio.lowlevel.checkpoint()


async def until_idle(iii: III) -> None:
    """Wait until the queue's dispatcher has parked (its last claim found nothing)."""
    runner = iii.runtime.runners["work"]
    with anyio.fail_after(10):
        while not runner.idle:
            await anyio.lowlevel.checkpoint()


async def one_running_one_prefetched_one_owed(iii: III, seen: list[str]) -> Any:
    """On a drained queue of concurrency 1 and prefetch 1: "first" claimed at enqueue and
    running (it waits for its gate), "second" claimed at enqueue and prefetched, "third"
    stored queued for want of room (owed). Returns the queue's runner."""
    await until_idle(iii)
    await enqueue(iii, "first")
    await until_running(seen)
    await enqueue(iii, "second")
    await enqueue(iii, "third")
    return iii.runtime.runners["work"]


def small_disk_app(tmp_path: Path, *, prefetch: int) -> tuple[III, SQLiteStore]:
    """An app, and its file store whose disk holds 64 pages (a payload of 1 MB does not
    fit), with a queue "work" of concurrency 1."""
    store = SQLiteStore(tmp_path / "store", max_page_count=64)
    iii = III(
        Config(queues={"work": QueueConfig(name="work", concurrency=1, prefetch=prefetch)}),
        store=store,
        clock=VirtualClock(),
        shutdown_grace_ms=0,
    )
    return iii, store


def count_claimed(iii: III) -> list[int]:
    """Record how many jobs each enqueue stored claimed (0: none)."""
    store = iii.runtime.store
    counts: list[int] = []
    real_enqueue, real_claimed = store.enqueue, store.enqueue_claimed

    def plain(jobs: Any) -> Any:
        counts.append(0)
        return real_enqueue(jobs)

    def claimed(jobs: Any, claim: EnqueueClaim) -> Any:
        counts.append(claim.count)
        return real_claimed(jobs, claim)

    store.enqueue = plain  # type: ignore[method-assign]
    store.enqueue_claimed = claimed  # type: ignore[method-assign]
    return counts


async def test_jobs_enqueued_into_a_drained_queue_are_stored_claimed_and_run(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=2))
    seen: list[int] = []

    @iii.function("job")
    async def job(n: int) -> int:
        seen.append(n)
        return n * 10

    async with iii.running():
        await until_idle(iii)
        counts = count_claimed(iii)
        ids = [await enqueue(iii, n) for n in range(5)]
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert counts == [1, 1, 1, 1, 1]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert [(r.status, r.output, r.attempts) for r in runs] == [
        ("completed", n * 10, 1) for n in range(5)
    ]


async def test_a_delayed_job_that_fell_due_runs_before_a_later_enqueue(tmp_path: Path) -> None:
    """Once a delayed job is due, the next enqueue is stored queued behind it, even before
    the dispatcher has woken for it: one slot, so the order of the runs is the order of
    the claims."""
    clock = VirtualClock()
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=0), clock)
    seen: list[str] = []

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)

    async with iii.running():
        await until_idle(iii)
        await enqueue(iii, "delayed", delay_ms=5_000)
        await until_idle(iii)
        counts = count_claimed(iii)
        clock.advance(6)  # due now; nothing has run on the loop since
        await enqueue(iii, "later")
        await drain(iii)
    assert counts == [0]
    assert seen == ["delayed", "later"]


async def test_a_retry_that_fell_due_runs_before_a_later_enqueue(tmp_path: Path) -> None:
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=0, backoff_ms=5_000)
    iii = file_app(tmp_path, queue, clock)
    seen: list[str] = []

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)
        if name == "flaky" and seen.count("flaky") == 1:
            raise RuntimeError("once")

    async with iii.running():
        await until_idle(iii)
        await enqueue(iii, "flaky")
        with anyio.fail_after(10):
            while not (seen and iii.runtime.runners["work"].idle):
                await anyio.lowlevel.checkpoint()
        await enqueue(iii, "meanwhile")  # the retry is not due: claimed at enqueue
        await drain(iii, max_advance_s=0)
        counts = count_claimed(iii)
        clock.advance(6)
        await enqueue(iii, "later")
        await drain(iii)
    assert counts == [0]
    assert seen == ["flaky", "meanwhile", "flaky", "later"]


@pytest.mark.parametrize("together", [False, True], ids=["after", "same_commit"])
async def test_a_redriven_job_runs_before_a_later_enqueue(tmp_path: Path, together: bool) -> None:
    """The enqueue comes after the redrive returned, or while it is on its way to the
    store (the two then share a commit): either way the redriven job runs first."""
    queue = QueueConfig(name="work", concurrency=1, prefetch=0, max_retries=1)
    iii = file_app(tmp_path, queue)
    seen: list[str] = []
    failing = True

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)
        if name == "dead" and failing:
            raise RuntimeError("no")

    async with iii.running():
        await until_idle(iii)
        await enqueue(iii, "dead")
        await drain(iii)
        failing = False
        counts = count_claimed(iii)
        if together:
            async with anyio.create_task_group() as tg:
                tg.start_soon(iii.dlq_redrive_async, "work")
                await anyio.lowlevel.checkpoint()  # the redrive is on its way to the store
                tg.start_soon(enqueue, iii, "later")
        else:
            assert len(await iii.dlq_redrive_async("work")) == 1
            await enqueue(iii, "later")
        await drain(iii)
    assert counts == [0]
    assert seen == ["dead", "dead", "later"]


async def test_with_no_room_jobs_are_stored_queued_and_claimed_in_order(tmp_path: Path) -> None:
    """One slot and no prefetch: while a job runs, the next enqueues are stored queued,
    and the room they are owed is kept for them: no later enqueue overtakes them."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=0))
    seen, gate = gated(iii)

    async with iii.running():
        await until_idle(iii)
        counts = count_claimed(iii)
        await enqueue(iii, "first")
        await until_running(seen)
        await enqueue(iii, "second")
        await enqueue(iii, "third")
        # A slot more now (as if prefetching): it is owed to the two jobs stored queued,
        # which the dispatcher has yet to claim, not to the next enqueue.
        runner = iii.runtime.runners["work"]
        runner.prefetch = 2
        action = TriggerAction.Enqueue(queue="work")
        assert (
            runner.claim_at_enqueue(iii.runtime.build_jobs("job", ["x"], action, batch=False))
            is None
        )
        runner.prefetch = 0
        gate.set()
        await drain(iii)
        await enqueue(iii, "fourth")  # drained again: claimed at enqueue
        await drain(iii)
    assert counts == [1, 0, 0, 1]
    assert seen == ["first", "second", "third", "fourth"]


async def test_a_job_claimed_at_enqueue_runs_even_if_its_caller_stops_waiting(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work"))
    ran = anyio.Event()

    @iii.function("job")
    async def job(_: Any) -> None:
        ran.set()

    async with iii.running():
        await until_idle(iii)
        counts = count_claimed(iii)
        async with anyio.create_task_group() as tg:
            tg.start_soon(enqueue, iii, {})
            await anyio.lowlevel.checkpoint()  # the enqueue is on its way to the store
            tg.cancel_scope.cancel()
        with anyio.fail_after(10):
            await ran.wait()
        await drain(iii)
        [stored] = await iii.runtime.store.list_jobs()
    assert counts == [1]
    assert (stored.state, stored.attempts) == ("completed", 1)


async def test_jobs_claimed_at_enqueue_as_the_app_stops_are_handed_back_unattempted(
    tmp_path: Path,
) -> None:
    iii = file_app(tmp_path, QueueConfig(name="work"))
    iii.register_function("job", lambda _: None)
    async with iii.running():
        await until_idle(iii)
        counts = count_claimed(iii)
        rt = iii.runtime
        action = TriggerAction.Enqueue(queue="work")
        # The app stops before the enqueue's transaction has run.
        pending = rt.submit_enqueue("job", [1, 2, 3], action, batch=True)
    ids = await pending
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        jobs = [await store.get(i) for i in ids]
    finally:
        await store.aclose()
    assert counts == [3]
    assert [(j.state, j.attempts, j.lease_owner) for j in jobs if j] == [("queued", 0, None)] * 3


async def test_a_failed_enqueue_gives_back_the_room_it_claimed(tmp_path: Path) -> None:
    """An enqueue whose transaction fails (the disk is full) stores nothing and raises.
    The room it had taken is given back, and the queue claims afresh: the next job is
    stored queued for the dispatcher to claim, and the app drains."""
    iii, store = small_disk_app(tmp_path, prefetch=0)
    seen: list[int] = []

    @iii.function("job")
    async def job(payload: Any) -> None:
        seen.append(len(payload))

    async with iii.running():
        await until_idle(iii)
        counts = count_claimed(iii)
        with pytest.raises(Exception, match="disk is full"):
            await enqueue(iii, "x" * 1_000_000)
        runner = iii.runtime.runners["work"]
        assert (runner.unsettled, runner._claimed_at_enqueue) == (0, 0)
        await enqueue(iii, "y")
        await drain(iii)
        store._closed = True  # as if closed under it: the enqueue fails at once
        with pytest.raises(Exception, match="not open"):
            await enqueue(iii, "z")
        store._closed = False
        assert (runner.unsettled, runner._claimed_at_enqueue) == (0, 0)
        await enqueue(iii, "w")
        await drain(iii)
    assert counts == [1, 0, 1, 0]
    assert seen == [1, 1]


async def test_the_store_keeps_a_claimed_job_as_a_prefetching_claim_would(
    tmp_path: Path,
) -> None:
    """``enqueue_claimed`` stores its leading jobs running, attempt counted, no start,
    leased; the rest queued. A completion finds the row by its seq; an expired lease gives
    the attempt back."""
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    delivered: list[list[Job] | None] = []
    try:
        jobs = [
            make_new_job(f"j{n}", "work", "job", "{}", None, 100.0, 100.0, 3, None)
            for n in range(3)
        ]
        claim = EnqueueClaim(
            owner="me", lease_until=130.0, count=2, deliver=lambda c, js: delivered.append(js)
        )
        assert await store.enqueue_claimed(jobs, claim) == ["j0", "j1", "j2"]
        [got] = delivered
        assert got is not None
        assert [(j.id, j.state, j.attempts, j.started_at, j.lease_owner) for j in got] == [
            ("j0", "running", 1, None, "me"),
            ("j1", "running", 1, None, "me"),
        ]
        stored = {j.id: j for j in await store.list_jobs()}
        assert [(stored[i].state, stored[i].attempts) for i in ("j0", "j1", "j2")] == [
            ("running", 1),
            ("running", 1),
            ("queued", 0),
        ]
        assert got[0].seq == stored["j0"].seq and got[1].seq == stored["j1"].seq
        first = got[0]
        done = completed_outcome(first.id, "me", first.attempts, 101.0, "1", first.seq, 101.0)
        await store.finish([done])
        assert await store.recover(200.0) != []
        after = {j.id: j for j in await store.list_jobs()}
        assert (after["j0"].state, after["j0"].output) == ("completed", "1")
        assert (after["j1"].state, after["j1"].attempts) == ("queued", 0)
    finally:
        await store.aclose()


async def test_a_job_claimed_at_enqueue_by_a_killed_process_runs_again_unattempted(
    tmp_path: Path,
) -> None:
    """kill -9 of a process holding a job claimed at enqueue whose handler had not started
    (it waits behind a running one, one slot). Reopened, the store gives the job back its
    attempt, and another app runs it."""
    directory = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import anyio, sys
        from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction

        store = StoreConfig(store_method="file_based", file_path={str(directory)!r})
        iii = III(Config(queues={{"work": QueueConfig(name="work", concurrency=1)}},
                         store=store))
        block = anyio.Event()

        @iii.function("job")
        async def job(name):
            if name == "blocker":
                print("started", flush=True)
                await block.wait()

        async def main():
            async with iii.running():
                runner = iii.runtime.runners["work"]
                while not runner.idle:
                    await anyio.lowlevel.checkpoint()
                act = TriggerAction.Enqueue(queue="work")
                await iii.trigger_async("job", "blocker", action=act)
                await iii.trigger_async("job", "waiting", action=act)
                print("enqueued", flush=True)  # after the commit: the receipt
                await block.wait()

        anyio.run(main)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert proc.stdout is not None
        lines = {proc.stdout.readline().strip() for _ in range(2)}
        assert lines == {"started", "enqueued"}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    iii = file_app(tmp_path, QueueConfig(name="work"))
    seen: list[str] = []

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)

    async with iii.running():
        await drain(iii)
        jobs = {j.payload: j for j in await iii.runtime.store.list_jobs()}
    assert sorted(seen) == ["blocker", "waiting"]
    assert (jobs['"waiting"'].state, jobs['"waiting"'].attempts) == ("completed", 1)
    assert jobs['"waiting"'].error is not None  # the recovery's note, kept on the run


async def test_a_job_another_process_stores_is_claimed_at_the_next_poll(tmp_path: Path) -> None:
    """A drained queue claims only the jobs its own enqueues stored queued; the poll for
    other processes' jobs ends that, so a job stored by another process still runs."""
    iii = file_app(tmp_path, QueueConfig(name="work", poll_interval_ms=20))
    ran = anyio.Event()

    @iii.function("job")
    async def job(name: str) -> None:
        if name == "foreign":
            ran.set()

    async with iii.running():
        await until_idle(iii)
        await enqueue(iii, "local")  # claimed at enqueue: the queue is drained
        await drain(iii)
        other = SQLiteStore(tmp_path / "store")  # as another process would
        await other.open()
        try:
            now = iii.runtime.clock.now()
            new = make_new_job("f1", "work", "job", '"foreign"', None, now, now, 3, None)
            assert await other.enqueue([new]) == ["f1"]
        finally:
            await other.aclose()
        with anyio.fail_after(10):
            await ran.wait()


async def test_an_enqueue_that_claims_takes_the_jobs_stored_queued_before_it_first(
    tmp_path: Path,
) -> None:
    """A job stored queued for want of room is owed the next claim. When room frees up
    (here: more prefetch) and an enqueue claims, it claims that job first, in the same
    transaction, and the jobs run in the order they were enqueued."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen, gate = gated(iii)

    async with iii.running():
        await until_idle(iii)
        claims: list[tuple[int, int]] = []
        store = iii.runtime.store
        real = store.enqueue_claimed

        def traced(jobs: Any, claim: EnqueueClaim) -> Any:
            claims.append((claim.ahead, claim.count))
            return real(jobs, claim)

        store.enqueue_claimed = traced  # type: ignore[method-assign]
        await enqueue(iii, "first")
        await until_running(seen)
        await enqueue(iii, "second")  # prefetched
        await enqueue(iii, "third")  # no room: stored queued
        iii.runtime.runners["work"].prefetch = 3  # room for two more
        await enqueue(iii, "fourth")
        gate.set()
        await drain(iii)
    assert claims == [(0, 1), (0, 1), (1, 1)]
    assert seen == ["first", "second", "third", "fourth"]


async def test_concurrent_producers_keep_their_order_and_the_queue_its_bounds(
    tmp_path: Path,
) -> None:
    """Four producers enqueue 50 jobs each into one slot with 3 prefetched, handlers
    yield a varying number of times: each producer's jobs run in the order it enqueued
    them, each once, and the runner never holds more than 4 jobs."""
    rng = random.Random(7)
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=3))
    runner_holds: list[int] = []
    seen: list[tuple[int, int]] = []

    @iii.function("job")
    async def job(payload: list[int]) -> None:
        runner = iii.runtime.runners["work"]
        runner_holds.append(runner.running + len(runner._buffer) + len(runner._reserved))
        seen.append((payload[0], payload[1]))
        for _ in range(rng.randrange(4)):
            await anyio.lowlevel.checkpoint()

    async def produce(p: int) -> None:
        for n in range(50):
            await enqueue(iii, [p, n])
            for _ in range(rng.randrange(3)):
                await anyio.lowlevel.checkpoint()

    async with iii.running():
        await until_idle(iii)
        counts = count_claimed(iii)
        async with anyio.create_task_group() as tg:
            for p in range(4):
                tg.start_soon(produce, p)
        await drain(iii)
    assert sorted(seen) == [(p, n) for p in range(4) for n in range(50)]
    for p in range(4):
        assert [n for q, n in seen if q == p] == list(range(50))
    assert max(runner_holds) <= 4
    assert sum(counts) > 0 and 0 in counts  # both ways were taken


# Found in review (each failed before its fix).


async def test_a_claim_at_enqueue_waits_for_the_dispatchers_older_claim_on_its_way(
    tmp_path: Path,
) -> None:
    """A drained dispatcher's claim of an owed job is on its way when an enqueue claims
    its own job. Both land in one commit; the older job must reach the buffer first,
    though the dispatcher only resumes after the commit's deliveries."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen, gate = gated(iii)
    async with iii.running():
        runner = await one_running_one_prefetched_one_owed(iii, seen)
        counts = count_claimed(iii)
        runner.prefetch = 3  # room frees up
        runner.poke()
        await anyio.lowlevel.checkpoint()  # the dispatcher asks for the owed job
        assert runner._claiming == 1
        await enqueue(iii, "fourth")
        gate.set()
        await drain(iii)
    assert counts == [1]
    assert seen == ["first", "second", "third", "fourth"]


@pytest.mark.parametrize("later_turn", [False, True])
async def test_an_enqueue_claiming_ahead_after_the_dispatchers_claim_takes_the_next_owed_job(
    tmp_path: Path, later_turn: bool
) -> None:
    """The dispatcher's claim of an owed job is on its way; then one enqueue finds no room
    (its job is owed too) and the next claims its own and the owed one ahead of it. All
    three commit together (made in the same turn, or in the next by a task the loop lets
    run before committing). The store must run them in that order: the dispatcher's claim
    takes the older owed job, the enqueue's the newer."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen, gate = gated(iii)
    act = TriggerAction.Enqueue(queue="work")
    async with iii.running():
        runner = await one_running_one_prefetched_one_owed(iii, seen)

        async def two_enqueues() -> None:
            if later_turn:
                await anyio.lowlevel.checkpoint()  # ready when the claim is handed over
            assert runner._claiming == 1
            fourth = iii.runtime.submit_enqueue("job", ["fourth"], act, batch=False)
            assert runner._owed == 1  # no room: stored queued, owed
            runner.prefetch = 4
            fifth = iii.runtime.submit_enqueue("job", ["fifth"], act, batch=False)
            await fourth
            await fifth

        runner.prefetch = 2  # room for the owed job
        runner.poke()
        await anyio.lowlevel.checkpoint()  # the dispatcher asks for it
        async with anyio.create_task_group() as tg:
            if later_turn:
                tg.start_soon(two_enqueues)
            else:
                await two_enqueues()
        gate.set()
        await drain(iii)
    assert seen == ["first", "second", "third", "fourth", "fifth"]


async def test_a_batch_claimed_at_enqueue_runs_in_order_when_an_owed_job_was_a_duplicate(
    tmp_path: Path,
) -> None:
    """An enqueue whose idempotency key is taken stores nothing, but the runner counts its
    job as owed; the next enqueue that claims then asks for one job ahead of its own, and
    there is none. It must not take the queued tail of its own batch instead."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=2))
    seen, gate = gated(iii)
    act = TriggerAction.Enqueue(queue="work")
    async with iii.running():
        await until_idle(iii)
        rt = iii.runtime
        runner = rt.runners["work"]
        await rt.submit_enqueue("job", ["first"], act, batch=False, idempotency_keys=["k"])
        await until_running(seen)
        await until_idle(iii)
        assert runner._owed == 0
        duplicate = rt.submit_enqueue("job", ["dup"], act, batch=False, idempotency_keys=["k"])
        assert runner._owed == 1  # counted, though nothing will be stored
        both = rt.submit_enqueue("job", ["a", "b"], act, batch=True)  # "a" claimed, "b" not
        await duplicate
        await both
        gate.set()
        await drain(iii)
    assert seen == ["first", "a", "b"]


async def test_a_retry_decided_but_not_yet_written_runs_before_a_later_enqueue(
    tmp_path: Path,
) -> None:
    """A handler fails with ``RetryAfter(0)``: its job is available again at once, but the
    retry reaches the store only with the dispatcher's next exchange. An enqueue made
    before that must not be claimed ahead of it."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=1))
    seen: list[str] = []
    gate = anyio.Event()

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)
        if seen == ["flaky"]:
            await gate.wait()
            raise RetryAfter(0)

    async with iii.running():
        runner = iii.runtime.runners["work"]
        await until_idle(iii)
        await enqueue(iii, "flaky")
        with anyio.fail_after(10):
            while not (seen and runner.idle):
                await anyio.lowlevel.checkpoint()
        gate.set()
        with anyio.fail_after(10):
            while not runner._outcomes:  # the retry is decided, not yet written
                await anyio.lowlevel.checkpoint()
        counts = count_claimed(iii)
        await enqueue(iii, "later")
        await drain(iii)
    assert counts == [0]
    assert seen == ["flaky", "flaky", "later"]


async def test_a_later_enqueue_waits_for_a_claim_of_owed_jobs_on_its_way(
    tmp_path: Path,
) -> None:
    """An enqueue claims the owed job "third" ahead of its own; one made in the same turn
    must not claim its own, for if the first one's transaction fails (here a full disk:
    its payload does not fit), "third" stays queued, and the later job would overtake it."""
    iii, _ = small_disk_app(tmp_path, prefetch=1)
    seen, gate = gated(iii)
    act = TriggerAction.Enqueue(queue="work")
    async with iii.running():
        runner = await one_running_one_prefetched_one_owed(iii, seen)
        await until_idle(iii)
        assert runner._owed == 1
        runner.prefetch = 4  # room frees up
        rt = iii.runtime
        big = rt.submit_enqueue("job", ["x" * 1_000_000], act, batch=False)
        assert runner._owed == 0 and runner._claimed_at_enqueue == 2  # "third" and its own
        small = rt.submit_enqueue("job", ["y"], act, batch=False)
        with pytest.raises(StoreError, match="disk is full"):
            await big
        await small
        gate.set()
        await drain(iii)
    assert seen == ["first", "second", "third", "y"]


async def test_an_enqueue_from_a_thread_while_a_wake_is_pending_ends_the_drained_state(
    tmp_path: Path,
) -> None:
    queue = QueueConfig(name="work", concurrency=1, prefetch=0, poll_interval_ms=60_000)
    iii = file_app(tmp_path, queue)
    seen, _ = gated(iii)
    async with iii.running():
        await until_idle(iii)
        rt = iii.runtime
        runner = rt.runners["work"]
        action = TriggerAction.Enqueue(queue="work")
        runner.poke()  # as when a job just finished: a wake is pending
        # Another thread enqueues while that wake is still pending: the loop waits for
        # the thread here, so nothing runs in between.
        thread = threading.Thread(
            target=lambda: rt.enqueue_elsewhere("job", "thread", action, inline=False)[1].result()
        )
        thread.start()
        thread.join()
        await until_idle(iii)
        await enqueue(iii, "loop")
        await drain(iii)
    assert seen == ["thread", "loop"]


async def test_a_delayed_job_enqueued_while_the_queue_learns_its_due_time_is_kept(
    tmp_path: Path,
) -> None:
    """The store's read of the next due time ran before a delayed job enqueued meanwhile
    was stored: the queue keeps that job's time all the same."""
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=0, poll_interval_ms=60_000)
    iii = file_app(tmp_path, queue, clock)
    seen, _ = gated(iii)
    async with iii.running():
        store: Any = iii.runtime.store
        real = store.next_delayed_at
        armed: list[bool] = []

        async def learning(queue: str, after: float) -> Any:
            read = asyncio.ensure_future(real(queue, after))
            if armed:
                armed.clear()
                await anyio.lowlevel.checkpoint()  # the read is on its way to the store
                act = TriggerAction.Enqueue(queue="work", delay_ms=5_000)
                iii.runtime.submit_enqueue("job", ["delayed"], act, batch=False)
            return await read

        store.next_delayed_at = learning
        await until_idle(iii)
        await enqueue(iii, "early", delay_ms=5_000)
        await until_idle(iii)
        armed.append(True)
        clock.advance(6)  # 'early' is due: claimed; the queue drains and learns
        with anyio.fail_after(10):
            while armed or not seen:
                await anyio.lowlevel.checkpoint()
        await until_idle(iii)
        clock.advance(6)  # 'delayed' is due
        await enqueue(iii, "later")
        await drain(iii)
    assert seen == ["early", "delayed", "later"]


async def test_a_delayed_job_from_another_thread_is_learnt_when_the_queue_drains_again(
    tmp_path: Path,
) -> None:
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=0, poll_interval_ms=60_000)
    iii = file_app(tmp_path, queue, clock)
    seen, _ = gated(iii)
    async with iii.running():
        await until_idle(iii)
        rt = iii.runtime
        runner = rt.runners["work"]
        act = TriggerAction.Enqueue(queue="work", delay_ms=5_000)
        generation = runner._generation
        await anyio.to_thread.run_sync(
            lambda: rt.enqueue_elsewhere("job", "delayed", act, inline=False)[1].result()
        )
        with anyio.fail_after(10):  # its wake lands; the queue drains again
            while runner._generation == generation:
                await anyio.lowlevel.checkpoint()
        await until_idle(iii)
        assert runner._due_at == clock.now() + 5
        clock.advance(6)  # 'delayed' is due
        await enqueue(iii, "later")
        await drain(iii)
    assert seen == ["delayed", "later"]


async def test_an_enqueue_committed_with_a_topic_publish_does_not_overtake_it(
    tmp_path: Path,
) -> None:
    store = StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))
    iii = III(Config(store=store), clock=VirtualClock(), shutdown_grace_ms=0)
    seen: list[str] = []

    @iii.function("sub")
    async def sub(name: str) -> None:
        seen.append(name)

    iii.register_trigger(
        {
            "type": "durable:subscriber",
            "function_id": "sub",
            "config": {"topic": "t", "queue_config": {"concurrency": 1}},
        }
    )
    async with iii.running():
        [name] = iii.topics["t"]
        runner = iii.runtime.runners[name]
        runner.prefetch = 0
        with anyio.fail_after(10):
            while not runner.idle:
                await anyio.lowlevel.checkpoint()
        message = {"topic": "t", "data": "published"}
        async with anyio.create_task_group() as tg:
            tg.start_soon(iii.trigger_async, "iii::durable::publish", message)
            for _ in range(3):  # the publish is on its way to the store
                await anyio.lowlevel.checkpoint()
            act = TriggerAction.Enqueue(queue=name)
            tg.start_soon(lambda: iii.trigger_async("sub", "direct", action=act))
        await drain(iii)
    assert seen == ["published", "direct"]


async def test_a_slot_taken_back_past_the_room_does_not_inflate_the_owed_count(
    tmp_path: Path,
) -> None:
    """A handler waiting for a child lends its slot; when the child ends, the next job
    takes the slot and the parent takes it back: the room is below zero for a while.
    The count of jobs owed a claim must not grow from that."""
    iii = file_app(tmp_path, QueueConfig(name="work", concurrency=1, prefetch=0))
    seen: list[str] = []
    child_go = anyio.Event()
    c_go = anyio.Event()

    @iii.function("job")
    async def job(name: str) -> None:
        seen.append(name)
        if name == "parent":
            await iii.trigger_and_wait_async("job", "child", queue="work")
        elif name == "child":
            await child_go.wait()
        elif name == "c":
            await c_go.wait()

    async with iii.running():
        await until_idle(iii)
        runner = iii.runtime.runners["work"]
        owed_max = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(enqueue, iii, "parent")
            with anyio.fail_after(10):
                while "child" not in seen:
                    await anyio.lowlevel.checkpoint()
            await enqueue(iii, "c")  # no room: owed
            child_go.set()  # the child ends; 'c' takes the slot; the parent takes it back
            with anyio.fail_after(10):
                while "c" not in seen or runner.lent:
                    owed_max = max(owed_max, runner._owed)
                    await anyio.lowlevel.checkpoint()
            await enqueue(iii, "d")  # no room: owed
            for _ in range(50):
                owed_max = max(owed_max, runner._owed)
                await anyio.lowlevel.checkpoint()
            c_go.set()
        await drain(iii)
        assert runner._owed == 0
    assert owed_max <= 1
    assert sorted(seen) == ["c", "child", "d", "parent"]
