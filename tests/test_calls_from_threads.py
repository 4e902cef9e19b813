"""Calls from outside the engine's event loop: the blocking ``trigger`` of a program whose
engine runs on a background thread, and ``trigger_async`` on another event loop.

On a file store an enqueue goes to the store directly (committed in the caller's thread
when it may block and the writer is idle, else by the writer), with no hop through the
engine's loop; the queue's dispatcher is woken once the jobs are committed. A call of a
sync handler goes to the runtime's threads directly; other calls, and Voids, are handed
to the loop (docs/design.md, "Calls from other threads and other event loops")."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    QueueConfig,
    StoreConfig,
    TriggerAction,
    current_invocation,
)
from iii_embedded._errors import StoreError
from iii_embedded._stores import NewJob
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore
from iii_embedded.testing import VirtualClock

# Polling would find the jobs only after this long: a job that runs within the test's
# timeout was found through the wake-up that follows its commit.
NO_POLLING_MS = 600_000
ENQUEUE = TriggerAction.Enqueue(queue="work")


class Seen:
    """Records the payloads a handler saw; ``wait_for(n)`` blocks until it saw ``n``."""

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self._changed = threading.Condition()

    def add(self, payload: Any) -> None:
        with self._changed:
            self.payloads.append(payload)
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[Any]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.payloads) >= count, timeout=20)
            return sorted(self.payloads)


def app_on(config: StoreConfig, **kw: Any) -> III:
    queue = QueueConfig(name="work", concurrency=4, poll_interval_ms=NO_POLLING_MS)
    return III(Config(queues={"work": queue}, store=config), shutdown_grace_ms=0, **kw)


@pytest.fixture(params=["file_based", "in_memory"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    if request.param == "in_memory":
        return StoreConfig()
    return StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))


@pytest.fixture
def started(store_config: StoreConfig) -> Iterator[tuple[III, Seen]]:
    seen = Seen()
    iii = app_on(store_config)

    @iii.function("job")
    async def job(payload: Any) -> None:
        seen.add(payload)

    with iii:
        yield iii, seen


def test_blocking_enqueues_from_many_threads_are_stored_and_run(
    started: tuple[III, Seen],
) -> None:
    iii, seen = started
    receipts: list[str] = []

    def produce(first: int) -> None:
        for n in range(first, first + 25):
            receipts.append(iii.trigger("job", n, action=ENQUEUE)["messageReceiptId"])

    threads = [threading.Thread(target=produce, args=(k * 25,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen.wait_for(200) == list(range(200))
    runs = [iii.runs.get(r) for r in receipts]
    assert sorted((r.status, r.attempts) for r in runs if r is not None) == [("completed", 1)] * 200


def test_trigger_async_on_another_event_loop_enqueues_and_the_job_runs(
    started: tuple[III, Seen],
) -> None:
    iii, seen = started

    async def elsewhere() -> list[str]:
        receipts = await asyncio.gather(
            *(iii.trigger_async("job", n, action=ENQUEUE) for n in range(50))
        )
        return [r["messageReceiptId"] for r in receipts]

    receipts = asyncio.run(elsewhere())
    assert seen.wait_for(50) == list(range(50))
    assert len(set(receipts)) == 50
    assert all((r := iii.runs.get(i)) is not None and r.status == "completed" for i in receipts)


def test_bad_enqueues_from_a_thread_fail_in_the_caller_and_store_nothing(
    started: tuple[III, Seen],
) -> None:
    iii, _ = started
    with pytest.raises(InvocationError) as unknown_queue:
        iii.trigger("job", 1, action=TriggerAction.Enqueue(queue="nope"))
    with pytest.raises(InvocationError) as unknown_function:
        iii.trigger("nobody", 1, action=ENQUEUE)
    with pytest.raises(InvocationError) as not_json:
        asyncio.run(iii.trigger_async("job", {1, 2}, action=ENQUEUE))
    assert [e.value.code for e in (unknown_queue, unknown_function, not_json)] == [
        "enqueue_error"
    ] * 3
    assert str(unknown_queue.value) == "enqueue_error: Queue 'nope' not found"
    stats = iii.queue_stats("work")
    assert (stats.ready, stats.running, stats.completed) == (0, 0, 0)


def test_a_full_disk_reaches_a_blocking_caller_as_an_enqueue_error(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    config = StoreConfig(store_method="file_based", file_path=str(directory))
    first = app_on(config)
    first.register_function("job", lambda payload: None)
    with first:  # create the database, to size it
        pass
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    iii = app_on(config, store=SQLiteStore(directory, max_page_count=pages + 40))
    iii.register_function("job", lambda payload: None)
    stored: list[str] = []
    with iii, pytest.raises(InvocationError) as caught:
        for _ in range(100):
            receipt = iii.trigger("job", {"blob": "y" * 10_000}, action=ENQUEUE)
            stored.append(receipt["messageReceiptId"])
    assert caught.value.code == "enqueue_error"
    assert "the disk is full" in caught.value.message
    assert isinstance(caught.value.__cause__, StoreError)
    assert 0 < len(stored) < 100  # the ones acknowledged before the disk filled are kept

    async def kept() -> list[str]:
        store = SQLiteStore(directory)
        await store.open()
        try:
            return [j.id for j in await store.list_jobs(limit=1000)]
        finally:
            await store.aclose()

    assert set(stored) <= set(anyio.run(kept))


def new_job(key: str) -> NewJob:
    return NewJob(
        id=key,
        queue="work",
        function_id="job",
        payload="1",
        created_at=1.0,
        available_at=1.0,
        max_attempts=1,
    )


@pytest.mark.anyio
async def test_who_commits_a_job_handed_over_from_a_thread(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    inserts: list[int] = []  # the native id of the thread that ran each INSERT
    conn = store._conn
    assert conn is not None
    conn.set_trace_callback(
        lambda sql: inserts.append(threading.get_native_id()) if sql.startswith("INSERT") else None
    )
    try:
        [writer] = store.own_thread_ids()

        def hand_over(key: str, inline: bool) -> tuple[bool, int]:
            future = store.enqueue_from_thread([new_job(key)], inline=inline)
            done_at_once = future.done()
            assert future.result(timeout=10) == [key]
            return done_at_once, threading.get_native_id()

        # With nothing queued for the writer, a caller that would only wait (inline)
        # commits in its own thread: the future is settled when the call returns.
        done_at_once, caller = await anyio.to_thread.run_sync(hand_over, "a", True)
        assert done_at_once
        assert inserts == [caller]
        # A caller that must not block (another event loop's thread) leaves it to the
        # writer.
        _, caller = await anyio.to_thread.run_sync(hand_over, "b", False)
        assert inserts == [inserts[0], writer] and caller != writer
        assert [j.id for j in await store.list_jobs()] == ["a", "b"]
    finally:
        conn.set_trace_callback(None)
        await store.aclose()


@pytest.mark.anyio
async def test_what_a_thread_enqueue_schedules_once_committed_comes_before_its_caller_resumes(
    tmp_path: Path,
) -> None:
    # The runtime wakes the queue from ``committed``: the wake must be on its way before
    # the caller resumes, or a job the caller enqueues next on the loop could be claimed
    # at enqueue ahead of this one. And it must come even if the caller gave up waiting.
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        seen: list[tuple[str, bool | None]] = []

        def hand_over(key: str, inline: bool) -> None:
            future: Any = None

            def committed() -> None:  # inline, it runs before the call even returns
                seen.append((key, None if future is None else future.done()))

            with store._conn_lock if not inline else contextlib.nullcontext():
                future = store.enqueue_from_thread(
                    [new_job(key)], inline=inline, committed=committed
                )
            assert future.result(timeout=10) == [key]

        await anyio.to_thread.run_sync(hand_over, "inline", True)
        await anyio.to_thread.run_sync(hand_over, "writer", False)
        assert seen == [("inline", None), ("writer", False)]

        # A caller that gave up before the commit: its jobs are committed, and told so.
        told = threading.Event()

        def give_up() -> bool:
            with store._conn_lock:  # the writer cannot commit until the caller gave up
                future = store.enqueue_from_thread(
                    [new_job("abandoned")], inline=False, committed=told.set
                )
                cancelled = future.cancel()
            return cancelled and told.wait(timeout=10)

        assert await anyio.to_thread.run_sync(give_up)
        assert [j.id for j in await store.list_jobs()] == ["inline", "writer", "abandoned"]
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_the_store_refuses_jobs_from_threads_once_closed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store")
    with pytest.raises(StoreError, match="not open"):
        store.enqueue_from_thread([])
    await store.open()
    await store.aclose()
    with pytest.raises(StoreError, match=f"{tmp_path / 'store'}.*not open"):
        store.enqueue_from_thread([])


def test_a_blocking_enqueue_into_a_file_store_does_not_wait_for_the_engine_loop(
    tmp_path: Path,
) -> None:
    iii = app_on(StoreConfig(store_method="file_based", file_path=str(tmp_path / "store")))
    seen = Seen()
    frozen, thaw = threading.Event(), threading.Event()

    @iii.function("freeze")
    async def freeze(_: Any) -> None:
        frozen.set()
        thaw.wait(timeout=20)  # blocks the engine's event loop, on purpose

    @iii.function("job")
    async def job(payload: Any) -> None:
        seen.add(payload)

    receipts: list[str] = []
    with iii:
        # Fired from a thread of its own: the call returns only once the loop is free.
        firing = threading.Thread(
            target=lambda: iii.trigger("freeze", None, action=TriggerAction.Void())
        )
        firing.start()
        assert frozen.wait(timeout=10)
        producer = threading.Thread(
            target=lambda: receipts.append(
                iii.trigger("job", "while frozen", action=ENQUEUE)["messageReceiptId"]
            )
        )
        producer.start()
        producer.join(timeout=10)
        # The receipt came back (the job is committed) while the loop was still blocked.
        done_while_frozen = not producer.is_alive()
        thaw.set()
        producer.join()
        firing.join()
        assert seen.wait_for(1) == ["while frozen"]
    assert done_while_frozen
    assert len(receipts) == 1


def test_an_enqueue_from_a_thread_wakes_an_idle_queue(started: tuple[III, Seen]) -> None:
    iii, seen = started
    runner = iii.runtime.runners["work"]
    for n in range(3):
        # The queue's dispatcher sleeps with nothing to claim (and polls only every
        # NO_POLLING_MS): only the wake-up after the commit can bring it to the job.
        _until(lambda: runner.idle)
        iii.trigger("job", n, action=ENQUEUE)
        assert seen.wait_for(n + 1) == list(range(n + 1))


def _until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until ``condition()`` holds, checking every millisecond."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in 10 s"
        time.sleep(0.001)


# --- synchronous calls from other threads and loops ----------------------------------


def test_calls_from_another_event_loop_return_values_and_errors(
    started: tuple[III, Seen],
) -> None:
    iii, _ = started

    @iii.function("double")
    async def double(n: int) -> int:
        return 2 * n

    @iii.function("broken")
    def broken(_: Any) -> None:  # a sync handler: it runs in the engine's threads
        raise ValueError("no")

    async def elsewhere() -> tuple[list[int], InvocationError]:
        values = await asyncio.gather(*(iii.trigger_async("double", n) for n in range(20)))
        try:
            await iii.trigger_async("broken", None)
        except InvocationError as exc:
            return values, exc
        raise AssertionError("no error")

    values, error = asyncio.run(elsewhere())
    assert values == [2 * n for n in range(20)]
    assert (error.code, error.message) == ("invocation_failed", "ValueError: no")
    assert [iii.trigger("double", n) for n in range(3)] == [0, 2, 4]


def test_sys_exit_in_a_handler_reaches_a_caller_elsewhere_as_invocation_failed(
    started: tuple[III, Seen],
) -> None:
    """A handler's ``SystemExit`` is its error for callers on other threads and event
    loops too: it reached a blocking caller as the ``SystemExit`` itself (ending a
    program that only called a function), and from an async handler it stopped the
    engine's event loop, after which ``shutdown()`` failed."""
    iii, _ = started

    @iii.function("exits")
    def exits(_: Any) -> None:  # a sync handler: it runs in the engine's threads
        raise SystemExit(3)

    @iii.function("exits_async")
    async def exits_async(_: Any) -> None:
        raise SystemExit(4)

    errors: list[tuple[str, str, bool]] = []

    def caught(call: Callable[[], Any]) -> None:
        with pytest.raises(InvocationError) as info:
            call()
        exc = info.value
        errors.append((exc.code, exc.message, isinstance(exc.__cause__, SystemExit)))

    caught(lambda: iii.trigger("exits", None))
    caught(lambda: iii.trigger("exits_async", None))
    caught(lambda: asyncio.run(iii.trigger_async("exits", None)))
    caught(lambda: asyncio.run(iii.trigger_async("exits_async", None)))
    failed = [
        ("invocation_failed", "SystemExit: 3", True),
        ("invocation_failed", "SystemExit: 4", True),
    ]
    assert errors == failed * 2
    assert iii.trigger("job", "still serving") is None


