"""Waiting inside a handler (docs/design.md, "Waiting inside a handler"): a waiting queued
handler lends its slot and takes it back when one is free; waits that could never end fail
fast with ``DeadlockError``; parallel fan-in from one handler works. On both stores."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    DeadlockError,
    InvocationError,
    NonRetryableError,
    QueueConfig,
    RunResult,
    StoreConfig,
    TriggerAction,
    current_invocation,
)
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app(store: StoreConfig) -> III:
    queues = {
        "work": QueueConfig(name="work"),
        "one": QueueConfig(name="one", concurrency=1),
        "other": QueueConfig(name="other", concurrency=1),
        "five": QueueConfig(name="five", concurrency=5),
        "fifo": QueueConfig(name="fifo", type="fifo", message_group_field="g", concurrency=1),
    }
    return III(Config(queues=queues, store=store), clock=VirtualClock(), shutdown_grace_ms=0)


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition()`` holds (bounded; no wall-clock sleeps)."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.lowlevel.checkpoint()


async def wait_all(iii: III, *waits: Callable[[], Awaitable[RunResult]]) -> list[RunResult]:
    """Run the waits in parallel while draining the app; their results in order."""
    results: list[RunResult | None] = [None] * len(waits)

    async def run(index: int) -> None:
        results[index] = await waits[index]()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for index in range(len(waits)):
                tg.start_soon(run, index)
            await drain(iii)
    return [r for r in results if r is not None]


# --- lending the slot --------------------------------------------------------------------


@pytest.mark.parametrize("fan_in", ["gather", "task_group"])
@pytest.mark.parametrize("parent_queue", ["five", None])
async def test_100_parallel_waits_inside_one_handler_on_a_queue_of_5(
    store_config: StoreConfig, fan_in: str, parent_queue: str | None
) -> None:
    """From a handler queued on that same queue (it lends its one slot, once) or called
    synchronously: all 100 return, and never more than 5 leaves run at once."""
    iii = make_app(store_config)
    running = 0
    peak = 0

    @iii.function("leaf")
    async def leaf(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.lowlevel.checkpoint()
        running -= 1
        return n * n

    @iii.function("fan_out")
    async def fan_out(count: int) -> int:
        results: list[RunResult | None] = [None] * count
        if fan_in == "gather":
            results[:] = await asyncio.gather(
                *(iii.trigger_and_wait_async("leaf", n, queue="five") for n in range(count))
            )
        else:

            async def one(n: int) -> None:
                results[n] = await iii.trigger_and_wait_async("leaf", n, queue="five")

            async with anyio.create_task_group() as tg:
                for n in range(count):
                    tg.start_soon(one, n)
        return sum(r.unwrap() for r in results if r is not None)

    async with iii.running():
        if parent_queue is None:
            total = await iii.trigger_async("fan_out", 100, timeout_ms=60_000)
        else:
            [result] = await wait_all(
                iii, lambda: iii.trigger_and_wait_async("fan_out", 100, queue=parent_queue)
            )
            total = result.unwrap()
        assert iii.runtime.runners["five"].lent == 0
    assert total == sum(n * n for n in range(100))
    assert peak <= 5


async def test_the_workers_started_for_lent_slots_end_with_the_waits(
    store_config: StoreConfig,
) -> None:
    """Each lent slot gets a worker of its own; a burst of 20 waiting handlers on a queue
    of 1 left 21 workers idle in it for the life of the engine (a high-water mark that
    the next bigger burst raised)."""
    iii = make_app(store_config)
    release = anyio.Event()

    @iii.function("child")
    async def child(n: int) -> int:
        await release.wait()
        return n

    @iii.function("parent")
    async def parent(n: int) -> int:
        return int((await iii.trigger_and_wait_async("child", n, queue="work")).unwrap())

    async with iii.running():
        runner = iii.runtime.runners["one"]
        for n in range(20):
            await iii.trigger_async("parent", n, action=TriggerAction.Enqueue(queue="one"))
        await until(lambda: runner.lent == 20)
        busy = runner._workers
        release.set()
        await drain(iii)
        assert (busy, runner.lent, runner._workers, len(runner._idle)) == (21, 0, 1, 1)
        assert (await iii.queue_stats_async("one")).completed == 20


async def test_a_handler_waits_for_a_job_of_its_own_concurrency_1_queue(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("child", lambda n: n + 1)

    @iii.function("parent")
    async def parent(n: int) -> int:
        result = await iii.trigger_and_wait_async("child", n, queue="one")
        batch = await iii.batch_trigger_and_wait_async("child", [n, n], queue="one")
        return int(result.unwrap()) * 10 + int(sum(batch.outputs))

    @iii.function("sync_parent")
    def sync_parent(n: int) -> int:
        return int(iii.trigger_and_wait("child", n, queue="one").unwrap()) * 100

    async with iii.running():
        results = await wait_all(
            iii,
            lambda: iii.trigger_and_wait_async("parent", 1, queue="one"),
            lambda: iii.trigger_and_wait_async("sync_parent", 1, queue="one"),
        )
    assert [r.unwrap() for r in results] == [24, 200]


async def test_more_waiting_sync_handlers_than_the_pools_bound_still_finish(
    store_config: StoreConfig,
) -> None:
    """Each sync handler that waits holds its pool thread (concurrency 1: a pool of at most
    36). 60 of them wait at once for a child on their own queue; the children still get
    threads, and every parent ends with its child's value."""
    iii = make_app(store_config)
    iii.register_function("leaf", lambda n: n * 2)

    def parent(n: int) -> int:  # runs in the queue's threads
        return int(iii.trigger_and_wait("leaf", n, queue="one").unwrap())

    iii.register_function("parent", parent)
    async with iii.running():
        # One transaction: every parent is queued before the first child, so all 60 are
        # waiting, each in a thread, before any child runs.
        ids = await iii.batch_trigger_async("parent", list(range(60)), queue="one")
        await drain(iii, timeout=20)
        runs = [await iii.runs.get_async(i) for i in ids]
        pool = iii.runtime.runners["one"].threads
        assert len(pool._threads) > pool.max_threads
    assert [(r.status, r.output) for r in runs if r is not None] == [
        ("completed", 2 * n) for n in range(60)
    ]


