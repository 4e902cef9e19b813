"""Queued jobs of sync handlers (SPEC §3: they run in worker threads, at most the queue's
``concurrency`` at once). No task waits for each of them: the queue hands the job to a
thread and settles the results in batches, and a timeout, a cancellation or a shutdown
settles the job at once while its thread runs on. Both stores."""

from __future__ import annotations

import contextvars
import threading
import time
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
    _threads,
    current_invocation,
)
from iii_embedded._stores._memory import MemoryStore
from iii_embedded._threads import ThreadPool
from iii_embedded.testing import VirtualClock, dead_jobs, drain

pytestmark = pytest.mark.anyio


def app_with(
    store: StoreConfig, queue: QueueConfig, clock: VirtualClock | None = None, grace_ms: int = 0
) -> III:
    return III(
        Config(queues={queue.name: queue}, store=store),
        clock=clock or VirtualClock(),
        # An in-memory store object of our own outlives the app's runs (see the shutdown test).
        store=MemoryStore() if store.store_method == "in_memory" else None,
        shutdown_grace_ms=grace_ms,
    )


async def enqueue(iii: III, fid: str, payload: Any, queue: str = "q") -> str:
    receipt = await iii.trigger_async(fid, payload, action=TriggerAction.Enqueue(queue=queue))
    return str(receipt["messageReceiptId"])


async def wait_for(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10), "the handler never got there"


