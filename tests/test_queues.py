"""Named queues (SPEC §4): concurrency, FIFO groups, retries and backoff, held jobs."""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    NonRetryableError,
    QueueConfig,
    RetryAfter,
    StoreConfig,
    TriggerAction,
)
from iii_embedded._stores import EnqueueClaim, Job, NewJob
from iii_embedded._stores._memory import MemoryStore
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import VirtualClock, dead_jobs, drain

pytestmark = pytest.mark.anyio


def app_with(*queues: QueueConfig, clock: VirtualClock | None = None, store: Any = None) -> III:
    return III(
        Config(queues={q.name: q for q in queues}),
        clock=clock or VirtualClock(),
        store=store,
        shutdown_grace_ms=0,
    )


async def enqueue(iii: III, fid: str, payload: Any, queue: str) -> str:
    receipt = await iii.trigger_async(fid, payload, action=TriggerAction.Enqueue(queue=queue))
    return str(receipt["messageReceiptId"])


async def test_standard_queue_runs_at_most_concurrency_jobs_at_once() -> None:
    iii = app_with(QueueConfig(name="work", concurrency=3))
    running = 0
    peak = 0
    three_running = anyio.Event()
    release = anyio.Event()

    @iii.function("job")
    async def job(_: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            three_running.set()
        await release.wait()
        running -= 1

    async with iii.running():
        for i in range(10):
            await enqueue(iii, "job", i, "work")
        await three_running.wait()
        stats = await iii.queue_stats_async("work")
        assert (stats.running, stats.ready) == (3, 7)
        release.set()
        await drain(iii)
    assert peak == 3


async def test_a_local_enqueue_wakes_an_idle_worker_without_any_clock_advance() -> None:
    clock = VirtualClock()
    iii = app_with(QueueConfig(name="work", poll_interval_ms=60_000), clock=clock)
    ran = anyio.Event()
    iii.register_function("job", lambda _: ran.set())
    async with iii.running():
        await anyio.wait_all_tasks_blocked() if hasattr(anyio, "wait_all_tasks_blocked") else None
        start = clock.now()
        await enqueue(iii, "job", {}, "work")
        with anyio.fail_after(5):
            await ran.wait()
        assert clock.now() == start


async def _trace_one_enqueue(
    tmp_path: Path, queue: QueueConfig, payload: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Enqueue one job into an idle queue on the file store and return the store calls
    made from the enqueue to its return, and the kinds of SQL statements run until the
    job's handler has run."""
    store = SQLiteStore(tmp_path / "store")
    calls: list[str] = []
    real_enqueue, real_claimed, real_exchange = (
        store.enqueue,
        store.enqueue_claimed,
        store.exchange,
    )

    async def enqueue_traced(jobs: Sequence[NewJob]) -> list[str]:
        calls.append("enqueue starts")
        ids = await real_enqueue(jobs)
        calls.append("enqueue returns")
        return ids

    async def claimed_traced(jobs: Sequence[NewJob], claim: EnqueueClaim) -> list[str]:
        calls.append(f"enqueue claiming {claim.count} starts")
        ids = await real_claimed(jobs, claim)
        calls.append("enqueue returns")
        return ids

    async def exchange_traced(*args: Any, **kwargs: Any) -> list[Job]:
        calls.append("claim")
        return await real_exchange(*args, **kwargs)

    store.enqueue = enqueue_traced  # type: ignore[method-assign]
    store.enqueue_claimed = claimed_traced  # type: ignore[method-assign]
    store.exchange = exchange_traced  # type: ignore[method-assign]
    iii = app_with(queue, store=store)
    ran = threading.Event()  # set by the sync handler, in its thread
    iii.register_function("job", lambda _: ran.set())
    statements: list[str] = []

    def trace(conn: Any, callback: Any) -> None:
        # On the writer thread: from the loop, this could deadlock with a statement in
        # progress (the loop would hold the GIL and wait for the connection's mutex while
        # the writer, holding the mutex, waits for the GIL to call the callback).
        conn.set_trace_callback(callback)

    async with iii.running():
        runner = iii.runtime.runners[queue.name]
        with anyio.fail_after(5):
            while not runner.idle:  # the start-up claim has found nothing
                await anyio.lowlevel.checkpoint()
        calls.clear()
        assert store._conn is not None
        await store._submit(lambda conn: trace(conn, statements.append), write=False)
        statements.clear()  # the COMMIT of the request that set the callback
        await enqueue(iii, "job", payload, queue.name)
        traced = calls[:]
        assert await anyio.to_thread.run_sync(ran.wait, 5)
        await store._submit(lambda conn: trace(conn, None), write=False)
    kinds = [
        "begin"
        if s.startswith("BEGIN")
        else "commit"
        if s.startswith("COMMIT")
        else "insert claimed"
        if s.startswith("INSERT INTO jobs") and "'running'" in s
        else "insert"
        if s.startswith("INSERT INTO jobs")
        else "claim"
        if s.startswith("UPDATE jobs SET state = 'running'")
        else None
        for s in statements
    ]
    return traced, [k for k in kinds if k is not None]


async def test_an_idle_queue_has_its_job_stored_claimed_by_the_enqueue(tmp_path: Path) -> None:
    """A standard queue whose last claim found nothing: the enqueue stores the job
    already claimed, in one transaction with no claim statement, and the dispatcher
    makes no call before the job runs (docs/design.md, "Claims at enqueue")."""
    calls, kinds = await _trace_one_enqueue(
        tmp_path, QueueConfig(name="work", poll_interval_ms=60_000), {}
    )
    assert calls == ["enqueue claiming 1 starts", "enqueue returns"]
    assert kinds[:3] == ["begin", "insert claimed", "commit"]
    assert "claim" not in kinds[:4]


async def test_an_idle_fifo_queue_claims_in_the_enqueues_own_transaction(tmp_path: Path) -> None:
    """FIFO queues claim by group heads, so their jobs are stored queued. The dispatcher
    is woken before the enqueue's commit, not after it, and the file store hands the
    writer every request of one loop turn together: the claim joins the enqueue's
    transaction, so an idle queue starts a job one commit after it was sent."""
    queue = QueueConfig(name="work", type="fifo", message_group_field="k", poll_interval_ms=60_000)
    calls, kinds = await _trace_one_enqueue(tmp_path, queue, {"k": 1})
    assert calls[:3] == ["enqueue starts", "claim", "enqueue returns"]
    assert kinds[:4] == ["begin", "insert", "claim", "commit"]


async def test_fifo_runs_one_job_per_group_in_enqueue_order_and_groups_in_parallel() -> None:
    iii = app_with(
        QueueConfig(name="ledger", type="fifo", message_group_field="account", concurrency=4)
    )
    order: dict[str, list[int]] = defaultdict(list)
    active: dict[str, int] = defaultdict(int)
    overlap: list[str] = []
    groups_at_once = 0
    current = 0

    @iii.function("apply")
    async def apply(txn: dict[str, Any]) -> None:
        nonlocal groups_at_once, current
        account = txn["account"]
        active[account] += 1
        current += 1
        groups_at_once = max(groups_at_once, current)
        if active[account] > 1:
            overlap.append(account)
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        order[account].append(txn["n"])
        active[account] -= 1
        current -= 1

    async with iii.running():
        for n in range(20):
            for account in ("A", "B", "C"):
                await enqueue(iii, "apply", {"account": account, "n": n}, "ledger")
        await drain(iii)
    assert overlap == []
    assert {a: order[a] for a in "ABC"} == {a: list(range(20)) for a in "ABC"}
    assert groups_at_once == 3


async def test_equal_json_numbers_are_one_fifo_group(store_config: StoreConfig) -> None:
    """``1`` and ``1.0`` are the same account (JSON has one number type, and a Node
    producer cannot tell them apart), so a job for ``1.0`` waits behind a failing ``1``
    (docs/design.md). Until 2026-12-03 their group keys were ``1`` and ``1.0``: the job
    overtook the head of its group. ``"1"`` and ``true`` are other groups."""
    clock = VirtualClock()
    iii = III(
        Config(
            queues={
                "f": QueueConfig(
                    name="f", type="fifo", message_group_field="g", max_retries=2, concurrency=4
                )
            },
            store=store_config,
        ),
        clock=clock,
        shutdown_grace_ms=0,
    )
    ran: list[tuple[float, str]] = []
    t0 = clock.now()

    @iii.function("h")
    async def h(data: dict[str, Any]) -> None:
        ran.append((clock.now() - t0, data["n"]))
        if data["n"] == "head":
            raise RuntimeError("fails until its DLQ")

    async with iii.running():
        for group, name in [(1, "head"), (1.0, "float"), ("1", "text"), (True, "bool")]:
            await enqueue(iii, "h", {"g": group, "n": name}, "f")
        await drain(iii)
    assert sorted(ran) == [
        (0.0, "bool"),
        (0.0, "head"),
        (0.0, "text"),
        (1.0, "float"),
        (1.0, "head"),
    ]


async def test_a_failing_fifo_job_blocks_its_group_through_its_backoff() -> None:
    clock = VirtualClock()
    iii = app_with(
        QueueConfig(
            name="ledger",
            type="fifo",
            message_group_field="account",
            backoff_ms=500,
            max_retries=15,
        ),
        clock=clock,
    )
    balance = 0
    applied: list[tuple[str, float]] = []
    t0 = clock.now()

    @iii.function("ledger::apply")
    def apply(txn: dict[str, Any]) -> None:
        nonlocal balance
        if txn["type"] == "withdraw":
            if balance < txn["amount"]:
                raise ValueError("Insufficient funds")
            balance -= txn["amount"]
        else:
            balance += txn["amount"]
        applied.append((txn["type"], clock.now() - t0))

    @iii.function("ledger::other")
    def other(txn: dict[str, Any]) -> None:
        applied.append(("other-group", clock.now() - t0))

    async with iii.running():
        # The withdrawal is first in its group; the deposit that funds it comes later
        # from another source, so the withdrawal fails and retries in place.
        await enqueue(
            iii, "ledger::apply", {"account": "A", "type": "withdraw", "amount": 5}, "ledger"
        )
        await enqueue(iii, "ledger::apply", {"account": "A", "type": "note", "amount": 0}, "ledger")
        await enqueue(iii, "ledger::other", {"account": "B"}, "ledger")
        await drain(iii, max_advance_s=1.0)  # attempts at 0 s and 0.5 s fail
        assert [a[0] for a in applied] == ["other-group"]
        balance = 10  # the deposit arrives
        await drain(iii)
    # Retry 2 waits 1 s after the failure at 0.5 s; the note of group A only runs after it.
    assert applied == [("other-group", 0.0), ("withdraw", 1.5), ("note", 1.5)]


@pytest.mark.parametrize(("max_retries", "calls"), [(3, 3), (1, 1), (0, 1), (5, 5)])
async def test_max_retries_counts_total_attempts(max_retries: int, calls: int) -> None:
    iii = app_with(QueueConfig(name="q", max_retries=max_retries, backoff_ms=10))
    attempts: list[int] = []

    @iii.function("fail")
    async def fail(_: Any) -> None:
        attempts.append(1)
        raise RuntimeError("always")

    async with iii.running():
        await enqueue(iii, "fail", {}, "q")
        await drain(iii)
        dead = await dead_jobs(iii, "q")
    assert len(attempts) == calls
    assert [d.attempts for d in dead] == [calls]


async def test_fails_five_times_with_16s_backoff_then_dead_letters_on_virtual_time() -> None:
    clock = VirtualClock()
    iii = app_with(QueueConfig(name="payments", max_retries=5, backoff_ms=16_000), clock=clock)
    starts: list[float] = []

    @iii.function("charge")
    async def charge(_: Any) -> None:
        starts.append(clock.now())
        raise ConnectionError("card processor down")

    async with iii.running():
        t0 = clock.now()
        receipt = await enqueue(iii, "charge", {"order": 7}, "payments")
        await drain(iii)
        dead = await dead_jobs(iii, "payments")
    assert [s - t0 for s in starts] == [0, 16, 48, 112, 240]
    assert len(dead) == 1
    entry = dead[0]
    assert (entry.id, entry.attempts, entry.payload) == (receipt, 5, {"order": 7})
    assert entry.error is not None
    assert (entry.error.type, entry.error.message) == ("ConnectionError", "card processor down")
    assert "raise ConnectionError" in entry.error.traceback
    # The traceback starts at the user's handler, not inside the runtime.
    assert "iii_embedded" not in entry.error.traceback
    assert (entry.first_failed_at, entry.last_failed_at) == (t0, t0 + 240)


async def test_max_backoff_caps_the_delay() -> None:
    clock = VirtualClock()
    iii = app_with(
        QueueConfig(name="q", max_retries=6, backoff_ms=1000, max_backoff_ms=3000), clock=clock
    )
    starts: list[float] = []

    @iii.function("fail")
    async def fail(_: Any) -> None:
        starts.append(clock.now())
        raise RuntimeError("x")

    async with iii.running():
        await enqueue(iii, "fail", {}, "q")
        await drain(iii)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == [1, 2, 3, 3, 3]


async def test_jitter_spreads_each_delay_between_half_and_full() -> None:
    clock = VirtualClock()
    iii = app_with(QueueConfig(name="q", max_retries=8, backoff_ms=1000, jitter=True), clock=clock)
    starts: list[float] = []

    @iii.function("fail")
    async def fail(_: Any) -> None:
        starts.append(clock.now())
        raise RuntimeError("x")

    async with iii.running():
        await enqueue(iii, "fail", {}, "q")
        await drain(iii)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    for n, gap in enumerate(gaps, start=1):
        full = 2 ** (n - 1)
        assert full / 2 <= gap <= full


async def test_non_retryable_error_goes_straight_to_the_dlq() -> None:
    iii = app_with(QueueConfig(name="q", max_retries=10))
    calls = 0

    @iii.function("reject")
    async def reject(_: Any) -> None:
        nonlocal calls
        calls += 1
        raise NonRetryableError("card permanently declined")

    async with iii.running():
        await enqueue(iii, "reject", {}, "q")
        await drain(iii)
        dead = await dead_jobs(iii, "q")
    assert calls == 1
    assert [(d.attempts, d.error and d.error.type) for d in dead] == [(1, "NonRetryableError")]


async def test_retry_after_overrides_one_delay() -> None:
    clock = VirtualClock()
    iii = app_with(QueueConfig(name="q", max_retries=3, backoff_ms=1000), clock=clock)
    starts: list[float] = []

    @iii.function("rate_limited")
    async def rate_limited(_: Any) -> str:
        starts.append(clock.now())
        if len(starts) == 1:
            raise RetryAfter(42_000)
        if len(starts) == 2:
            raise RuntimeError("plain failure")
        return "ok"

    async with iii.running():
        await enqueue(iii, "rate_limited", {}, "q")
        await drain(iii)
    assert [b - a for a, b in itertools.pairwise(starts)] == [42, 2]


async def test_per_attempt_timeout_counts_as_a_failed_attempt() -> None:
    clock = VirtualClock()
    iii = app_with(
        QueueConfig(name="q", max_retries=2, backoff_ms=100, timeout_ms=1000), clock=clock
    )
    started = [anyio.Event(), anyio.Event()]
    cancelled = [anyio.Event(), anyio.Event()]
    attempt = 0

    @iii.function("hang")
    async def hang(_: Any) -> None:
        nonlocal attempt
        index = attempt
        attempt += 1
        started[index].set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled[index].set()

    async with iii.running():
        await enqueue(iii, "hang", {}, "q")
        with anyio.fail_after(5):
            await started[0].wait()
            clock.advance(0.999)
            await anyio.lowlevel.checkpoint()
            assert not cancelled[0].is_set()
            clock.advance(0.001)  # the attempt's 1 s timeout
            await cancelled[0].wait()
            while iii.runtime.runners["q"].inflight:  # the failure is being recorded
                await anyio.lowlevel.checkpoint()
            clock.advance(0.1)  # the retry's backoff
            await started[1].wait()
            clock.advance(1.0)
            await cancelled[1].wait()
            await drain(iii)
        dead = await dead_jobs(iii, "q")
    assert attempt == 2
    assert dead[0].error is not None and dead[0].error.type == "TimeoutError"
    assert dead[0].attempts == 2


async def test_jobs_of_an_unregistered_function_are_held_not_attempted() -> None:
    store = MemoryStore()
    clock = VirtualClock()
    iii = app_with(QueueConfig(name="q"), clock=clock, store=store)
    ran: list[Any] = []
    # A job stored by an older version of the app, for a function this one lacks.
    await store.enqueue(
        [
            NewJob(
                id="old-1",
                queue="q",
                function_id="legacy::fn",
                payload=json.dumps({"v": 1}),
                created_at=clock.now(),
                available_at=clock.now(),
                max_attempts=3,
            )
        ]
    )
    async with iii.running():
        await drain(iii)
        stats = await iii.queue_stats_async("q")
        assert (stats.held, stats.ready, stats.failed) == (1, 0, 0)
        job = await store.get("old-1")
        assert job is not None and (job.state, job.attempts) == ("held", 0)
        # Registering the function releases the held job.
        iii.register_function("legacy::fn", ran.append)
        await anyio.lowlevel.checkpoint()
        await drain(iii)
    assert ran == [{"v": 1}]


async def test_held_jobs_are_logged_once_per_function(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    clock = VirtualClock()
    iii = app_with(QueueConfig(name="q"), clock=clock, store=store)
    await store.enqueue(
        [
            NewJob(
                id=f"old-{i}",
                queue="q",
                function_id="legacy::fn",
                payload="{}",
                created_at=clock.now(),
                available_at=clock.now(),
                max_attempts=3,
            )
            for i in range(3)
        ]
    )
    caplog.set_level(logging.WARNING, logger="iii_embedded")
    async with iii.running():
        await drain(iii)
    held_logs = [r for r in caplog.records if "not registered" in r.getMessage()]
    assert len(held_logs) == 1