async def test_a_resumed_waiter_takes_its_slot_back_only_when_one_is_free(
    store_config: StoreConfig,
) -> None:
    """Concurrency 1: while the parent waits, another job of its queue runs in its slot;
    when the parent's wait ends first, it resumes only after that job is done."""
    iii = make_app(store_config)
    log: list[str] = []
    child_started, child_go = anyio.Event(), anyio.Event()
    other_started, other_go = anyio.Event(), anyio.Event()

    @iii.function("child")
    async def child(_: Any) -> None:
        child_started.set()
        await child_go.wait()

    @iii.function("parent")
    async def parent(_: Any) -> None:
        await iii.trigger_and_wait_async("child", {}, queue="other")
        log.append("parent resumed")

    @iii.function("other")
    async def other(_: Any) -> None:
        other_started.set()
        await other_go.wait()
        log.append("other done")

    async with iii.running():
        runner = iii.runtime.runners["one"]
        await iii.trigger_async("parent", {}, action=TriggerAction.Enqueue(queue="one"))
        await child_started.wait()
        await iii.trigger_async("other", {}, action=TriggerAction.Enqueue(queue="one"))
        await other_started.wait()  # ran in the parent's lent slot
        child_go.set()
        await until(lambda: runner._room is not None or bool(log))
        assert log == []  # the parent's wait is over, but it waits for its slot
        other_go.set()
        await drain(iii)
        assert (runner.lent, runner.running) == (0, 0)
    assert log == ["other done", "parent resumed"]


async def test_a_handler_waiting_for_its_slot_resumes_when_the_worker_lends_it(
    store_config: StoreConfig,
) -> None:
    """Concurrency 1: A's wait ends while B works in A's lent slot; when B starts a wait of
    its own (lending the slot), A resumes at once."""
    iii = make_app(store_config)
    log: list[str] = []
    go = {name: anyio.Event() for name in ("a_child", "b", "b_child")}
    b_working = anyio.Event()

    @iii.function("child")
    async def child(name: str) -> None:
        await go[name].wait()

    @iii.function("a")
    async def a(_: Any) -> None:
        await iii.trigger_and_wait_async("child", "a_child", queue="five")
        log.append("a resumed")

    @iii.function("b")
    async def b(_: Any) -> None:
        b_working.set()
        await go["b"].wait()
        await iii.trigger_and_wait_async("child", "b_child", queue="five")
        log.append("b resumed")

    async with iii.running():
        runner = iii.runtime.runners["one"]
        await iii.trigger_async("a", {}, action=TriggerAction.Enqueue(queue="one"))
        await until(lambda: runner.lent == 1)
        await iii.trigger_async("b", {}, action=TriggerAction.Enqueue(queue="one"))
        await b_working.wait()
        go["a_child"].set()
        await until(lambda: runner._resuming == 1)  # A waits for its slot, B works
        go["b"].set()
        await until(lambda: bool(log))
        assert log == ["a resumed"]
        go["b_child"].set()
        with anyio.fail_after(10):
            await drain(iii)
    assert log == ["a resumed", "b resumed"]