async def test_sync_handlers_run_in_threads_at_most_concurrency_at_once(
    store_config: StoreConfig,
) -> None:
    iii = app_with(store_config, QueueConfig(name="q", concurrency=3))
    barrier = threading.Barrier(3, timeout=10)  # breaks unless 3 run at once
    lock = threading.Lock()
    running = peak = 0
    threads: set[int] = set()
    outputs: dict[int, int] = {}

    @iii.function("square")
    def square(n: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        barrier.wait()
        with lock:
            running -= 1
        return n * n

    async with iii.running():
        ids = {await enqueue(iii, "square", n): n for n in range(9)}
        await drain(iii)
        for receipt, n in ids.items():
            run = await iii.runs.get_async(receipt)
            assert run is not None and run.status == "completed"
            outputs[n] = run.output
    assert outputs == {n: n * n for n in range(9)}
    assert peak == 3
    assert threading.get_ident() not in threads


async def test_current_invocation_and_hooks_in_a_sync_handler(store_config: StoreConfig) -> None:
    iii = app_with(store_config, QueueConfig(name="q", max_retries=2, backoff_ms=10))
    seen: list[tuple[Any, ...]] = []
    started: list[str] = []
    iii.on("job_started", lambda job: started.append(job.id))

    @iii.function("flaky")
    def flaky(_: Any) -> str:
        inv = current_invocation()
        assert inv is not None
        seen.append((inv.function_id, inv.action, inv.receipt_id, inv.queue, inv.attempt))
        if inv.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "second"

    async with iii.running():
        receipt = await enqueue(iii, "flaky", {})
        await drain(iii)
        run = await iii.runs.get_async(receipt)
    assert seen == [
        ("flaky", "enqueue", receipt, "q", 1),
        ("flaky", "enqueue", receipt, "q", 2),
    ]
    assert started == [receipt, receipt]
    assert run is not None and (run.status, run.attempts, run.output) == ("completed", 2, "second")


async def test_a_sync_handler_that_times_out_fails_the_attempt_and_frees_its_slot(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    iii = app_with(
        store_config,
        QueueConfig(name="q", concurrency=1, max_retries=2, backoff_ms=100, timeout_ms=1000),
        clock=clock,
    )
    release = threading.Event()
    entered = [threading.Event(), threading.Event()]
    finished = threading.Event()
    attempts = 0

    @iii.function("hang")
    def hang(_: Any) -> str:
        nonlocal attempts
        attempts += 1
        entered[attempts - 1].set()
        release.wait(10)
        if attempts == 2:
            finished.set()
        return "late"

    @iii.function("quick")
    def quick(n: int) -> int:
        return n + 1

    async with iii.running():
        hung = await enqueue(iii, "hang", {})
        await wait_for(entered[0])
        other = await enqueue(iii, "quick", 41)  # waits for the only slot
        clock.advance(0.999)
        await anyio.lowlevel.checkpoint()
        assert iii.runtime.runners["q"].running == 1
        clock.advance(0.001)  # the attempt's 1 s timeout frees the slot
        await drain(iii, max_advance_s=0)
        done = await iii.runs.get_async(other)
        assert done is not None and (done.status, done.output) == ("completed", 42)
        clock.advance(0.1)  # the retry's backoff: a second thread takes it (the first hangs)
        await wait_for(entered[1])
        clock.advance(1.0)
        await drain(iii)
        [dead] = await dead_jobs(iii, "q")
        release.set()  # both abandoned threads now return "late": dropped
        await wait_for(finished)
        await drain(iii)
        run = await iii.runs.get_async(hung)
    assert dead.error is not None
    assert (dead.id, dead.attempts, dead.error.type) == (hung, 2, "TimeoutError")
    assert dead.error.message == "handler of 'hang' timed out after 1000 ms"
    assert run is not None and (run.status, run.output) == ("failed", None)


async def test_shutdown_after_the_grace_period_gives_a_running_sync_job_back_unspent(
    store_config: StoreConfig,
) -> None:
    iii = app_with(store_config, QueueConfig(name="q"), grace_ms=0)
    entered = threading.Event()
    release = threading.Event()
    returned = threading.Event()

    @iii.function("stuck")
    def stuck(_: Any) -> str:
        entered.set()
        release.wait(10)
        returned.set()
        return "too late"

    async with iii.running():
        receipt = await enqueue(iii, "stuck", {})
        await wait_for(entered)
    release.set()
    await wait_for(returned)
    async with iii.running():
        job = await iii.runtime.store.get(receipt)
        assert job is not None and (job.state, job.attempts, job.output) == ("queued", 0, None)
        release.clear()
        entered.clear()
        # Started again by the next run of the app, as a first attempt.
        await wait_for(entered)
        assert current_attempts(iii, receipt) == 1
        release.set()
        await drain(iii)
        run = await iii.runs.get_async(receipt)
    assert run is not None and (run.status, run.attempts, run.output) == (
        "completed",
        1,
        "too late",
    )


def current_attempts(iii: III, receipt: str) -> int:
    entry = iii.runtime.runners["q"].active[receipt]
    return entry.job.attempts


async def test_what_a_sync_handler_raises_or_returns_is_recorded(
    store_config: StoreConfig,
) -> None:
    iii = app_with(store_config, QueueConfig(name="q", max_retries=1))

    @iii.function("exits")
    def exits(_: Any) -> None:
        raise SystemExit(3)

    @iii.function("opaque")
    def opaque(_: Any) -> object:
        return {1, 2}  # a set: not JSON

    async with iii.running():
        exited = await enqueue(iii, "exits", {})
        odd = await enqueue(iii, "opaque", {})
        await drain(iii)
        [dead] = await dead_jobs(iii, "q")
        run = await iii.runs.get_async(odd)
        # The runtime lives on after the SystemExit.
        assert await iii.trigger_async("opaque", {}) == {1, 2}
    assert dead.error is not None
    assert (dead.id, dead.error.type, dead.error.message) == (
        exited,
        "RuntimeError",
        "SystemExit(3)",
    )
    assert run is not None and (run.status, run.output) == ("completed", "{1, 2}")


def test_a_pool_thread_waiting_on_the_pool_grows_it_past_its_bound() -> None:
    pool = ThreadPool("test", max_threads=2)
    both_busy = threading.Barrier(2, timeout=10)
    inner_started = threading.Barrier(2, timeout=10)

    def inner(n: int) -> int:
        inner_started.wait()  # both inner calls run at once: four threads in all
        return n * 10

    def outer(n: int) -> int:
        both_busy.wait()  # the pool's two threads are both here, waiting below
        return int(pool.run_from_thread(inner, n, contextvars.copy_context()).result(10))

    try:
        futures = [pool.run_from_thread(outer, n, contextvars.copy_context()) for n in (1, 2)]
        assert sorted(f.result(timeout=20) for f in futures) == [10, 20]
        assert len(pool._threads) == 4
        # A call from outside the pool still waits for a free thread: no growth.
        assert pool.run_from_thread(inner_alone, 3, contextvars.copy_context()).result(10) == 3
        assert len(pool._threads) == 4
    finally:
        pool.close()


def inner_alone(n: int) -> int:
    return n


class Results:
    """A pool's ``settle``: collects the results until ``count`` are in."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.batches: list[list[tuple[Any, bool, Any]]] = []
        self.done = anyio.Event()

    def __call__(self, batch: list[tuple[Any, bool, Any]]) -> None:
        self.batches.append(batch)
        if sum(map(len, self.batches)) == self.count:
            self.done.set()

    async def all(self) -> dict[Any, Any]:
        with anyio.fail_after(10):
            await self.done.wait()
        assert all(ok for batch in self.batches for _, ok, _ in batch)
        return {token: value for batch in self.batches for token, _, value in batch}


def thread_of(n: int) -> tuple[int, int]:
    return n, threading.get_ident()


async def test_calls_left_to_a_busy_thread_run_on_it_and_wake_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # However short, a call may take longer than ``_SLOW_S`` on a busy machine, which
    # would rightly make the pool wake more threads: out of the way here.
    monkeypatch.setattr(_threads, "_SLOW_S", 60.0)
    results = Results(10)
    pool = ThreadPool("test", max_threads=10, settle=results, fan_out_s=60.0)
    try:
        for n in range(10):  # the first wakes a thread; the rest are left to it
            pool.submit(n, thread_of, n)
        outputs = await results.all()
        threads = len(pool._threads)
    finally:
        pool.close()
    assert sorted(outputs) == list(range(10))
    assert len({ident for _, ident in outputs.values()}) == 1
    assert threads == 1


async def test_calls_left_to_a_thread_held_up_in_a_handler_get_threads_of_their_own() -> None:
    # The first call holds its thread until all three run at once: the calls left to
    # that thread must get threads of their own once they have waited ``fan_out_s``.
    barrier = threading.Barrier(3, timeout=10)

    def meet(n: int) -> tuple[int, int]:
        barrier.wait()
        return thread_of(n)

    results = Results(3)
    pool = ThreadPool("test", max_threads=3, settle=results, fan_out_s=0.01)
    try:
        for n in range(3):
            pool.submit(n, meet, n)
        outputs = await results.all()
    finally:
        pool.close()
    assert sorted(outputs) == [0, 1, 2]
    assert len({ident for _, ident in outputs.values()}) == 3


def test_threads_idle_for_a_while_end_and_the_pool_starts_one_again_when_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst grows a pool to its bound; threads that then wait ``_IDLE_EXIT_S`` for a
    call end, so it shrinks back, and the next call starts a thread again. A thread stuck
    in a call is not idle, and stays."""
    monkeypatch.setattr(_threads, "_IDLE_EXIT_S", 0.05, raising=False)
    pool = ThreadPool("idling", max_threads=3)
    all_in = threading.Barrier(3, timeout=10)
    release = threading.Event()

    def meet(n: int) -> int:
        all_in.wait()  # three calls at once: three threads
        return n

    def stuck(n: int) -> int:
        release.wait(10)
        return n

    def threads_become(count: int) -> None:
        deadline = time.monotonic() + 10
        while len(pool._threads) != count:
            assert time.monotonic() < deadline, f"{len(pool._threads)} threads, not {count}"
            time.sleep(0.01)

    try:
        calls = [pool.run_from_thread(meet, n, contextvars.copy_context()) for n in range(3)]
        assert sorted(f.result(timeout=10) for f in calls) == [0, 1, 2]
        assert len(pool._threads) == 3
        threads_become(0)
        assert pool.idle == 0
        held = pool.run_from_thread(stuck, 7, contextvars.copy_context())
        assert pool.run_from_thread(inner_alone, 8, contextvars.copy_context()).result(10) == 8
        threads_become(1)  # the idle one ended; the one in ``stuck`` did not
        release.set()
        assert held.result(10) == 7
        threads_become(0)
        names = {t.name for t in threading.enumerate() if t.name.startswith("iii-idling-")}
        assert pool.run_from_thread(inner_alone, 9, contextvars.copy_context()).result(10) == 9
    finally:
        pool.close()
    assert names == set()


def test_nested_synchronous_calls_of_sync_handlers_do_not_exhaust_the_threads() -> None:
    # 64 callers at once, the size of the pool for synchronous calls: once every one of
    # its threads holds an outer handler, each calls an inner handler and waits for it.
    # The inner calls must get threads of their own, or they would wait for threads that
    # only their own callers hold.
    callers = 64
    iii = III(shutdown_grace_ms=0)
    outers_in, inners_in = (
        threading.Barrier(callers, timeout=20),
        threading.Barrier(callers, timeout=20),
    )

    @iii.function("inner")
    def inner(n: int) -> int:
        inners_in.wait()
        return n + 1

    @iii.function("outer")
    def outer(n: int) -> int:
        outers_in.wait()  # the pool is full of outer handlers
        return int(iii.trigger("inner", n, timeout_ms=30_000))

    results: list[int] = []
    lock = threading.Lock()

    def call(n: int) -> None:
        value = iii.trigger("outer", n, timeout_ms=30_000)
        with lock:
            results.append(value)

    with iii:
        threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert sorted(results) == [n + 1 for n in range(callers)]


async def test_a_plain_handler_that_returns_a_coroutine_fails_and_says_why(
    store_config: StoreConfig,
) -> None:
    iii = app_with(store_config, QueueConfig(name="q", max_retries=2))
    ran: list[Any] = []

    async def process(data: Any) -> Any:
        ran.append(data)  # never: nothing awaits the coroutine
        return data

    iii.register_function("wrapped", lambda data: process(data))
    hint = "plain function that returned coroutine, which nothing awaits"
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("wrapped", 1)
        assert caught.value.code == "invocation_failed" and hint in caught.value.message
        receipt = await enqueue(iii, "wrapped", 2)
        await drain(iii)
        run = await iii.runs.get_async(receipt)
        # No retry can make it run: dead-lettered after one attempt, though two are allowed.
        assert run is not None and (run.status, run.attempts) == ("failed", 1)
        assert run.error is not None and run.error.type == "AwaitableResultError"
        assert hint in run.error.message
        [dead] = await iii.dlq_list_async("q")
        assert dead.id == receipt and dead.attempts == 1
        # A plain handler's ordinary results pass through untouched.
        iii.register_function("plain", lambda data: {"n": data})
        assert await iii.trigger_async("plain", 3) == {"n": 3}
    assert ran == []
