"""Runs (SPEC §6): ``trigger_and_wait``, ``iii.runs.get``/``cancel`` and the Enqueue options
(``delay_ms``, ``idempotency_key``, ``max_attempts``), on both stores. Batches are in
``test_batch.py``; waiting inside handlers (slots, deadlocks, fan-in) in ``test_waiting.py``."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    QueueConfig,
    RunFailedError,
    RunResult,
    StoreConfig,
    TriggerAction,
    _runs,
    current_invocation,
)
from iii_embedded._stores import Job, NewJob, completed_outcome
from iii_embedded._stores._memory import MemoryStore
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app(store: StoreConfig, clock: VirtualClock | None = None, **queues: QueueConfig) -> III:
    all_queues = {
        "work": QueueConfig(name="work", max_retries=3, backoff_ms=1000),
        **queues,
    }
    return III(
        Config(queues=all_queues, store=store), clock=clock or VirtualClock(), shutdown_grace_ms=0
    )


def in_background(
    tg: anyio.abc.TaskGroup, wait: Callable[[], Awaitable[RunResult]]
) -> list[RunResult]:
    """Start ``wait()`` in ``tg``; its result lands in the returned list."""
    results: list[RunResult] = []

    async def run() -> None:
        results.append(await wait())

    tg.start_soon(run)
    return results


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Yield to the loop until ``condition()`` holds (bounded; no wall-clock sleeps)."""
    with anyio.fail_after(10):
        while not await condition():
            await anyio.lowlevel.checkpoint()


# --- trigger_and_wait --------------------------------------------------------------------


async def test_trigger_and_wait_returns_the_output_after_two_failures(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    attempts = 0

    @iii.function("flaky")
    async def flaky(data: dict[str, int]) -> dict[str, int]:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError(f"attempt {attempts} failed")
        return {"answer": data["x"] * 2}

    async with iii.running(), anyio.create_task_group() as tg:
        results = in_background(
            tg, lambda: iii.trigger_and_wait_async("flaky", {"x": 21}, queue="work")
        )
        await drain(iii)  # advances the virtual clock through both backoffs
    [result] = results
    assert (result.ok, result.status, result.function_id, result.output, result.error) == (
        True,
        "completed",
        "flaky",
        {"answer": 42},
        None,
    )
    assert result.unwrap() == {"answer": 42}
    assert attempts == 3


async def test_trigger_and_wait_returns_an_error_result_after_exhaustion(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    calls = 0

    @iii.function("broken")
    async def broken(_: Any) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad input")

    async with iii.running(), anyio.create_task_group() as tg:
        results = in_background(tg, lambda: iii.trigger_and_wait_async("broken", {}, queue="work"))
        await drain(iii)
    [result] = results
    assert (result.ok, result.status, calls) == (False, "failed", 3)
    assert result.error is not None
    assert (result.error.type, result.error.message) == ("ValueError", "bad input")
    with pytest.raises(RunFailedError) as caught:
        result.unwrap()
    assert (caught.value.run_id, caught.value.function_id, caught.value.status) == (
        result.id,
        "broken",
        "failed",
    )


async def test_trigger_and_wait_times_out_on_the_runtime_clock_and_the_run_goes_on(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    iii = make_app(store_config, clock)
    started = anyio.Event()
    release = anyio.Event()

    @iii.function("slow")
    async def slow(_: Any) -> str:
        started.set()
        await release.wait()
        return "done"

    async with iii.running():

        async def advance() -> None:
            await started.wait()
            clock.advance(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(advance)
            with pytest.raises(TimeoutError) as caught:  # an InvocationTimeoutError
                await iii.trigger_and_wait_async("slow", {}, queue="work", timeout_ms=50)
        assert isinstance(caught.value, InvocationError)
        assert caught.value.code == "TIMEOUT"
        assert "(they go on)" in caught.value.message
        release.set()
        await drain(iii)
        assert (await iii.queue_stats_async("work")).completed == 1


async def test_a_run_already_final_under_its_idempotency_key_is_returned_at_once(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    calls: list[int] = []

    @iii.function("once")
    def once(n: int) -> int:
        calls.append(n)
        return n

    async with iii.running():
        first = await iii.trigger_and_wait_async("once", 1, queue="work", idempotency_key="k")
        second = await iii.trigger_and_wait_async("once", 2, queue="work", idempotency_key="k")
    assert (second.id, second.output, calls) == (first.id, 1, [1])


def test_blocking_twins_work_from_a_sync_program(tmp_path: Path) -> None:
    iii = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(tmp_path))),
        shutdown_grace_ms=0,
    )
    iii.register_function("square", lambda n: n * n)
    with iii:
        assert iii.trigger_and_wait("square", 7).unwrap() == 49
        batch = iii.batch_trigger_and_wait("square", [1, 2, 3])
        assert batch.outputs == [1, 4, 9]
        [queued] = iii.batch_trigger("square", [4])
        result = iii.trigger_and_wait("square", 5)
        run = iii.runs.get(result.id)
        assert run is not None and (run.status, run.output) == ("completed", 25)
        assert iii.runs.cancel(result.id).cancelled is False
        assert iii.runs.get(queued) is not None


async def test_blocking_twins_refuse_the_event_loop_thread(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    iii.register_function("noop", lambda _: None)
    async with iii.running():
        for call in (
            lambda: iii.trigger_and_wait("noop", 1),
            lambda: iii.batch_trigger("noop", [1]),
            lambda: iii.batch_trigger_and_wait("noop", [1]),
            lambda: iii.runs.get("x"),
            lambda: iii.runs.cancel("x"),
        ):
            with pytest.raises(RuntimeError, match="_async"):
                call()


async def test_async_twins_work_from_another_event_loop(tmp_path: Path) -> None:
    """The engine on its own thread (``start()``), the caller in another anyio loop."""
    iii = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(tmp_path))),
        shutdown_grace_ms=0,
    )
    iii.register_function("inc", lambda n: n + 1)
    with iii:
        result = await iii.trigger_and_wait_async("inc", 1)
        run = await iii.runs.get_async(result.id)
        cancel = await iii.runs.cancel_async(result.id)
    assert (result.output, run is not None and run.output, cancel.cancelled) == (2, 2, False)