async def test_two_handlers_waiting_for_their_slots_do_not_wait_for_each_other(
    store_config: StoreConfig,
) -> None:
    """Concurrency 1: F and G wait; K works in the slots they lent. Both waits end while K
    works, then K finishes: F and G resume one after the other."""
    iii = make_app(store_config)
    log: list[str] = []
    go = {name: anyio.Event() for name in ("f_child", "g_child", "k")}
    k_working = anyio.Event()

    @iii.function("child")
    async def child(name: str) -> None:
        await go[name].wait()

    @iii.function("waiter")
    async def waiter(name: str) -> None:
        await iii.trigger_and_wait_async("child", f"{name}_child", queue="five")
        log.append(name)

    @iii.function("k")
    async def k(_: Any) -> None:
        k_working.set()
        await go["k"].wait()
        log.append("k")

    async with iii.running():
        runner = iii.runtime.runners["one"]
        for name in ("f", "g"):
            await iii.trigger_async("waiter", name, action=TriggerAction.Enqueue(queue="one"))
        await until(lambda: runner.lent == 2)
        await iii.trigger_async("k", {}, action=TriggerAction.Enqueue(queue="one"))
        await k_working.wait()
        go["f_child"].set()
        go["g_child"].set()
        await until(lambda: runner._resuming == 2)
        go["k"].set()
        with anyio.fail_after(10):
            await drain(iii)
        assert (runner.lent, runner.running, runner._resuming) == (0, 0, 0)
    assert log[0] == "k" and sorted(log[1:]) == ["f", "g"]


