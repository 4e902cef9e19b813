"""``commit_on_loop``: when the event loop has nothing else to run, the file store commits a
small hot-path transaction on the loop's thread instead of waking its writer thread. It
must never wait for another process's write lock there, never carry unbounded work, never
overtake a transaction it handed to the writer, and stop while transactions are slow."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import anyio
import attrs
import pytest

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
from iii_embedded._errors import StoreError
from iii_embedded._stores import _sqlite
from iii_embedded._stores._base import completed_outcome
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore

from .helpers import T0, jobs_in_database_file, new_job

pytestmark = pytest.mark.anyio

OWNER = "host:1:abc"


def committing_threads(store: SQLiteStore) -> list[str]:
    """Record the name of the thread that runs each ``COMMIT`` on the store's connection."""
    names: list[str] = []
    assert store._conn is not None

    def trace(sql: str) -> None:
        if sql == "COMMIT":
            names.append(threading.current_thread().name)

    store._conn.set_trace_callback(trace)
    return names


def rows_seen_elsewhere(store: SQLiteStore) -> int:
    """Jobs another connection (another process would) sees committed."""
    with closing(sqlite3.connect(store.path)) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
    return int(count)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (it is set by the writer thread)."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.001)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "store", synchronous="full")
    await store.open()
    yield store
    await store.aclose()