def register_forever(iii: III) -> tuple[threading.Event, threading.Event, list[str]]:
    """Register ``forever``, an async handler that waits until it is stopped; returns the
    events set when it begins and ends, and the names of what stopped it."""
    began, ended = threading.Event(), threading.Event()
    stopped: list[str] = []

    @iii.function("forever")
    async def forever(_: Any) -> None:
        began.set()
        try:
            await anyio.sleep_forever()
        except BaseException as exc:
            stopped.append(type(exc).__name__)
            raise
        finally:
            ended.set()

    return began, ended, stopped


def test_cancelling_a_call_from_another_event_loop_cancels_the_handler(
    started: tuple[III, Seen],
) -> None:
    iii, _ = started
    began, ended, outcome = register_forever(iii)

    async def elsewhere() -> bool:
        call = asyncio.ensure_future(iii.trigger_async("forever", None))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, began.wait, 10)
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(elsewhere())
    assert ended.wait(timeout=10)
    assert outcome == ["CancelledError"]


@pytest.mark.parametrize("where", ["thread", "thread-wait", "asyncio", "trio"])
def test_a_call_waiting_when_the_engine_shuts_down_gets_engine_stopped(
    where: str, store_config: StoreConfig
) -> None:
    """Not a bare ``CancelledError``, which another event loop would take for its own
    task's cancellation, nor the file store's "not open" (until 2026-12-03).
    ``thread-wait`` is a ``trigger_and_wait`` of a queued run."""
    iii = app_on(store_config)
    began, _, _ = register_forever(iii)
    errors: list[BaseException] = []

    def call_in_thread() -> None:
        try:
            if where == "thread-wait":
                iii.trigger_and_wait("forever", None)
            else:
                iii.trigger("forever", None)
        except BaseException as exc:
            errors.append(exc)

    async def call_elsewhere() -> None:
        try:
            await iii.trigger_async("forever", None)
        except BaseException as exc:
            errors.append(exc)

    def run_elsewhere() -> None:
        if where == "asyncio":
            asyncio.run(call_elsewhere())
        else:
            anyio.run(call_elsewhere, backend="trio")

    iii.start()
    caller = threading.Thread(
        target=call_in_thread if where.startswith("thread") else run_elsewhere
    )
    try:
        caller.start()
        assert began.wait(10)
    finally:
        iii.shutdown()
        caller.join(10)
    assert [type(e).__name__ for e in errors] == ["InvocationError"]
    error = errors[0]
    assert isinstance(error, InvocationError) and error.code == "engine_stopped"
    assert "the engine shut down while this call was waiting on it" in str(error)