async def test_a_waiting_handler_that_is_cancelled_gives_its_slot_back(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    child_started, child_go = anyio.Event(), anyio.Event()
    parent_ids: list[str] = []

    @iii.function("child")
    async def child(_: Any) -> str:
        child_started.set()
        await child_go.wait()
        return "child done"

    @iii.function("parent")
    async def parent(_: Any) -> None:
        invocation = current_invocation()
        assert invocation is not None and invocation.receipt_id is not None
        parent_ids.append(invocation.receipt_id)
        await iii.trigger_and_wait_async("child", {}, queue="other")

    async with iii.running():
        await iii.trigger_async("parent", {}, action=TriggerAction.Enqueue(queue="one"))
        await child_started.wait()
        runner = iii.runtime.runners["one"]
        assert runner.lent == 1
        await iii.runs.cancel_async(parent_ids[0])
        await until(lambda: runner.running == 0)
        assert (runner.lent, iii.runtime.run_waiters) == (0, {})
        child_go.set()
        await drain(iii)
        parent_run = await iii.runs.get_async(parent_ids[0])
        [child_job] = await iii.runtime.store.list_jobs("other")
    assert parent_run is not None and parent_run.status == "cancelled"
    assert (child_job.state, child_job.output) == ("completed", '"child done"')


# --- waits that could never end ----------------------------------------------------------


async def test_waiting_for_a_job_of_ones_own_fifo_group_fails_fast(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    caught: list[BaseException] = []

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        if data["n"] == 0:
            try:
                await iii.trigger_and_wait_async("step", {"g": data["g"], "n": 1}, queue="fifo")
            except InvocationError as exc:
                caught.append(exc)
                raise
        return data["n"]

    async with iii.running():
        [result] = await wait_all(
            iii, lambda: iii.trigger_and_wait_async("step", {"g": "A", "n": 0}, queue="fifo")
        )
        jobs = await iii.runtime.store.list_jobs()
    [error] = caught
    assert isinstance(error, DeadlockError) and isinstance(error, NonRetryableError)
    assert error.code == "deadlock"
    assert error.message.startswith(
        "a handler of FIFO queue 'fifo' (group 'A') would wait for a job of its own group"
    )
    # Not retried (a retry cannot help), and the child was never stored.
    assert (result.status, [j.attempts for j in jobs]) == ("failed", [1])
    assert result.error is not None and result.error.type == "DeadlockError"


async def test_waiting_by_id_for_a_queued_job_of_ones_own_fifo_group_fails_fast(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        if data["n"] == 0:
            receipt = await iii.trigger_async(
                "step", {"g": data["g"], "n": 1}, action=TriggerAction.Enqueue(queue="fifo")
            )
            try:
                await iii.runs.wait_async(receipt["messageReceiptId"])
            except DeadlockError as exc:
                return exc.code
        return data["n"]

    async with iii.running():
        [result] = await wait_all(
            iii, lambda: iii.trigger_and_wait_async("step", {"g": "A", "n": 0}, queue="fifo")
        )
        jobs = await iii.runtime.store.list_jobs("fifo")
    assert result.output == "deadlock"
    assert [(j.state, j.output) for j in jobs] == [("completed", '"deadlock"'), ("completed", "1")]


async def test_a_fifo_handler_may_wait_for_another_group_of_its_queue(
    store_config: StoreConfig,
) -> None:
    """Concurrency 1: the waiter lends its slot to the other group. ``True`` and ``1`` are
    different groups (the store keys groups by their JSON text)."""
    iii = make_app(store_config)

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        if data["n"] == 0:
            for group in ("B", 1):
                result = await iii.trigger_and_wait_async(
                    "step", {"g": group, "n": 1}, queue="fifo"
                )
                assert result.ok
        return data["n"]

    async with iii.running():
        [result] = await wait_all(
            iii, lambda: iii.trigger_and_wait_async("step", {"g": True, "n": 0}, queue="fifo")
        )
    assert (result.status, result.output) == ("completed", 0)


async def test_a_deadlock_through_a_chain_of_waits_fails_fast(store_config: StoreConfig) -> None:
    """FIFO group A waits for a relay (another queue), which waits for group A."""
    iii = make_app(store_config)

    @iii.function("relay")
    async def relay(_: Any) -> Any:
        try:
            await iii.trigger_and_wait_async("step", {"g": "A", "n": 1}, queue="fifo")
        except DeadlockError as exc:
            return exc.message
        return "no deadlock"

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        if data["n"] == 0:
            return (await iii.trigger_and_wait_async("relay", {}, queue="work")).unwrap()
        return data["n"]

    async with iii.running():
        [result] = await wait_all(
            iii, lambda: iii.trigger_and_wait_async("step", {"g": "A", "n": 0}, queue="fifo")
        )
        parent = (await iii.runtime.store.list_jobs("fifo"))[0]
    assert result.output == (
        f"run {parent.id} of FIFO queue 'fifo' (group 'A') waits for this handler, and so "
        "would wait for a job of its own group, which cannot start until that handler "
        "returns: enqueue it without waiting, or use another group or queue"
    )


async def test_waiting_for_ones_own_run_through_its_idempotency_key_fails_fast(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)

    @iii.function("again")
    async def again(_: Any) -> str:
        try:
            await iii.trigger_and_wait_async("again", {}, queue="work", idempotency_key="k")
        except DeadlockError as exc:
            return exc.message
        return "no deadlock"

    async with iii.running():
        [result] = await wait_all(
            iii,
            lambda: iii.trigger_and_wait_async("again", {}, queue="work", idempotency_key="k"),
        )
    assert result.output == (
        f"the idempotency key names run {result.id}, which is this handler's own run or "
        "waits for it: it cannot finish before this wait does"
    )


async def test_a_batch_wait_whose_key_names_a_run_of_its_own_group_stores_nothing(
    store_config: StoreConfig,
) -> None:
    """A FIFO handler of group A batch-waits on another queue, and one idempotency key
    names a queued run of group A: ``DeadlockError``, and none of the batch is stored.
    Until 2026-12-03 the check ran after the enqueue: the batch's other runs were stored
    and ran, and their ids were never handed back."""
    iii = make_app(store_config)
    ran: list[Any] = []

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        ran.append(data["n"])
        if data["n"] == "parent":
            try:
                await iii.batch_trigger_and_wait_async(
                    "step",
                    [{"n": "dup"}, {"n": "new"}],
                    queue="work",
                    idempotency_keys=iter(["k2", None]),  # any iterable, as the payloads
                )
            except DeadlockError as exc:
                return exc.message
            return "no deadlock"
        return data["n"]

    async with iii.running():
        fifo = TriggerAction.Enqueue(queue="fifo")
        parent = await iii.trigger_async("step", {"g": "A", "n": "parent"}, action=fifo)
        await iii.trigger_async(  # behind the parent in group A, holding key k2
            "step",
            {"g": "A", "n": "k2-run"},
            action=TriggerAction.Enqueue(queue="fifo", idempotency_key="k2"),
        )
        await drain(iii)
        result = await iii.runs.get_async(parent["messageReceiptId"])
        on_work = await iii.runtime.store.list_jobs("work")
    assert result is not None and result.output is not None
    assert "would wait for a job of its own group" in result.output
    assert on_work == []
    assert ran == ["parent", "k2-run"]


def test_a_string_of_batch_keys_is_refused_not_read_as_one_letter_keys() -> None:
    iii = III(shutdown_grace_ms=0)
    iii.register_function("f", lambda x: x)
    with iii, pytest.raises(InvocationError, match="idempotency_keys must be a list"):
        iii.batch_trigger("f", [1, 2], queue="default", idempotency_keys="ab")


async def test_a_stopped_sync_handler_that_waits_no_longer_lends_its_slot() -> None:
    """A sync handler that waits (its slot lent) and then times out: its thread runs on,
    abandoned, and its wait with it, but its slot is free now, not still lent on top of
    that: the queue runs no more than ``concurrency`` handlers."""
    clock = VirtualClock()
    queues = {
        "one": QueueConfig(name="one", concurrency=1, timeout_ms=1000, max_retries=0),
        "other": QueueConfig(name="other", concurrency=1),
    }
    iii = III(Config(queues=queues), clock=clock, shutdown_grace_ms=0)
    child_done = threading.Event()
    gates = {"d": threading.Event(), "e": threading.Event()}
    entered: list[str] = []

    def child(_: Any) -> None:
        assert child_done.wait(30)

    def parent(_: Any) -> None:  # waits, its slot lent, and times out meanwhile
        iii.trigger_and_wait("child", None, queue="other")

    def gated(name: str) -> None:
        entered.append(name)
        assert gates[name].wait(30)

    iii.register_function("child", child)
    iii.register_function("parent", parent)
    iii.register_function("gated", gated)
    runner = None
    try:
        async with iii.running():
            runner = iii.runtime.runners["one"]
            action = TriggerAction.Enqueue(queue="one")
            receipt = await iii.trigger_async("parent", None, action=action)
            await until(lambda: runner is not None and runner.lent == 1)
            clock.advance(0.5)
            await iii.trigger_async("gated", "d", action=action)  # runs in the lent slot
            await until(lambda: runner is not None and runner.running == 2)
            await iii.trigger_async("gated", "e", action=action)
            clock.advance(0.5)  # the parent times out; "d" (started at 0.5) runs on
            await until(lambda: runner is not None and runner.running == 1)
            await anyio.wait_all_tasks_blocked()
            assert (runner.running, runner.lent) == (1, 0)
            gates["d"].set()
            await until(lambda: entered == ["d", "e"])
            gates["e"].set()
            child_done.set()
            await drain(iii)
            run = await iii.runs.get_async(receipt["messageReceiptId"])
    finally:
        child_done.set()
        for gate in gates.values():
            gate.set()
    assert entered == ["d", "e"]
    assert run is not None and run.status == "failed"
    assert run.error is not None and "timed out" in run.error.message


# --- a sync handler stopped while it waits, and its retry ------------------------------
#
# A stopped sync handler's thread runs on, abandoned, and so do its waits; a retry of the
# same job (same receipt id) may run meanwhile. The slot bookkeeping is per attempt.


def retrying_app(max_retries: int) -> tuple[III, VirtualClock]:
    clock = VirtualClock()
    queues = {
        "one": QueueConfig(
            name="one", concurrency=1, timeout_ms=1000, max_retries=max_retries, backoff_ms=0
        ),
        "other": QueueConfig(name="other", concurrency=4),
    }
    return III(Config(queues=queues), clock=clock, shutdown_grace_ms=0), clock


def gated_children(
    iii: III, names: tuple[str, ...]
) -> tuple[dict[str, threading.Event], list[str]]:
    gates = {name: threading.Event() for name in names}
    entered: list[str] = []

    def child(name: str) -> None:
        entered.append(name)
        assert gates[name].wait(30)

    iii.register_function("child", child)
    iii.register_function("gated", child)
    return gates, entered


def attempt_now() -> int:
    invocation = current_invocation()
    assert invocation is not None
    return invocation.attempt


async def first_attempt_times_out_waiting(iii: III, clock: VirtualClock) -> Any:
    """Enqueue "parent" on queue "one"; once its first attempt waits (its slot lent), let
    it time out: its thread and its wait run on, abandoned, and the retry starts."""
    runner = iii.runtime.runners["one"]
    await iii.trigger_async("parent", None, action=TriggerAction.Enqueue(queue="one"))
    await until(lambda: runner.lent == 1)
    clock.advance(1.0)
    return runner


async def only_the_retry_works(
    iii: III, gates: dict[str, threading.Event], entered: list[str]
) -> None:
    """With the retry working in the only slot, another job does not start; once all is
    released and drained, no slot is lent and no thread held."""
    runner = iii.runtime.runners["one"]
    await iii.trigger_async("gated", "g", action=TriggerAction.Enqueue(queue="one"))
    await anyio.wait_all_tasks_blocked()
    assert (runner.running, runner.lent, "g" in entered) == (1, 0, False)
    for gate in gates.values():
        gate.set()
    await drain(iii)
    await until(lambda: settled_lending(iii) == (0, 0, 0, 0))


def settled_lending(iii: III) -> tuple[int, int, int, int]:
    runner = iii.runtime.runners["one"]
    return (runner.threads._held, len(runner._lenders), len(runner._orphans), runner.lent)


async def test_an_abandoned_attempts_next_wait_does_not_lend_its_retrys_slot() -> None:
    iii, clock = retrying_app(max_retries=2)
    gates, entered = gated_children(iii, ("c1", "c2", "a2", "g"))

    def parent(_: Any) -> None:
        if attempt_now() == 1:
            iii.trigger_and_wait("child", "c1", queue="other")
            iii.trigger_and_wait("child", "c2", queue="other")  # abandoned by now
        else:
            entered.append("a2")
            assert gates["a2"].wait(30)

    iii.register_function("parent", parent)
    try:
        async with iii.running():
            await first_attempt_times_out_waiting(iii, clock)
            await until(lambda: "a2" in entered)
            gates["c1"].set()  # the abandoned thread's first wait ends; it waits again
            await until(lambda: "c2" in entered)
            await only_the_retry_works(iii, gates, entered)
    finally:
        for gate in gates.values():
            gate.set()


async def test_a_retrys_wait_and_the_abandoned_attempts_wait_are_counted_apart() -> None:
    iii, clock = retrying_app(max_retries=2)
    gates, entered = gated_children(iii, ("c1", "c3", "a2", "g"))

    def parent(_: Any) -> None:
        if attempt_now() == 1:
            iii.trigger_and_wait("child", "c1", queue="other")
        else:
            iii.trigger_and_wait("child", "c3", queue="other")
            entered.append("a2")
            assert gates["a2"].wait(30)

    iii.register_function("parent", parent)
    try:
        async with iii.running():
            runner = await first_attempt_times_out_waiting(iii, clock)
            await until(lambda: "c3" in entered and runner.lent == 1)
            gates["c3"].set()  # the retry's wait ends first: it takes its slot back
            await until(lambda: "a2" in entered)
            await only_the_retry_works(iii, gates, entered)
    finally:
        for gate in gates.values():
            gate.set()


async def test_two_attempts_stopped_while_waiting_each_end_their_own_wait() -> None:
    iii, clock = retrying_app(max_retries=3)
    gates, entered = gated_children(iii, ("c1", "c3", "a3"))
    errors: list[BaseException] = []

    def parent(_: Any) -> None:
        attempt = attempt_now()
        try:
            if attempt == 1:
                iii.trigger_and_wait("child", "c1", queue="other")
            elif attempt == 2:
                iii.trigger_and_wait("child", "c3", queue="other")
            else:
                entered.append("a3")
                assert gates["a3"].wait(30)
        except BaseException as exc:
            errors.append(exc)
            raise

    iii.register_function("parent", parent)
    try:
        async with iii.running():
            runner = await first_attempt_times_out_waiting(iii, clock)
            await until(lambda: "c3" in entered and runner.lent == 1)
            clock.advance(1.0)  # attempt 2 times out too
            await until(lambda: "a3" in entered)
            assert (len(runner._orphans), runner.lent) == (2, 0)
            gates["c1"].set()
            await until(lambda: len(runner._orphans) == 1)
            gates["c3"].set()
            await until(lambda: len(runner._orphans) == 0)
            gates["a3"].set()
            await drain(iii)
            await until(lambda: settled_lending(iii) == (0, 0, 0, 0))
    finally:
        for gate in gates.values():
            gate.set()
    assert errors == []


async def test_a_sync_handler_stopped_while_it_waits_for_room_stops_counting_at_once() -> None:
    """P1 (sync) and P2 (async) both wait and W runs in a lent slot; both waits end and
    both wait for room. P1 times out: P2 must still wait for W, not count P1 any more."""
    iii, clock = retrying_app(max_retries=1)
    gates, entered = gated_children(iii, ("c1", "c2", "w"))
    p2_go = anyio.Event()

    def p1(_: Any) -> None:
        iii.trigger_and_wait("child", "c1", queue="other")
        entered.append("p1 works")

    async def p2(_: Any) -> None:
        await iii.trigger_and_wait_async("child", "c2", queue="other")
        entered.append("p2 works")
        await p2_go.wait()

    iii.register_function("p1", p1)
    iii.register_function("p2", p2)
    try:
        async with iii.running():
            runner = iii.runtime.runners["one"]
            one = TriggerAction.Enqueue(queue="one")
            await iii.trigger_async("p1", None, action=one)
            await until(lambda: runner.lent == 1)
            clock.advance(0.5)
            await iii.trigger_async("p2", None, action=one)
            await until(lambda: runner.lent == 2)
            await iii.trigger_async("gated", "w", action=one)
            await until(lambda: "w" in entered)
            gates["c2"].set()  # P2 first in the room's line
            await until(lambda: runner._resuming == 1)
            gates["c1"].set()
            await until(lambda: runner._resuming == 2)
            clock.advance(0.5)  # P1 times out while it waits for room
            await until(lambda: runner._resuming == 1)
            await anyio.wait_all_tasks_blocked()
            assert "p2 works" not in entered  # W still works in the only slot
            gates["w"].set()
            await until(lambda: "p2 works" in entered)
            p2_go.set()
            await drain(iii)
    finally:
        p2_go.set()
        for gate in gates.values():
            gate.set()


async def test_in_memory_a_wait_for_a_run_redriven_as_it_died_hears_of_its_new_end() -> None:
    """The run dies and is redriven before the woken waiter reads it: the waiter finds it
    live again and waits on. Until 2026-12-03 its death had taken the wait off the run's
    list of waiters, for good, so the wait never heard of the run's new end (found by a
    chaos run). In memory only: on a file store the waiter reads the death before the
    redrive's commit (and a wait there also polls the store for a run's end)."""
    iii = make_app(StoreConfig())
    attempts: list[int] = []

    @iii.function("flaky")
    async def flaky(_: Any) -> str:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:
            raise NonRetryableError("first time")
        return "second time"

    async def redrive(job: Any, **_: Any) -> None:
        # An async hook starts before the run's waiters are woken, so it runs first.
        await iii.dlq_redrive_async("work", [job.id])

    iii.on("job_dead_lettered", redrive)
    answers: list[RunResult] = []

    async def wait(run_id: str) -> None:
        answers.append(await iii.runs.wait_async(run_id))

    async with iii.running(), anyio.create_task_group() as tg:
        receipt = await iii.trigger_async(
            "flaky", {}, action=TriggerAction.Enqueue(queue="work")
        )
        tg.start_soon(wait, receipt["messageReceiptId"])
        await anyio.lowlevel.checkpoint()
        await drain(iii)
        with anyio.fail_after(10):  # for ever without the change
            await until(lambda: bool(answers))
    assert attempts == [1, 2]
    assert [(r.status, r.output) for r in answers] == [("completed", "second time")]
