"""How the file store groups requests into transactions: every request made during one
turn of the event loop, and those of the tasks that turn woke, reach the writer thread
together, so an enqueue and the claim it wakes commit once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import anyio
import pytest

from iii_embedded._errors import StoreError
from iii_embedded._stores import Job
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
            store._conn.set_trace_callback(statements.append)  # runs on the writer thread
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


# --- enqueue_claim in a batch -------------------------------------------------------------


async def test_concurrent_enqueues_and_enqueue_claims_share_one_insert_in_call_order(
    tmp_path: Path,
) -> None:
    """Requests of one loop turn run in one transaction, their jobs in as few inserts as
    possible, with the result of running them one after another: an ``enqueue_claim``
    made after a plain enqueue of the same queue claims that older job, not its own."""
    store = SQLiteStore(tmp_path)
    await store.open()
    statements: list[str] = []
    got: list[list[str]] = []

    def on_claimed(jobs: list[Job], left: bool) -> None:
        got.append([j.id for j in jobs])

    async def enqueue_claim(job_id: str) -> list[str]:
        return await store.enqueue_claim(
            [new_job(job_id)],
            limit=1,
            now=T0,
            owner=OWNER,
            lease_until=T0 + 30,
            on_claimed=on_claimed,
        )

    try:
        assert store._conn is not None
        store._conn.set_trace_callback(statements.append)  # the writer is idle
        # Round 1: nothing queued before it, so "fresh" is stored claimed.
        assert await enqueue_claim("fresh") == ["fresh"]
        # Round 2: "old" is enqueued first in the same turn, so "new" claims it instead.
        assert await asyncio.gather(store.enqueue([new_job("old")]), enqueue_claim("new")) == [
            ["old"],
            ["new"],
        ]
        store._conn.set_trace_callback(None)
        states = {j.id: (j.state, j.attempts) for j in await store.list_jobs("q")}
    finally:
        await store.aclose()
    assert got == [["fresh"], ["old"]]
    assert states == {
        "fresh": ("running", 1),
        "old": ("running", 1),
        "new": ("queued", 0),
    }
    assert transactions(statements) == [["insert"], ["insert", "claim"]]


async def test_a_cancelled_enqueue_claim_still_hands_over_its_claimed_jobs(
    tmp_path: Path,
) -> None:
    """The caller may be cancelled while its transaction runs. The jobs it claimed are
    running under this process's lease all the same, so they must reach ``on_claimed``:
    otherwise they would sit unseen until the lease expired, and lose an attempt."""
    store = SQLiteStore(tmp_path)
    await store.open()
    got: list[list[str]] = []
    try:
        with anyio.fail_after(10):
            pending = asyncio.ensure_future(
                store.enqueue_claim(
                    [new_job("a")],
                    limit=1,
                    now=T0,
                    owner=OWNER,
                    lease_until=T0 + 30,
                    on_claimed=lambda jobs, _: got.append([j.id for j in jobs]),
                )
            )
            await anyio.lowlevel.checkpoint()  # its first step ran: the request is made
            pending.cancel()
            # Calls take effect in order: once this one is answered, so was the first.
            await store.get("a")
            assert pending.cancelled()
            job = await store.get("a")
    finally:
        await store.aclose()
    assert got == [["a"]]
    assert job is not None and (job.state, job.lease_owner) == ("running", OWNER)


async def test_enqueue_claim_reports_each_jobs_seq_past_the_largest_rowid(
    tmp_path: Path,
) -> None:
    """Jobs stored claimed are not read back: their ``seq`` comes from the insert's last
    rowid, as SQLite numbers a statement's rows one after another. Past the largest 64-bit
    rowid it picks them at random instead; the store then reads them back."""
    store = SQLiteStore(tmp_path)
    await store.open()
    got: list[Job] = []
    try:
        assert store._conn is not None
        await store._submit(
            lambda conn: conn.execute(
                "INSERT INTO jobs (seq, id, queue, function_id, payload, state, created_at, "
                "available_at, max_attempts) VALUES (?, 'last', 'other', 'fn', '{}', "
                "'completed', 0, 0, 1)",
                (2**63 - 1,),
            )
        )
        await store.enqueue_claim(
            [new_job(f"j{i}") for i in range(5)],
            limit=5,
            now=T0,
            owner=OWNER,
            lease_until=T0 + 30,
            on_claimed=lambda jobs, _: got.extend(jobs),
        )
        stored = {j.id: j.seq for j in await store.list_jobs("q")}
    finally:
        await store.aclose()
    assert [j.id for j in got] == [f"j{i}" for i in range(5)]
    assert [j.seq for j in got] == [stored[j.id] for j in got]
    assert len(set(stored.values())) == 5


async def test_requests_of_a_batch_run_in_the_order_they_were_made(tmp_path: Path) -> None:
    """Concurrent enqueues share one insert, run where the first of them stands: a claim
    made before them in the same turn runs before it. So a dispatcher that claims the
    older job leaves the enqueue nothing older to claim, and it claims its own."""
    store = SQLiteStore(tmp_path)
    await store.open()
    got: list[tuple[list[str], bool]] = []
    try:
        await store.enqueue([new_job("older")])

        async def enqueue_claim(job_id: str) -> list[str]:
            return await store.enqueue_claim(
                [new_job(job_id)],
                limit=1,
                now=T0,
                owner=OWNER,
                lease_until=T0 + 30,
                on_claimed=lambda jobs, left: got.append(([j.id for j in jobs], left)),
            )

        claimed, *_ = await asyncio.gather(
            store.claim("q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30),
            enqueue_claim("a"),
            enqueue_claim("b"),
        )
        states = {j.id: j.state for j in await store.list_jobs("q")}
    finally:
        await store.aclose()
    assert [j.id for j in claimed] == ["older"]
    assert got == [(["a"], False), (["b"], False)]
    assert states == {"older": "running", "a": "running", "b": "running"}


async def test_a_bad_enqueue_fails_alone_and_an_enqueue_claim_beside_it_still_claims(
    tmp_path: Path,
) -> None:
    """When the merged insert fails, the batch runs again one request at a time, in
    order: only the bad enqueue fails, and the claiming one still hands over its job."""
    store = SQLiteStore(tmp_path)
    await store.open()
    got: list[list[str]] = []
    try:
        await store.enqueue([new_job("taken")])
        # In this order: the claim's request is made when its coroutine starts, the
        # enqueues' when they are called.
        claimed = asyncio.ensure_future(
            store.claim("q", fifo=False, limit=1, now=T0, owner=OWNER, lease_until=T0 + 30)
        )
        await anyio.lowlevel.checkpoint()
        results = await asyncio.gather(
            claimed,
            store.enqueue_claim(
                [new_job("a")],
                limit=1,
                now=T0,
                owner=OWNER,
                lease_until=T0 + 30,
                on_claimed=lambda jobs, _: got.append([j.id for j in jobs]),
            ),
            store.enqueue([new_job("taken")]),  # that id exists: this enqueue fails
            return_exceptions=True,
        )
        states = {j.id: j.state for j in await store.list_jobs("q")}
    finally:
        await store.aclose()
    first, second, third = results
    assert isinstance(first, list) and [j.id for j in first] == ["taken"]
    assert second == ["a"]
    assert isinstance(third, StoreError)
    assert got == [["a"]]
    assert states == {"taken": "running", "a": "running"}
