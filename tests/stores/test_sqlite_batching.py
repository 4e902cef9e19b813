"""How the file store groups requests into transactions: every request made during one
turn of the event loop, and those of the tasks that turn woke, reach the writer thread
together, so an enqueue and the claim it wakes commit once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded._stores import Job, Outcome, _sqlite
from iii_embedded._stores._sqlite import SQLiteStore

from .helpers import T0, new_job

pytestmark = pytest.mark.anyio

OWNER = "host:1:abc"


def transactions(statements: list[str]) -> list[list[str]]:
    """The traced statements as transactions of ``insert`` / ``claim`` steps."""
    out: list[list[str]] = []
    for sql in statements:
        if sql.startswith("BEGIN"):
            out.append([])
        elif sql.startswith("INSERT INTO jobs"):
            out[-1].append("insert")
        elif sql.startswith("UPDATE jobs SET state = 'running'"):
            out[-1].append("claim")
    return out


async def test_an_enqueue_and_the_claim_of_the_task_it_woke_share_a_transaction(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    statements: list[str] = []
    claimed: list[Job] = []
    woken = anyio.Event()

    async def dispatcher() -> None:
        await woken.wait()
        # Blocking work lets go of the GIL, as any blocking call does: the writer thread
        # could run now. It must find nothing to do yet.
        time.sleep(0.002)
        claimed.extend(
            await store.claim("q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30)
        )

    try:
        assert (
            await store.claim("q", fifo=False, limit=1, now=T0, owner=OWNER, lease_until=T0) == []
        )
        assert store._conn is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher)
            await anyio.wait_all_tasks_blocked()
            store._conn.set_trace_callback(statements.append)  # on whichever thread commits
            woken.set()  # as the runtime wakes a queue's dispatcher before it enqueues
            assert await store.enqueue([new_job("a")]) == ["a"]
        store._conn.set_trace_callback(None)
    finally:
        await store.aclose()
    assert [j.id for j in claimed] == ["a"]
    assert transactions(statements) == [["insert", "claim"]]


async def test_requests_still_pending_at_close_are_carried_out(tmp_path: Path) -> None:
    """A request made in the same turn as ``aclose`` is handed to the writer before it
    stops: the enqueue commits and its caller gets its receipt."""
    store = SQLiteStore(tmp_path)
    await store.open()
    with anyio.fail_after(10):
        pending = asyncio.ensure_future(store.enqueue([new_job("a")]))
        await anyio.lowlevel.checkpoint()  # its first step ran: the request is made
        assert not pending.done()
        await store.aclose()
        assert await pending == ["a"]
    reopened = SQLiteStore(tmp_path)
    await reopened.open()
    try:
        assert [j.id for j in await reopened.list_jobs()] == ["a"]
    finally:
        await reopened.aclose()


async def test_a_batch_run_request_by_request_keeps_the_order_its_requests_were_made(
    tmp_path: Path,
) -> None:
    # When one request of a batch fails, the batch runs again request by request, each
    # in a savepoint, consecutive enqueues still merged. The enqueues made after a claim
    # must not be merged ahead of it.
    store = SQLiteStore(tmp_path)
    await store.open()
    try:
        loop = asyncio.get_running_loop()
        assert store._conn is not None

        def request(fn: Any, jobs: list[Any] | None = None) -> _sqlite._Request:
            return _sqlite._Request(fn, loop.create_future(), True, jobs)

        def fails(conn: Any) -> None:
            raise sqlite3.IntegrityError("boom")

        a, b = [new_job("a")], [new_job("b")]
        batch = [
            request(
                lambda conn: [
                    j.id for j in store._claim(conn, "q", False, 5, T0, OWNER, T0 + 30, None)
                ]
            ),
            request(lambda conn: store._enqueue(conn, a), a),
            request(lambda conn: store._enqueue(conn, b), b),
            request(fails),
        ]
        with store._conn_lock:
            results = store._run_batch(store._conn, batch)
        assert [(ok, value) for _, ok, value, _ in results[:3]] == [
            (True, []),
            (True, ["a"]),
            (True, ["b"]),
        ]
        assert results[3][1] is False and "boom" in str(results[3][2])
    finally:
        await store.aclose()


async def test_prune_deletes_in_bounded_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune of many expired runs (a retention shortened, a burst a day ago) must not
    hold the write lock, nor grow the WAL, with one huge DELETE: it deletes a bounded
    batch per transaction, so other writes (this process's and others') get in between."""
    monkeypatch.setattr(_sqlite, "_PRUNE_BATCH", 10, raising=False)
    store = SQLiteStore(tmp_path)
    await store.open()
    statements: list[str] = []
    try:
        await store.enqueue([new_job(f"j{i}") for i in range(40)])
        claimed = await store.claim(
            "q", fifo=False, limit=40, now=T0, owner=OWNER, lease_until=T0 + 30
        )
        await store.finish(
            [
                Outcome(job_id=j.id, kind="completed", owner=OWNER, attempt=1, at=T0 + i % 2)
                for i, j in enumerate(claimed[:35])
            ]
        )
        assert store._conn is not None
        store._conn.set_trace_callback(statements.append)
        pruned = await store.prune(T0 + 2)
        store._conn.set_trace_callback(None)
        left = sorted(j.id for j in await store.list_jobs())
    finally:
        await store.aclose()
    assert pruned == 35
    assert left == sorted(f"j{i}" for i in range(35, 40))  # still running: kept
    deletes_per_transaction: list[int] = []
    for sql in statements:
        if sql.startswith("BEGIN"):
            deletes_per_transaction.append(0)
        elif sql.startswith("DELETE FROM jobs"):
            deletes_per_transaction[-1] += 1
    # 35 rows, 10 at a time: four transactions (the last one finds fewer than 10).
    assert deletes_per_transaction == [1, 1, 1, 1]