def test_a_sync_call_from_another_event_loop_with_no_time_left_times_out() -> None:
    # The handler waits until the call has answered: a handler that returned at once could
    # finish before the zero timeout is looked at, and a result that is there stands.
    iii = app_on(StoreConfig())
    answered = threading.Event()
    iii.register_function("held", lambda payload: answered.wait(10) and payload)

    async def call() -> str:
        try:
            await iii.trigger_async("held", 1, timeout_ms=0)
        except InvocationError as exc:
            return f"{exc.code} {exc.__cause__!r}"
        return "returned"

    with iii:
        try:
            answer = asyncio.run(call())
        finally:
            answered.set()
    assert answer == "TIMEOUT None"


def test_calls_after_the_engine_stopped_say_so(store_config: StoreConfig) -> None:
    iii = app_on(store_config)
    iii.register_function("job", lambda payload: None)
    with iii:
        assert iii.trigger("job", 1) is None
    with pytest.raises(RuntimeError, match="not running"):
        iii.trigger("job", 1)
    with pytest.raises(RuntimeError, match="not running"):
        iii.trigger("job", 1, action=ENQUEUE)


def test_a_void_call_from_another_thread_returns_before_its_handler_runs(
    started: tuple[III, Seen], caplog: pytest.LogCaptureFixture
) -> None:
    iii, seen = started
    go = threading.Event()

    @iii.function("later")
    def later(payload: Any) -> None:  # in the engine's threads
        go.wait(timeout=20)
        seen.add(payload)

    assert iii.trigger("later", "a", action=TriggerAction.Void()) is None
    assert asyncio.run(iii.trigger_async("later", "b", action=TriggerAction.Void())) is None
    assert seen.payloads == []  # both returned while their handlers wait
    go.set()
    assert seen.wait_for(2) == ["a", "b"]

    @iii.function("echo")
    async def echo(payload: Any) -> Any:  # an async handler: its call goes through the loop
        return payload

    with caplog.at_level("ERROR", logger="iii_embedded"):
        assert iii.trigger("nobody", 1, action=TriggerAction.Void()) is None
        # A call made after it runs after it on the loop: by then the drop is logged.
        assert iii.trigger("echo", "after") == "after"
    assert "void trigger of 'nobody' dropped: function not found" in caplog.text