async def test_an_idle_loop_commits_the_enqueue_itself_and_it_is_durable(
    store: SQLiteStore,
) -> None:
    threads = committing_threads(store)
    assert await store.enqueue([new_job("a"), new_job("b")]) == ["a", "b"]
    assert threads == [threading.current_thread().name]
    assert store.loop_commits == 1
    assert rows_seen_elsewhere(store) == 2
    # A claim and its outcomes take the same path.
    jobs = await store.claim("q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30)
    assert [j.id for j in jobs] == ["a", "b"]
    assert store.loop_commits == 2
    assert threads == [threading.current_thread().name] * 2


async def test_with_commit_on_loop_off_the_writer_commits_everything(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store", commit_on_loop=False)
    await store.open()
    try:
        threads = committing_threads(store)
        assert await store.enqueue([new_job("a")]) == ["a"]
        await store.claim("q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30)
        assert len(threads) == 2
    finally:
        await store.aclose()
    assert store.loop_commits == 0
    assert len(threads) == 3  # and the close's, which forgets the owner (holding a job: not)
    assert all(name.startswith("iii-sqlite[") for name in threads)


async def test_another_process_holding_the_write_lock_never_blocks_the_loop(
    store: SQLiteStore,
) -> None:
    held = threading.Event()
    loop_ran = threading.Event()
    loop_ran_in_time: list[bool] = []

    def other_process() -> None:
        with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # as another process's writer would
            held.set()
            # Released once the loop shows it still runs, or after 5 s if it does not
            # (a loop waiting in SQLite's busy handler would wait for 10 s).
            loop_ran_in_time.append(loop_ran.wait(5))
            other.execute("COMMIT")

    begins: list[str] = []  # the threads that began a write transaction, in order
    writer_began = threading.Event()
    assert store._conn is not None

    def trace(sql: str) -> None:
        if sql == "BEGIN IMMEDIATE":
            begins.append(threading.current_thread().name)
            if begins[-1].startswith("iii-sqlite["):
                writer_began.set()

    store._conn.set_trace_callback(trace)
    thread = threading.Thread(target=other_process)
    thread.start()
    try:
        await anyio.to_thread.run_sync(held.wait)
        pending = asyncio.ensure_future(store.enqueue([new_job("a")]))
        # The loop tried, found the lock taken at once, and handed the request to the
        # writer thread, which waits for the lock: the loop runs on. (Waited for in a
        # thread: a timer on the loop would make it leave the commit to the writer.)
        assert await anyio.to_thread.run_sync(writer_began.wait, 10)
        assert not pending.done()
        loop_ran.set()
        with anyio.fail_after(10):
            assert await pending == ["a"]
    finally:
        loop_ran.set()
        await anyio.to_thread.run_sync(thread.join)
    store._conn.set_trace_callback(None)
    assert loop_ran_in_time == [True]
    assert [name.startswith("iii-sqlite[") for name in begins] == [False, True]
    assert store.loop_commits == 0
    # The writer had it back: the loop commits again.
    assert await store.enqueue([new_job("b")]) == ["b"]
    assert store.loop_commits == 1


async def enqueue_while_another_process_writes(store: SQLiteStore, job_id: str) -> bool:
    """Enqueue ``job_id`` while another connection (as another process's writer would)
    holds the write lock, which it gives up once the store's writer thread begins a
    transaction, or after 5 s. Whether the writer thread began one in that time."""
    begun = threading.Event()
    assert store._conn is not None

    def trace(sql: str) -> None:
        if sql == "BEGIN IMMEDIATE" and threading.current_thread().name.startswith("iii-sqlite["):
            begun.set()

    store._conn.set_trace_callback(trace)
    held = threading.Event()
    begun_in_time: list[bool] = []

    def other_process() -> None:
        with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            held.set()
            begun_in_time.append(begun.wait(5))
            other.execute("COMMIT")

    thread = threading.Thread(target=other_process)
    thread.start()
    try:
        await anyio.to_thread.run_sync(held.wait)
        with anyio.fail_after(10):
            assert await store.enqueue([new_job(job_id)]) == [job_id]
    finally:
        begun.set()
        await anyio.to_thread.run_sync(thread.join)
        store._conn.set_trace_callback(None)
    return begun_in_time == [True]


async def test_after_commits_on_the_loop_the_writer_still_waits_for_another_process(
    store: SQLiteStore,
) -> None:
    """The loop's transactions leave the connection's busy timeout at 0 (they must never
    wait); the writer's next transaction sets SQLite's wait back, so a write lock another
    process holds for a moment delays it instead of failing it."""
    assert await store.enqueue([new_job("a")]) == ["a"]
    assert store.loop_commits == 1
    store.commit_on_loop = False  # what follows goes to the writer thread
    assert await enqueue_while_another_process_writes(store, "b")
    assert store.loop_commits == 1
    assert store._conn is not None
    with store._conn_lock:
        assert store._conn.execute("PRAGMA busy_timeout").fetchone() == (10_000,)
    assert rows_seen_elsewhere(store) == 2


async def test_a_store_opened_again_still_never_blocks_the_loop(store: SQLiteStore) -> None:
    """A store closed after the loop's commits (its busy timeout at 0) and opened again
    (an ``III`` given the store, in its next lifecycle) has a new connection, which waits
    SQLite's 10 s: the loop sets 0 again before it commits there. Until 2026-12-03 the
    store still believed 0 was set, and the loop's next commit waited in SQLite's busy
    handler for as long as another process held the write lock."""
    assert await store.enqueue([new_job("a")]) == ["a"]
    assert store.loop_commits == 1
    await store.aclose()
    await store.open()
    # The loop found the lock taken at once and handed the enqueue to the writer thread,
    # which began its transaction (the other process then gave the lock up). A loop
    # waiting in SQLite's busy handler never hands it over: the lock is given up after
    # 5 s, and the loop commits itself.
    assert await enqueue_while_another_process_writes(store, "b")
    assert store.loop_commits == 1
    assert rows_seen_elsewhere(store) == 2


async def test_a_commit_on_the_loop_never_overtakes_one_handed_to_the_writer(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrived: list[_sqlite._Results] = []
    monkeypatch.setattr(store, "_back_from_writer", arrived.append)  # held back for now
    store.commit_on_loop = False
    first = asyncio.ensure_future(store.enqueue([new_job("a")]))
    await until(lambda: len(arrived) == 1)  # committed; its result not yet back
    store.commit_on_loop = True
    second = asyncio.ensure_future(store.enqueue([new_job("b")]))
    # The connection is free, but the writer still has a request of this loop's: the
    # second goes after it, through the writer, not around it on the loop.
    await until(lambda: len(arrived) == 2)
    assert store.loop_commits == 0
    assert not first.done() and not second.done()
    monkeypatch.undo()
    for results in arrived:
        store._back_from_writer(results)
    with anyio.fail_after(10):
        assert await first == ["a"]
        assert await second == ["b"]
    assert store._with_writer == 0
    # Nothing of this loop's is with the writer now, so the next goes on the loop. (As
    # if recent commits were fast and counted: a slow first commit of a new file must
    # not send it to the writer for the budget's sake, which is not what this tests.)
    store.commit_seconds = 0.0
    store._timed_commits = _sqlite._WARM_COMMITS
    assert await store.enqueue([new_job("c")]) == ["c"]
    assert store.loop_commits == 1


async def test_a_busy_loop_leaves_the_commit_to_the_writer(store: SQLiteStore) -> None:
    stop = False
    turns = 0

    async def busy() -> None:  # another task with work in every turn
        nonlocal turns
        while not stop:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(busy)
        await anyio.lowlevel.checkpoint()
        assert await store.enqueue([new_job("a")]) == ["a"]
        stop = True
    assert turns > 0
    assert store.loop_commits == 0
    assert rows_seen_elsewhere(store) == 1


async def test_a_loop_busy_for_a_turn_or_two_still_commits_and_gathers_what_it_asks_for(
    store: SQLiteStore,
) -> None:
    threads = committing_threads(store)
    receipts: list[list[str]] = []

    async def other() -> None:
        # Ready to run when the first enqueue is handed over, and again one turn later,
        # when it enqueues too.
        await anyio.lowlevel.checkpoint()
        receipts.append(await store.enqueue([new_job("b")]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        receipts.append(await store.enqueue([new_job("a")]))
    assert sorted(receipts) == [["a"], ["b"]]
    # One transaction, on the loop: the hand-over waited for the other task's two turns
    # instead of waking the writer, and the other task's enqueue joined it.
    assert threads == [threading.current_thread().name]
    assert store.loop_commits == 1
    assert rows_seen_elsewhere(store) == 2


async def test_a_timer_due_before_the_commit_would_end_leaves_it_to_the_writer(
    store: SQLiteStore,
) -> None:
    loop = asyncio.get_running_loop()
    # Commits have taken 1 ms lately (and enough were measured for the average to count);
    # a timer falls due in 1.5 ms, before twice that.
    store.commit_seconds = 0.001
    store._timed_commits = _sqlite._WARM_COMMITS
    soon = loop.call_later(0.0015, lambda: None)
    assert await store.enqueue([new_job("a")]) == ["a"]
    assert store.loop_commits == 0
    assert rows_seen_elsewhere(store) == 1
    soon.cancel()
    # A timer due well after the commit would end does not stop the loop committing.
    later = loop.call_later(60, lambda: None)
    store.commit_seconds = 0.001
    assert await store.enqueue([new_job("b")]) == ["b"]
    assert store.loop_commits == 1
    later.cancel()


async def test_a_fresh_store_is_cautious_about_timers_until_commits_are_measured(
    store: SQLiteStore,
) -> None:
    # No commit measured yet (the average is 0): the guard expects a commit to take the
    # whole budget, so a timer due within twice that keeps the first commit off the loop.
    assert store.commit_seconds == 0.0
    soon = asyncio.get_running_loop().call_later(_sqlite._LOOP_BUDGET_S, lambda: None)
    assert await store.enqueue([new_job("a")]) == ["a"]
    soon.cancel()
    assert store.loop_commits == 0
    assert rows_seen_elsewhere(store) == 1


async def test_a_loop_whose_timers_are_not_asyncios_leaves_commits_to_the_writer(
    tmp_path: Path,
) -> None:
    class OddLoop:
        def __init__(self) -> None:
            self._ready: list[object] = []
            self._scheduled: list[object] = [object()]  # no when(): not a TimerHandle

        def time(self) -> float:
            return 0.0

    odd = OddLoop()
    store = SQLiteStore(tmp_path / "store")
    store._loop = odd  # type: ignore[assignment]
    future = asyncio.get_running_loop().create_future()
    request = _sqlite._Request(lambda conn: None, future, True, weight=1)
    assert store._loop_may_commit([request]) is False  # rather than raise, losing requests
    odd._scheduled = []
    assert store._loop_may_commit([request]) is True  # no timers at all: the loop may


async def test_large_or_unusual_work_goes_to_the_writer(store: SQLiteStore) -> None:
    many = [new_job(f"j{i}") for i in range(_sqlite._LOOP_MAX_WEIGHT + 1)]
    assert len(await store.enqueue(many)) == len(many)
    assert store.loop_commits == 0
    # A request with no bounded weight (a lookup by id, a cancel, a DLQ operation...).
    job = await store.get("j0")
    assert job is not None and job.id == "j0"
    assert store.loop_commits == 0
    # The large commit may have been slow enough (an fsync of ~500 KB) to lift the average
    # over the budget, which alone would keep the next commits on the writer: forget it.
    store.commit_seconds = 0.0
    assert await store.enqueue([new_job("small")]) == ["small"]
    assert store.loop_commits == 1
    # One job, but a large payload: 3 MB is ~750 pages of work, not one job's worth.
    big = new_job("big")
    big = attrs.evolve(big, payload=json.dumps({"blob": "x" * 3_000_000}))
    assert await store.enqueue([big]) == ["big"]
    assert store.loop_commits == 1
    # The same for an outcome with a large output. (That commit was slow too: forget it.)
    store.commit_seconds = 0.0
    [job] = await store.claim("q", fifo=False, limit=1, now=T0, owner=OWNER, lease_until=T0 + 30)
    assert store.loop_commits == 2
    output = json.dumps("y" * 3_000_000)
    await store.finish([completed_outcome(job.id, OWNER, job.attempts, T0, output, job.seq)])
    assert store.loop_commits == 2
    done = await store.get(job.id)
    assert done is not None and done.state == "completed" and done.output == output


async def test_slow_transactions_send_commits_to_the_writer_until_they_are_fast_again(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite, "_LOOP_BUDGET_S", 0.010)
    store.commit_seconds = 1.0  # as after a one-second stall of the disk
    assert await store.enqueue([new_job("a")]) == ["a"]
    assert store.loop_commits == 0
    assert store.commit_seconds < 1.0  # the writer's fast commit was averaged in
    # Each fast commit on the writer lowers the average; within a bounded number of them
    # (~35 at these figures) the loop takes over again.
    for i in range(200):
        await store.enqueue([new_job(f"b{i}")])
        if store.loop_commits:
            break
    assert store.loop_commits == 1
    assert store.commit_seconds <= 0.010
    assert 20 <= i <= 100


async def test_a_failing_request_is_retried_by_the_writer_alone(store: SQLiteStore) -> None:
    assert await store.enqueue([new_job("a")]) == ["a"]
    assert store.loop_commits == 1
    # One turn, two enqueues: one reuses a job id (the insert fails), one is fine. The
    # loop's transaction fails as a whole and rolls back; the writer runs each request on
    # its own, so only the bad one fails.
    bad = asyncio.ensure_future(store.enqueue([new_job("a")]))
    good = asyncio.ensure_future(store.enqueue([new_job("c")]))
    with anyio.fail_after(10):
        assert await good == ["c"]
        with pytest.raises(StoreError):
            await bad
    assert store.loop_commits == 1
    assert rows_seen_elsewhere(store) == 2


async def test_the_loop_never_checkpoints_the_writer_thread_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_sqlite._WAL_LIMIT, "full", 8 * 4096)  # long every few commits
    store = SQLiteStore(tmp_path / "store", synchronous="full")
    await store.open()
    where: list[str] = []
    real = SQLiteStore._own_checkpoint

    def own_checkpoint(self: SQLiteStore, conn: sqlite3.Connection) -> None:
        where.append(threading.current_thread().name)
        real(self, conn)

    monkeypatch.setattr(SQLiteStore, "_own_checkpoint", own_checkpoint)
    copies = iter(range(1_000_000))
    try:
        assert store._conn is not None
        (automatic,) = store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert automatic == 0  # SQLite's own would run inside a commit, perhaps on the loop
        for i in range(32):
            await store.enqueue([new_job(f"j{i}")])
        # An enqueue that finds the writer holding the connection for a checkpoint goes
        # to the writer instead; the others commit on the loop.
        assert store.loop_commits >= 1
        await until(
            lambda: jobs_in_database_file(store.directory, tmp_path / str(next(copies))) == 32
        )
    finally:
        await store.aclose()
    assert where  # checkpoints ran, every one on the writer's thread
    assert all(name.startswith("iii-sqlite[") for name in where)


async def test_the_wal_stops_growing_under_commits_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 64 * 4096
    monkeypatch.setitem(_sqlite._WAL_LIMIT, "full", limit)
    # Commits on the loop are what this is about: a disk slow enough (a loaded machine)
    # to lift the average commit over the budget would send some to the writer instead.
    monkeypatch.setattr(_sqlite, "_LOOP_BUDGET_S", 60.0)
    store = SQLiteStore(tmp_path / "store", synchronous="full")
    await store.open()
    wal = store.directory / f"{DB_FILENAME}-wal"
    biggest = 0
    try:
        for i in range(400):
            await store.enqueue([new_job(f"j{i}", pad=2000)])
            biggest = max(biggest, wal.stat().st_size)
    finally:
        await store.aclose()
    assert store.loop_commits >= 300
    assert store.own_checkpoints >= 2
    # ~2 MB of log without checkpoints; with them, the limit and the commits until the
    # next look at its length (every 16th) and while the checkpoint runs.
    assert biggest <= 3 * limit, biggest


async def test_an_interrupt_during_a_commit_on_the_loop_leaves_no_transaction_open(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyboardInterrupt reaches the main thread, which may be the loop's, in the middle
    of a transaction there: it is rolled back (the write lock is not kept) and the
    request is handed to the writer, so its caller still gets an answer."""
    calls = 0

    def insert(conn: sqlite3.Connection) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyboardInterrupt
        return SQLiteStore._enqueue(conn, [new_job("a")])

    future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    request = _sqlite._Request(insert, future, True, weight=1)
    handed: list[list[_sqlite._Request]] = []
    monkeypatch.setattr(store, "_to_writer", handed.append)  # held back, to look first
    with pytest.raises(KeyboardInterrupt):
        store._commit_here([request])
    assert handed == [[request]]
    assert store._conn is not None and not store._conn.in_transaction
    with closing(sqlite3.connect(store.path, isolation_level=None, timeout=0)) as other:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free
        other.execute("ROLLBACK")
    monkeypatch.undo()
    store._to_writer(handed[0])
    with anyio.fail_after(10):
        assert await future == ["a"]
    assert calls == 2
    assert store._with_writer == 0
    assert rows_seen_elsewhere(store) == 1


@pytest.mark.parametrize("commit_on_loop", [True, False])
async def test_the_engine_passes_the_setting_to_its_store(
    tmp_path: Path, commit_on_loop: bool
) -> None:
    iii = III(
        Config(
            queues={"work": QueueConfig(name="work")},
            store=StoreConfig(
                store_method="file_based",
                file_path=str(tmp_path / "store"),
                commit_on_loop=commit_on_loop,
            ),
        ),
        shutdown_grace_ms=0,
    )
    done = anyio.Event()

    @iii.function("job")
    async def job(n: int) -> None:
        done.set()

    async with iii.running():
        store = iii.runtime.store
        assert isinstance(store, SQLiteStore)
        await iii.trigger_async("job", 1, action=TriggerAction.Enqueue(queue="work"))
        with anyio.fail_after(10):
            await done.wait()
        assert store.commit_on_loop is commit_on_loop
        assert (store.loop_commits > 0) is commit_on_loop