async def test_runs_wait_waits_for_a_run_started_earlier(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    attempts = 0

    @iii.function("flaky")
    async def flaky(n: int) -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 2:
            raise ConnectionError("once")
        return n + 1

    async with iii.running(), anyio.create_task_group() as tg:
        receipt = await iii.trigger_async("flaky", 1, action=TriggerAction.Enqueue(queue="work"))
        run_id = receipt["messageReceiptId"]
        results = in_background(tg, lambda: iii.runs.wait_async(run_id))
        await drain(iii)
    [result] = results
    assert (result.id, result.status, result.output, attempts) == (run_id, "completed", 2, 2)


async def test_runs_wait_of_an_unknown_run_raises(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.runs.wait_async("no-such-run")
    assert (caught.value.code, caught.value.message) == (
        "run_not_found",
        "run no-such-run does not exist",
    )


# --- iii.runs.get ------------------------------------------------------------------------


async def test_run_shows_its_last_error_while_it_waits_for_a_retry(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    iii = make_app(store_config, clock)
    fail = True

    @iii.function("flaky")
    async def flaky(_: Any) -> str:
        if fail:
            raise ConnectionError("upstream down")
        return "ok"

    async with iii.running():
        receipt = await iii.trigger_async("flaky", {}, action=TriggerAction.Enqueue(queue="work"))
        run_id = receipt["messageReceiptId"]
        await drain(iii, max_advance_s=0)  # the first attempt only
        run = await iii.runs.get_async(run_id)
        assert run is not None
        assert (run.status, run.attempts, run.max_attempts, run.output) == ("delayed", 1, 3, None)
        assert run.error is not None and run.error.message == "upstream down"
        assert run.created_at == clock.now() and run.finished_at is None
        fail = False
        await drain(iii)
        run = await iii.runs.get_async(run_id)
    assert run is not None
    assert (run.status, run.attempts, run.output, run.error) == ("completed", 2, "ok", None)
    assert run.started_at == run.finished_at == clock.now()


async def test_an_unknown_run_is_none(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    async with iii.running():
        assert await iii.runs.get_async("no-such-run") is None


async def test_run_status_and_output_survive_a_restart(tmp_path: Path) -> None:
    config = StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))
    first = make_app(config)
    first.register_function("answer", lambda _: {"value": 42})
    async with first.running():
        result = await first.trigger_and_wait_async("answer", {}, queue="work")
    second = make_app(config)
    async with second.running():
        run = await second.runs.get_async(result.id)
    assert run is not None
    assert (run.status, run.output, run.function_id, run.queue, run.attempts) == (
        "completed",
        {"value": 42},
        "answer",
        "work",
        1,
    )


# --- Enqueue options ----------------------------------------------------------------------


async def test_a_delayed_run_does_not_start_before_its_time(store_config: StoreConfig) -> None:
    clock = VirtualClock()
    iii = make_app(store_config, clock)
    started: list[float] = []
    iii.register_function("later", lambda _: started.append(clock.now()))
    async with iii.running():
        t0 = clock.now()
        receipt = await iii.trigger_async(
            "later", {}, action=TriggerAction.Enqueue(queue="work", delay_ms=60_000)
        )
        run = await iii.runs.get_async(receipt["messageReceiptId"])
        assert run is not None and (run.status, run.started_at) == ("delayed", None)
        await drain(iii, max_advance_s=59.9)
        assert started == []
        run = await iii.runs.get_async(receipt["messageReceiptId"])
        assert run is not None and run.status == "delayed"
        await drain(iii)
    assert started == [t0 + 60]


async def test_max_attempts_overrides_the_queue_for_one_run(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    calls = 0

    @iii.function("fail")
    async def fail(_: Any) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("no")

    async with iii.running():
        await iii.trigger_async(
            "fail", {}, action=TriggerAction.Enqueue(queue="work", max_attempts=5)
        )
        await drain(iii)
        result = await iii.trigger_and_wait_async("fail", {}, queue="work", max_attempts=1)
    assert (calls, result.status) == (6, "failed")


async def test_idempotency_key_returns_the_first_receipt_while_it_lives(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config, work=QueueConfig(name="work", max_retries=1))
    fail = True
    payloads: list[Any] = []

    @iii.function("charge")
    async def charge(data: Any) -> str:
        payloads.append(data)
        if fail:
            raise RuntimeError("declined")
        return "charged"

    action = TriggerAction.Enqueue(queue="work", idempotency_key="order-7", delay_ms=5000)
    async with iii.running():
        first = await iii.trigger_async("charge", {"n": 1}, action=action)
        second = await iii.trigger_async("charge", {"n": 2}, action=action)
        assert second == first
        assert (await iii.queue_stats_async("work")).delayed == 1  # nothing new was stored
        await drain(iii)
        run = await iii.runs.get_async(first["messageReceiptId"])
        assert run is not None and run.status == "failed"
        fail = False
        third = await iii.trigger_async("charge", {"n": 3}, action=action)
        assert third != first  # the failed run released its key
        await drain(iii)
        again = await iii.trigger_async("charge", {"n": 4}, action=action)
        assert again == third  # a completed run keeps its key for its retention
        other = await iii.trigger_async(
            "charge", {"n": 5}, action=TriggerAction.Enqueue(queue="work", idempotency_key="o-8")
        )
        assert other != third
        await drain(iii)
    assert payloads == [{"n": 1}, {"n": 3}, {"n": 5}]


async def test_a_cancelled_run_releases_its_idempotency_key(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    iii.register_function("job", lambda _: None)
    action = TriggerAction.Enqueue(queue="work", idempotency_key="k", delay_ms=1000)
    async with iii.running():
        first = (await iii.trigger_async("job", 1, action=action))["messageReceiptId"]
        assert (await iii.runs.cancel_async(first)).cancelled
        second = (await iii.trigger_async("job", 2, action=action))["messageReceiptId"]
    assert second != first


async def test_idempotency_keys_expire_with_the_result_retention(
    store_config: StoreConfig,
) -> None:
    store = attrs.evolve(store_config, result_retention_ms=1000)
    clock = VirtualClock()
    iii = make_app(store, clock)
    iii.register_function("job", lambda n: n)
    async with iii.running():
        first = await iii.trigger_and_wait_async("job", 1, queue="work", idempotency_key="k")
        # The maintenance task prunes every lease_ms / 3 of runtime time.
        clock.advance(store.lease_ms / 1000)

        async def pruned() -> bool:
            return await iii.runs.get_async(first.id) is None

        await until(pruned)
        second = await iii.trigger_and_wait_async("job", 2, queue="work", idempotency_key="k")
    assert (second.id != first.id, second.output) == (True, 2)


async def test_drain_after_the_clock_passed_a_runs_retention_finds_it_pruned(
    store_config: StoreConfig,
) -> None:
    """A test of a key's expiry moves a virtual clock past the retention and drains, as
    for any delayed work. The maintenance pass that prunes was due then but had not run
    (nor its prune, a task of its own): drain returned with the run kept and its key
    held, always in memory (the file store's reads gave it the time)."""
    store = attrs.evolve(store_config, result_retention_ms=1000)
    clock = VirtualClock()
    iii = make_app(store, clock)
    iii.register_function("job", lambda n: n)
    async with iii.running():
        first = await iii.trigger_and_wait_async("job", 1, queue="work", idempotency_key="k")
        clock.advance(store.lease_ms / 1000)
        await drain(iii)
        kept = await iii.runs.get_async(first.id)
        second = await iii.trigger_and_wait_async("job", 2, queue="work", idempotency_key="k")
    assert kept is None
    assert (second.id != first.id, second.output) == (True, 2)


class _PrunedBeforeTheWaiterLooks(MemoryStore):
    """A store whose retention ends for a finished run at once: the first read that finds
    it final prunes it first, as a maintenance pass that ran between the run's end and
    the read of a waiter woken by it would."""

    async def get(self, job_id: str) -> Job | None:
        job = await super().get(job_id)
        if job is not None and job.state in ("completed", "dead", "cancelled"):
            await self.prune(float("inf"))
            return await super().get(job_id)
        return job


@pytest.mark.parametrize("outcome", ["completed", "failed", "cancelled"])
async def test_a_waiter_gets_the_result_of_a_run_pruned_before_it_looked(outcome: str) -> None:
    iii = III(
        Config(queues={"work": QueueConfig(name="work", max_retries=1)}),
        clock=VirtualClock(),
        store=_PrunedBeforeTheWaiterLooks(),
        shutdown_grace_ms=0,
    )

    @iii.function("job")
    async def job(n: int) -> int:
        if outcome == "failed":
            raise ValueError("bad")
        return n * 2

    delay = 1000 if outcome == "cancelled" else 0
    async with iii.running(), anyio.create_task_group() as tg:
        receipt = await iii.trigger_async(
            "job", 21, action=TriggerAction.Enqueue(queue="work", delay_ms=delay)
        )
        results = in_background(tg, lambda: iii.runs.wait_async(receipt["messageReceiptId"]))
        await anyio.wait_all_tasks_blocked()  # the waiter has read the run, not final yet
        if outcome == "cancelled":
            await iii.runs.cancel_async(receipt["messageReceiptId"])
        await drain(iii)
    [result] = results
    assert (result.id, result.function_id, result.status) == (
        receipt["messageReceiptId"],
        "job",
        outcome,
    )
    assert result.output == (42 if outcome == "completed" else None)
    assert (result.error.type if result.error else None) == (
        "ValueError" if outcome == "failed" else None
    )


# --- iii.runs.cancel ---------------------------------------------------------------------


async def test_cancel_of_a_queued_run_prevents_its_execution(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    ran: list[Any] = []
    iii.register_function("job", ran.append)
    async with iii.running():
        receipt = await iii.trigger_async(
            "job", "x", action=TriggerAction.Enqueue(queue="work", delay_ms=1000)
        )
        run_id = receipt["messageReceiptId"]
        result = await iii.runs.cancel_async(run_id)
        assert (result.id, result.cancelled, result.status_before, result.message) == (
            run_id,
            True,
            "delayed",
            "cancelled while delayed",
        )
        await drain(iii)
        run = await iii.runs.get_async(run_id)
        assert run is not None and (run.status, run.attempts) == ("cancelled", 0)
        again = await iii.runs.cancel_async(run_id)
        assert (again.cancelled, again.status_before, again.message) == (
            False,
            "cancelled",
            "nothing to cancel: the run already cancelled",
        )
        missing = await iii.runs.cancel_async("no-such-run")
        assert (missing.cancelled, missing.status_before, missing.message) == (
            False,
            None,
            "no such run",
        )
    assert ran == []


async def test_a_second_cancel_of_a_running_run_says_it_was_asked_already(
    store_config: StoreConfig,
) -> None:
    """A run running in another process (a lease held by another owner, and no runner of
    its queue here) is flagged by the first cancel; a second finds the request there and
    says so (``cancelled`` false) instead of reporting a second cancel. Until 2026-12-03
    every repeat said "running; asked to stop"."""
    iii = make_app(store_config)
    async with iii.running():
        store = iii.runtime.store
        now = iii.runtime.clock.now()
        job = NewJob(
            id="elsewhere-1",
            queue="other",
            function_id="job",
            payload="{}",
            created_at=now,
            available_at=now,
            max_attempts=3,
        )
        await store.enqueue([job])
        claimed = await store.claim(
            "other", fifo=False, limit=1, now=now, owner="far-host:1:x", lease_until=now + 60
        )
        first = await iii.runs.cancel_async("elsewhere-1")
        second = await iii.runs.cancel_async("elsewhere-1")
        run = await iii.runs.get_async("elsewhere-1")
    assert [j.id for j in claimed] == ["elsewhere-1"]
    assert (first.cancelled, first.status_before, first.message) == (
        True,
        "running",
        "running; asked to stop",
    )
    assert (second.cancelled, second.status_before, second.message) == (
        False,
        "running",
        "running; already asked to stop",
    )
    assert run is not None and run.status == "running"


async def test_a_waiter_of_a_cancelled_queued_run_gets_a_cancelled_result(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("job", lambda _: "ran")
    action = TriggerAction.Enqueue(queue="work", delay_ms=1000, idempotency_key="k")
    async with iii.running(), anyio.create_task_group() as tg:
        run_id = (await iii.trigger_async("job", 1, action=action))["messageReceiptId"]
        waits = in_background(
            tg,
            lambda: iii.trigger_and_wait_async(
                "job", 1, queue="work", delay_ms=1000, idempotency_key="k"
            ),
        )

        async def waiting() -> bool:
            return run_id in iii.runtime._final_waiters

        await until(waiting)
        await iii.runs.cancel_async(run_id)
    [result] = waits
    assert (result.id, result.ok, result.status, result.output) == (
        run_id,
        False,
        "cancelled",
        None,
    )
    with pytest.raises(RunFailedError, match="ended cancelled"):
        result.unwrap()


async def test_cancel_of_a_running_async_handler_ends_cancelled(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    started = anyio.Event()
    stopped = anyio.Event()

    @iii.function("long")
    async def long(_: Any) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    async with iii.running(), anyio.create_task_group() as tg:
        results = in_background(tg, lambda: iii.trigger_and_wait_async("long", {}, queue="work"))
        await started.wait()
        [running] = await iii.runtime.store.list_jobs(state="running")
        run = await iii.runs.get_async(running.id)
        assert run is not None and run.status == "running"
        result = await iii.runs.cancel_async(running.id)
        assert (result.cancelled, result.status_before) == (True, "running")
        await stopped.wait()
        await drain(iii)
        run = await iii.runs.get_async(running.id)
    assert [(r.status, r.ok) for r in results] == [("cancelled", False)]
    assert run is not None and (run.status, run.attempts, run.output) == ("cancelled", 1, None)


async def test_a_handler_that_cancels_its_own_run_is_stopped_at_its_next_await(
    store_config: StoreConfig,
) -> None:
    # In memory the cancel does not suspend, so it comes before the handler's first
    # suspension, while the queue steps the handler by hand (see _fastpath): the request
    # must still stop it at its next await, as on a file store.
    iii = make_app(store_config)
    reached: list[str] = []

    @iii.function("quitter")
    async def quitter(_: Any) -> str:
        inv = current_invocation()
        assert inv is not None and inv.receipt_id is not None
        answer = await iii.runs.cancel_async(inv.receipt_id)
        reached.append(answer.message)
        await anyio.lowlevel.checkpoint()
        reached.append("after the await")
        return "finished"

    async with iii.running():
        receipt = await iii.trigger_async(
            "quitter", {}, action=TriggerAction.Enqueue(queue="work")
        )
        await drain(iii)
        run = await iii.runs.get_async(receipt["messageReceiptId"])
    assert reached == ["running; asked to stop"]
    assert run is not None and (run.status, run.attempts, run.output) == ("cancelled", 1, None)


async def test_a_handler_that_cancels_its_own_run_and_returns_leaves_the_engine_running(
    store_config: StoreConfig,
) -> None:
    # Cancelled after its first suspension, the handler's task is the one running: a
    # cancel of it then stayed pending past the handler's return and hit its worker's
    # wait for the next job, and the worker's CancelledError cancelled the engine's task
    # group, which ended the `running()` block silently (found by a chaos run).
    iii = make_app(store_config, solo=QueueConfig(name="solo", concurrency=1))
    ran: list[str] = []

    @iii.function("quitter")
    async def quitter(_: Any) -> str:
        await anyio.lowlevel.checkpoint()
        inv = current_invocation()
        assert inv is not None and inv.receipt_id is not None
        answer = await iii.runs.cancel_async(inv.receipt_id)
        ran.append(answer.message)
        return "finished"

    @iii.function("next")
    async def next_job(_: Any) -> str:
        await anyio.lowlevel.checkpoint()
        ran.append("next")
        return "done"

    body_ended = False
    async with iii.running():
        first = await iii.trigger_async("quitter", {}, action=TriggerAction.Enqueue(queue="solo"))
        await drain(iii)
        second = await iii.trigger_async("next", {}, action=TriggerAction.Enqueue(queue="solo"))
        await drain(iii)
        runs = [await iii.runs.get_async(r["messageReceiptId"]) for r in (first, second)]
        body_ended = True
    assert body_ended
    assert ran == ["running; asked to stop", "next"]
    # It returned before any later await could stop it: its run completed.
    assert [(r.status, r.output) for r in runs if r is not None] == [
        ("completed", "finished"),
        ("completed", "done"),
    ]


async def test_cancel_of_a_running_sync_handler_drops_its_result(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    entered = threading.Event()
    release = threading.Event()

    @iii.function("blocking")
    def blocking(_: Any) -> str:
        entered.set()
        release.wait(10)
        return "too late"

    async with iii.running():
        receipt = await iii.trigger_async(
            "blocking", {}, action=TriggerAction.Enqueue(queue="work")
        )
        await anyio.to_thread.run_sync(entered.wait)
        await iii.runs.cancel_async(receipt["messageReceiptId"])
        await drain(iii)
        run = await iii.runs.get_async(receipt["messageReceiptId"])
        release.set()
    assert run is not None and (run.status, run.output) == ("cancelled", None)


async def test_a_run_cancelled_elsewhere_is_not_attempted_again_after_it_fails(
    store_config: StoreConfig,
) -> None:
    """Another process flags the run while it runs here (it only learns of it when it
    renews its lease); the attempt fails before that: the run ends cancelled, not retried."""
    iii = make_app(store_config)
    calls = 0
    started = anyio.Event()
    fail_now = anyio.Event()

    @iii.function("job")
    async def job(_: Any) -> None:
        nonlocal calls
        calls += 1
        started.set()
        await fail_now.wait()
        raise RuntimeError("failed anyway")

    async with iii.running(), anyio.create_task_group() as tg:
        results = in_background(tg, lambda: iii.trigger_and_wait_async("job", {}, queue="work"))
        await started.wait()
        [running] = await iii.runtime.store.list_jobs(state="running")
        await iii.runtime.store.cancel(running.id, iii.clock.now())  # as another process would
        fail_now.set()
        await drain(iii)
    assert [(r.status, calls) for r in results] == [("cancelled", 1)]


async def test_waits_on_a_shared_store_look_for_other_processes_in_one_read_per_poll(
    tmp_path: Path,
) -> None:
    """Forty waits for runs of a queue this process does not serve (another process runs
    them): while they wait, the engine looks whether the runs were settled elsewhere with
    one read of all their states per poll interval, not a read per wait; once another
    process completes them (a second connection to the store, as it would), every wait
    ends with its output. Until 2026-12-03 each wait read its own run every interval."""
    iii = III(
        Config(
            queues={"work": QueueConfig(name="work")},
            store=StoreConfig(store_method="file_based", file_path=str(tmp_path / "store")),
        ),
        shutdown_grace_ms=0,
    )
    ids = [f"elsewhere-{i}" for i in range(40)]
    async with iii.running(), anyio.create_task_group() as tg:
        store = iii.runtime.store
        now = iii.runtime.clock.now()
        await store.enqueue(
            [
                NewJob(
                    id=run_id,
                    queue="theirs",  # no runner here: another process serves it
                    function_id="job",
                    payload="{}",
                    created_at=now,
                    available_at=now,
                    max_attempts=3,
                )
                for run_id in ids
            ]
        )
        gets = 0
        get = store.get

        async def counted_get(job_id: str) -> Job | None:
            nonlocal gets
            gets += 1
            return await get(job_id)

        store.get = counted_get  # type: ignore[method-assign]
        results: list[RunResult] = []

        async def wait(run_id: str) -> None:
            results.append(await iii.runs.wait_async(run_id))

        for run_id in ids:
            tg.start_soon(wait, run_id)
        watcher = _runs._watcher(iii.runtime)
        with anyio.fail_after(10):  # three looks at all forty runs (100 ms apart)
            while watcher.reads < 3:
                await anyio.sleep(0.01)
        # Each wait read its run twice as it began (``runs.wait`` checks it exists), and
        # never since: the three looks read all forty at once.
        assert (len(results), gets) == (0, 80)
        other = SQLiteStore(tmp_path / "store")
        await other.open()
        try:
            claimed = await other.claim(
                "theirs", fifo=False, limit=40, now=now, owner="far-host:1:x", lease_until=now + 60
            )
            await other.finish(
                [
                    completed_outcome(j.id, "far-host:1:x", j.attempts, now, f'"{j.id}"')
                    for j in claimed
                ]
            )
        finally:
            await other.aclose()
        with anyio.fail_after(10):
            while len(results) < 40:
                await anyio.sleep(0.01)
    assert sorted((r.id, r.status, r.output) for r in results) == sorted(
        (run_id, "completed", run_id) for run_id in ids
    )
    assert gets == 120  # and once more each when a look found it final


def elsewhere_job(run_id: str, queue: str, now: float, delay_s: float = 0.0) -> NewJob:
    """A run of a function this process does not have (another process would run it)."""
    return NewJob(
        id=run_id,
        queue=queue,
        function_id="job",
        payload="{}",
        created_at=now,
        available_at=now + delay_s,
        max_attempts=3,
    )


async def test_a_wait_for_another_processes_run_ends_when_the_engine_stops(
    tmp_path: Path,
) -> None:
    """A wait outside the engine (the program's own task) for a run another process would
    settle, when the engine stops: the watcher is cancelled with the engine, and the wait
    ends with ``engine_stopped``, as a thread's does (it got the store's StoreClosedError
    until a later change of 2026-12-03). Until 2026-12-03 the wait was left watched by a
    watcher that had stopped, for ever."""
    iii = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))),
        shutdown_grace_ms=0,
    )
    errors: list[Exception] = []

    async def wait() -> None:
        try:
            await iii.runs.wait_async("far")
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with iii.running():
            now = iii.runtime.clock.now()
            await iii.runtime.store.enqueue([elsewhere_job("far", "theirs", now)])
            tg.start_soon(wait)
            watcher = _runs._watcher(iii.runtime)
            with anyio.fail_after(10):
                while "far" not in watcher._watched:
                    await anyio.sleep(0.01)
        with anyio.fail_after(10):  # for ever without the change
            while not errors:
                await anyio.sleep(0.01)
    assert [(type(e), getattr(e, "code", None)) for e in errors] == [
        (InvocationError, "engine_stopped")
    ]
    assert watcher._watched == {}


async def complete_elsewhere(path: Path, queue: str, now: float) -> None:
    """Claim and complete the runs queued in ``queue`` through a second connection to the
    store, as another process serving it would; each run's output is its id."""
    other = SQLiteStore(path)
    await other.open()
    try:
        claimed = await other.claim(
            queue, fifo=False, limit=100, now=now, owner="far-host:1:x", lease_until=now + 60
        )
        await other.finish(
            [completed_outcome(j.id, "far-host:1:x", j.attempts, now, f'"{j.id}"') for j in claimed]
        )
    finally:
        await other.aclose()


async def test_a_wait_is_looked_at_within_its_own_poll_interval_beside_a_longer_ones(
    tmp_path: Path,
) -> None:
    """The watcher sleeps for the shortest interval among the waits it watches: a wait on
    a queue polled every 100 ms that begins while it sleeps out a minute (for a wait on a
    queue polled every minute) is looked at within its own 100 ms, not after the minute.
    Until 2026-12-03 the sleep already begun held it back."""
    iii = III(
        Config(
            queues={"slow": QueueConfig(name="slow", poll_interval_ms=60_000)},
            store=StoreConfig(store_method="file_based", file_path=str(tmp_path / "store")),
        ),
        shutdown_grace_ms=0,
    )
    async with iii.running(), anyio.create_task_group() as tg:
        store = iii.runtime.store
        now = iii.runtime.clock.now()
        # Due in an hour: this process serves "slow", and must not run it meanwhile.
        await store.enqueue([elsewhere_job("later", "slow", now, delay_s=3600)])
        await store.enqueue([elsewhere_job("soon", "theirs", now)])
        watcher = _runs._watcher(iii.runtime)
        slow = in_background(tg, lambda: iii.runs.wait_async("later"))
        with anyio.fail_after(10):
            while "later" not in watcher._watched:
                await anyio.sleep(0.01)
        fast = in_background(tg, lambda: iii.runs.wait_async("soon"))
        with anyio.fail_after(10):
            while "soon" not in watcher._watched:
                await anyio.sleep(0.01)
        await complete_elsewhere(tmp_path / "store", "theirs", now)
        with anyio.fail_after(10):  # a minute without the change
            while not fast:
                await anyio.sleep(0.01)
        assert [(r.id, r.status, r.output) for r in fast] == [("soon", "completed", "soon")]
        assert (slow, list(watcher._watched)) == ([], ["later"])
        tg.cancel_scope.cancel()


async def test_the_runs_watcher_keeps_no_stopped_engine_alive(tmp_path: Path) -> None:
    """The watcher of an engine's waits is kept in a weak mapping keyed by its runtime, and
    holds no reference to it: once the engine stops, its runtime (with its config, store,
    threads and registry) can be freed. Until 2026-12-03 the watcher held its runtime, so
    every lifecycle that had waited on a file store stayed in memory for good."""
    iii = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))),
        shutdown_grace_ms=0,
    )
    async with iii.running(), anyio.create_task_group() as tg:
        rt = iii.runtime
        now = rt.clock.now()
        await rt.store.enqueue([elsewhere_job("far", "theirs", now)])
        results = in_background(tg, lambda: iii.runs.wait_async("far"))
        watcher = _runs._watcher(rt)
        with anyio.fail_after(10):
            while "far" not in watcher._watched:
                await anyio.sleep(0.01)
        await complete_elsewhere(tmp_path / "store", "theirs", now)
        with anyio.fail_after(10):
            while not results:
                await anyio.sleep(0.01)
    assert [(r.id, r.status) for r in results] == [("far", "completed")]
    stopped = weakref.ref(rt)
    del rt
    gc.collect()
    assert stopped() is None