_CALLER_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="unset")


def test_a_call_from_another_thread_runs_in_a_context_of_its_own(
    started: tuple[III, Seen],
) -> None:
    iii, _ = started

    @iii.function("peek")
    async def peek(_: Any) -> str:
        return _CALLER_VAR.get()

    async def elsewhere() -> str:
        return str(await iii.trigger_async("peek", None))

    token = _CALLER_VAR.set("the caller's")
    try:
        # As before (through anyio's portal): the handler does not see the caller's
        # context variables, which may belong to another event loop.
        assert iii.trigger("peek", None) == "unset"
        assert asyncio.run(elsewhere()) == "unset"
    finally:
        _CALLER_VAR.reset(token)


def test_an_enqueue_from_another_event_loop_never_commits_on_that_loop(tmp_path: Path) -> None:
    iii = app_on(StoreConfig(store_method="file_based", file_path=str(tmp_path / "store")))
    iii.register_function("job", lambda payload: None)
    inserts: list[int] = []
    with iii:
        store = iii.runtime.store
        assert isinstance(store, SQLiteStore) and store._conn is not None
        # Under the connection's lock: no thread is running a statement meanwhile. (One
        # that was would hold SQLite's mutex and wait for the GIL to call the callback,
        # while this thread, holding the GIL, waited for that mutex.)
        with store._conn_lock:
            store._conn.set_trace_callback(
                lambda sql: (
                    inserts.append(threading.get_native_id())
                    if sql.startswith("INSERT INTO jobs")
                    else None
                )
            )

        async def elsewhere() -> int:
            for n in range(5):
                await iii.trigger_async("job", n, action=ENQUEUE)
            return threading.get_native_id()

        caller = asyncio.run(elsewhere())
        # A blocking trigger from this thread, by contrast, may commit here.
        iii.trigger("job", 5, action=ENQUEUE)
        with store._conn_lock:
            store._conn.set_trace_callback(None)
    assert len(inserts) == 6
    assert caller not in inserts[:5]


def test_blocking_enqueues_racing_a_shutdown_end_and_lose_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    iii = app_on(StoreConfig(store_method="file_based", file_path=str(directory)))
    iii.register_function("job", lambda payload: None)
    receipts: list[str] = []
    refusals: list[BaseException] = []
    enough = threading.Semaphore(0)

    def produce(k: int) -> None:
        for n in range(10_000):
            try:
                receipt = iii.trigger("job", [k, n], action=ENQUEUE)
            except (InvocationError, RuntimeError) as exc:  # the engine stopped meanwhile
                refusals.append(exc)
                return
            receipts.append(receipt["messageReceiptId"])
            enough.release()

    producers = [threading.Thread(target=produce, args=(k,)) for k in range(8)]
    iii.start()
    for t in producers:
        t.start()
    for _ in range(200):  # let them get going, then stop the engine under them
        assert enough.acquire(timeout=20)
    iii.shutdown()
    for t in producers:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in producers)  # none waits forever
    assert len(refusals) == 8, refusals
    for exc in refusals:
        assert isinstance(exc, RuntimeError) or (
            isinstance(exc, InvocationError) and exc.code == "enqueue_error"
        ), repr(exc)

    async def stored() -> set[str]:
        store = SQLiteStore(directory)
        await store.open()
        try:
            return {j.id for j in await store.list_jobs(limit=1_000_000)}
        finally:
            await store.aclose()

    assert set(receipts) <= anyio.run(stored)  # every receipt handed out is on disk


def test_a_blocking_call_of_a_sync_handler_runs_it_without_the_engine_loop() -> None:
    iii = app_on(StoreConfig())  # the system clock: the direct way is taken
    frozen, thaw = threading.Event(), threading.Event()
    release = threading.Event()

    @iii.function("freeze")
    async def freeze(_: Any) -> None:
        frozen.set()
        thaw.wait(timeout=20)  # blocks the engine's event loop, on purpose

    @iii.function("who")
    def who(n: int) -> tuple[int, str, str]:
        invocation = current_invocation()
        assert invocation is not None
        return n, invocation.function_id, invocation.action

    @iii.function("broken")
    def broken(_: Any) -> None:
        raise TimeoutError("the handler's own")

    @iii.function("stuck")
    def stuck(_: Any) -> None:
        release.wait(timeout=20)

    with iii:
        firing = threading.Thread(
            target=lambda: iii.trigger("freeze", None, action=TriggerAction.Void())
        )
        firing.start()
        assert frozen.wait(timeout=10)
        answers: list[Any] = []
        caller = threading.Thread(target=lambda: answers.append(iii.trigger("who", 7)))
        caller.start()
        caller.join(timeout=10)
        answered_while_frozen = not caller.is_alive()
        thaw.set()
        firing.join()
        caller.join()

        with pytest.raises(InvocationError) as own_timeout:
            iii.trigger("broken", None)
        with pytest.raises(InvocationError) as timed_out:
            iii.trigger("stuck", None, timeout_ms=50)
        release.set()
    assert answered_while_frozen
    assert answers == [(7, "who", "sync")]
    assert (own_timeout.value.code, own_timeout.value.message) == (
        "invocation_failed",
        "TimeoutError: the handler's own",
    )
    assert isinstance(own_timeout.value.__cause__, TimeoutError)
    # Only the call's own timeout is a TimeoutError; the handler's is the cause of a failure.
    assert not isinstance(own_timeout.value, TimeoutError)
    assert isinstance(timed_out.value, TimeoutError)
    assert timed_out.value.__cause__ is None
    assert (timed_out.value.code, timed_out.value.message) == (
        "TIMEOUT",
        "Function 'stuck' did not return within 50 ms",
    )


@pytest.mark.anyio
async def test_a_blocking_call_still_times_out_on_a_virtual_clock() -> None:
    clock = VirtualClock()
    iii = III(Config(), clock=clock, shutdown_grace_ms=0)
    started, release = threading.Event(), threading.Event()

    @iii.function("stuck")
    def stuck(_: Any) -> None:
        started.set()
        release.wait(timeout=20)

    codes: list[str] = []

    def call() -> None:
        try:
            iii.trigger("stuck", None, timeout_ms=60_000)
        except InvocationError as exc:
            codes.append(exc.code)

    async with iii.running():
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, call)
            assert await anyio.to_thread.run_sync(started.wait, 10)
            # A minute of virtual time, no real time: the timeout is the runtime clock's.
            clock.advance(61)
        release.set()
    assert codes == ["TIMEOUT"]


def test_a_sync_handler_called_from_another_event_loop_skips_the_engine_loop() -> None:
    iii = app_on(StoreConfig())
    frozen, thaw, release = threading.Event(), threading.Event(), threading.Event()
    unfrozen = threading.Event()

    @iii.function("freeze")
    async def freeze(_: Any) -> None:
        frozen.set()
        thaw.wait(timeout=20)  # blocks the engine's event loop, on purpose
        unfrozen.set()

    @iii.function("double")
    def double(n: int) -> int:
        return 2 * n

    @iii.function("broken")
    def broken(_: Any) -> None:
        raise ValueError("no")

    @iii.function("stuck")
    def stuck(_: Any) -> None:
        release.wait(timeout=20)

    async def elsewhere() -> tuple[list[int], InvocationError, InvocationError]:
        values = list(await asyncio.gather(*(iii.trigger_async("double", n) for n in range(5))))
        errors = []
        for fid, timeout_ms in (("broken", None), ("stuck", 50)):
            try:
                await iii.trigger_async(fid, None, timeout_ms=timeout_ms)
            except InvocationError as exc:
                errors.append(exc)
        return values, errors[0], errors[1]

    with iii:
        iii.trigger("freeze", None, action=TriggerAction.Void())
        assert frozen.wait(timeout=10)
        # The engine's loop is blocked: these calls never need it.
        values, failed, timed_out = asyncio.run(elsewhere())
        done_while_frozen = not unfrozen.is_set()
        thaw.set()
        release.set()
    assert done_while_frozen
    assert values == [0, 2, 4, 6, 8]
    assert (failed.code, failed.message) == ("invocation_failed", "ValueError: no")
    assert isinstance(failed.__cause__, ValueError)
    assert (timed_out.code, timed_out.message) == (
        "TIMEOUT",
        "Function 'stuck' did not return within 50 ms",
    )


def test_calls_from_a_trio_program_return_values_errors_and_cancel(tmp_path: Path) -> None:
    """A trio program (not asyncio) calls an engine that runs on a background thread: its
    waits go to a worker thread of trio's own, and cancelling one cancels the call."""
    trio = pytest.importorskip("trio")
    seen = Seen()
    iii = app_on(StoreConfig(store_method="file_based", file_path=str(tmp_path / "store")))
    began, ended, stopped = register_forever(iii)

    @iii.function("job")
    async def job(payload: Any) -> None:
        seen.add(payload)

    @iii.function("double")
    async def double(n: int) -> int:
        return 2 * n

    @iii.function("triple")
    def triple(n: int) -> int:  # a sync handler: called on the engine's threads directly
        return 3 * n

    @iii.function("broken")
    async def broken(_: Any) -> None:
        raise ValueError("no")

    results: dict[str, Any] = {}

    async def in_trio() -> None:
        receipt = await iii.trigger_async("job", 1, action=ENQUEUE)
        results["receipt"] = receipt["messageReceiptId"]
        results["void"] = await iii.trigger_async("job", 2, action=TriggerAction.Void())
        results["values"] = [
            await iii.trigger_async("double", 4),
            await iii.trigger_async("triple", 4),
        ]
        try:
            await iii.trigger_async("broken", None)
        except InvocationError as exc:
            results["error"] = exc
        scope = trio.CancelScope()

        async def call_forever() -> None:
            with scope:
                await iii.trigger_async("forever", None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call_forever)
            assert await trio.to_thread.run_sync(began.wait, 10)  # the handler runs
            scope.cancel()
        results["cancelled"] = scope.cancelled_caught

    with iii:
        trio.run(in_trio)
        assert seen.wait_for(2) == [1, 2]
        assert began.wait(timeout=10)
        assert ended.wait(timeout=10)  # the cancellation reached the handler
        run = iii.runs.wait(results["receipt"], timeout_ms=10_000)
    assert results["void"] is None
    assert results["values"] == [8, 12]
    error = results["error"]
    assert (error.code, error.message) == ("invocation_failed", "ValueError: no")
    assert results["cancelled"] is True
    assert stopped == ["CancelledError"]
    assert run.ok
