"""Corners of the runs API found by a review (2026-12-03), on both stores: a cancelled
delayed FIFO head lets its group move on, batch keys and wait timeouts are checked before
anything is stored, any iterable of payloads is enqueued, a key that names a run of the
waiter's own group is a deadlock, a zero timeout still reports a finished run, and the
batch wait takes the batch's options (a waiter blocked at shutdown: test_calls_from_threads)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    DeadlockError,
    InvocationError,
    QueueConfig,
    StoreConfig,
    TriggerAction,
)
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app(store: StoreConfig, clock: VirtualClock | None = None) -> III:
    queues = {
        "work": QueueConfig(name="work", max_retries=3, backoff_ms=1000),
        "orders": QueueConfig(name="orders", type="fifo", message_group_field="customer"),
    }
    return III(
        Config(queues=queues, store=store), clock=clock or VirtualClock(), shutdown_grace_ms=0
    )


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Yield to the loop until ``condition()`` holds (bounded; no wall-clock sleeps)."""
    with anyio.fail_after(10):
        while not await condition():
            await anyio.lowlevel.checkpoint()


async def test_cancelling_a_delayed_fifo_head_lets_its_group_move_on_at_once(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("ship", lambda order: order["n"])
    async with iii.running():
        head = await iii.trigger_async(
            "ship",
            {"customer": "c1", "n": 1},
            action=TriggerAction.Enqueue(queue="orders", delay_ms=3_600_000),
        )
        behind = await iii.trigger_async(
            "ship", {"customer": "c1", "n": 2}, action=TriggerAction.Enqueue(queue="orders")
        )
        rt = iii.runtime

        async def quiet() -> bool:
            return rt.is_quiet()

        await until(quiet)  # the dispatcher sleeps until the head's due time, an hour on
        cancelled = await iii.runs.cancel_async(head["messageReceiptId"])

        async def behind_done() -> bool:
            run = await iii.runs.get_async(behind["messageReceiptId"])
            return run is not None and run.status == "completed"

        await until(behind_done)  # no clock advance: the cancel woke the queue
        run = await iii.runs.get_async(behind["messageReceiptId"])
    assert cancelled.message == "cancelled while delayed"
    assert run is not None and run.output == 2


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([None, 7], "item 1: idempotency_key must be a string, got 7"),
        ([["x"], None], "item 0: idempotency_key must be a string, got ['x']"),
    ],
)
async def test_a_batch_with_a_key_that_is_not_a_string_stores_nothing(
    store_config: StoreConfig, keys: list[Any], message: str
) -> None:
    iii = make_app(store_config)
    iii.register_function("noop", lambda _: None)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.batch_trigger_async(
                "noop", [{"n": 0}, {"n": 1}], queue="work", idempotency_keys=keys
            )
        stored = await iii.runtime.store.list_jobs()
    assert (caught.value.code, str(caught.value)) == ("enqueue_error", f"enqueue_error: {message}")
    assert stored == []


async def test_a_key_with_a_lone_surrogate_is_refused_by_both_stores_naming_the_item(
    store_config: StoreConfig,
) -> None:
    """A key that is not valid Unicode text (a lone surrogate, as from a bad decode with
    ``surrogateescape``) was taken by the memory store and refused by the file store's
    UTF-8 encoding as a failure of the store, "could not store the job"."""
    iii = make_app(store_config)
    iii.register_function("noop", lambda _: None)
    bad = "order-\udc80"
    async with iii.running():
        with pytest.raises(InvocationError) as single:
            action = TriggerAction.Enqueue(queue="work", idempotency_key=bad)
            await iii.trigger_async("noop", {}, action=action)
        with pytest.raises(InvocationError) as batch:
            await iii.batch_trigger_async("noop", [1, 2], queue="work", idempotency_keys=["a", bad])
        stored = await iii.runtime.store.list_jobs()
    why = f"idempotency_key must be valid Unicode text (no lone surrogate), got {bad!r}"
    assert (single.value.code, single.value.message) == ("enqueue_error", why)
    assert (batch.value.code, batch.value.message) == ("enqueue_error", f"item 1: {why}")
    assert stored == []


@pytest.mark.parametrize("timeout_ms", ["1000", -5, True, float("nan")])
async def test_a_bad_wait_timeout_is_refused_before_anything_is_enqueued(
    store_config: StoreConfig, timeout_ms: Any
) -> None:
    iii = make_app(store_config)
    calls: list[Any] = []
    iii.register_function("noop", calls.append)
    expected = (
        f"invalid_request: timeout_ms must be a number of milliseconds >= 0, got {timeout_ms!r}"
    )
    async with iii.running():
        attempts: list[Callable[[], Awaitable[Any]]] = [
            lambda: iii.trigger_and_wait_async(
                "noop", {"n": 0}, queue="work", timeout_ms=timeout_ms
            ),
            lambda: iii.batch_trigger_and_wait_async(
                "noop", [{"n": 1}], queue="work", timeout_ms=timeout_ms
            ),
        ]
        errors = []
        for attempt in attempts:
            with pytest.raises(InvocationError) as caught:
                await attempt()
            errors.append(str(caught.value))
        await drain(iii)
        stored = await iii.runtime.store.list_jobs()
        receipt = await iii.trigger_async(
            "noop", {"n": 2}, action=TriggerAction.Enqueue(queue="work")
        )
        with pytest.raises(InvocationError) as waited:
            await iii.runs.wait_async(receipt["messageReceiptId"], timeout_ms=timeout_ms)
    assert errors == [expected, expected]
    assert str(waited.value) == expected
    assert stored == [] and calls == []


async def test_a_batch_wait_takes_any_iterable_of_payloads_on_a_fifo_queue(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("ship", lambda order: order["n"] * 10)
    async with iii.running():
        batch = await iii.batch_trigger_and_wait_async(
            "ship", ({"customer": f"c{n % 2}", "n": n} for n in range(3)), queue="orders"
        )
    assert batch.ok and batch.outputs == [0, 10, 20]


async def test_a_key_naming_a_run_behind_the_waiter_in_its_own_group_is_a_deadlock(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("child", lambda order: "child done")
    outcome: list[str] = []

    @iii.function("parent")
    async def parent(order: dict[str, str]) -> None:
        # A run of this handler's group, queued behind it, holds the key "k".
        await iii.trigger_async(
            "child",
            {"customer": order["customer"]},
            action=TriggerAction.Enqueue(queue="orders", idempotency_key="k"),
        )
        try:
            await iii.trigger_and_wait_async(
                "child", {"customer": "someone else"}, queue="orders", idempotency_key="k"
            )
            outcome.append("returned")
        except DeadlockError as exc:
            outcome.append(str(exc))

    async with iii.running():
        await iii.trigger_async(
            "parent", {"customer": "c1"}, action=TriggerAction.Enqueue(queue="orders")
        )
        with anyio.fail_after(10):
            await drain(iii)
    assert len(outcome) == 1
    assert "would wait for a job of its own group" in outcome[0]


async def test_a_zero_timeout_wait_reports_a_finished_run(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    iii.register_function("answer", lambda _: 42)
    async with iii.running():
        done = await iii.trigger_and_wait_async("answer", {}, queue="work", idempotency_key="k")
        waited = await iii.runs.wait_async(done.id, timeout_ms=0)
        again = await iii.trigger_and_wait_async(
            "answer", {}, queue="work", idempotency_key="k", timeout_ms=0
        )
    assert (waited.status, waited.output) == ("completed", 42)
    assert (again.id, again.status, again.output) == (done.id, "completed", 42)


async def test_a_batch_wait_takes_max_attempts_and_delay(store_config: StoreConfig) -> None:
    clock = VirtualClock()
    iii = make_app(store_config, clock)
    calls: list[float] = []

    @iii.function("fails")
    def fails(_: Any) -> None:
        calls.append(clock.now())
        raise ValueError("no")

    async with iii.running():
        start = clock.now()
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def wait() -> None:
                results.append(
                    await iii.batch_trigger_and_wait_async(
                        "fails", [{}], queue="work", max_attempts=1, delay_ms=5000
                    )
                )

            tg.start_soon(wait)
            await drain(iii)
    [batch] = results
    assert [r.status for r in batch.runs] == ["failed"]
    assert calls == [start + 5.0]  # one attempt (the queue allows 3), five seconds on


async def test_the_runs_api_takes_the_receipt_trigger_returned_as_the_runs_handle(
    store_config: StoreConfig,
) -> None:
    """Trigger.dev hands back a run's handle to monitor and manage it with; here that is
    the receipt ``trigger`` returns. Passed to ``runs.get`` it failed with ``unhashable
    type: 'dict'`` in memory and as a store failure on a file store."""
    iii = make_app(store_config)
    iii.register_function("job", lambda n: n * 2)
    async with iii.running():
        receipt = await iii.trigger_async("job", 21, action=TriggerAction.Enqueue(queue="work"))
        result = await iii.runs.wait_async(receipt)
        run = await iii.runs.get_async(receipt)
        cancel = await iii.runs.cancel_async(receipt)
    assert (result.id, result.output) == (receipt["messageReceiptId"], 42)
    assert run is not None and (run.id, run.status) == (receipt["messageReceiptId"], "completed")
    assert (cancel.id, cancel.cancelled) == (receipt["messageReceiptId"], False)


@pytest.mark.parametrize("bad", [None, 7, ["run-id"], {"id": "run-id"}, b"run-id"])
async def test_a_run_named_by_anything_but_an_id_or_a_receipt_is_refused_by_name(
    store_config: StoreConfig, bad: Any
) -> None:
    """``runs.get(None)`` answered "no such run" (a misspelt receipt key went unnoticed),
    a list or another dict failed differently on each store (a ``TypeError`` in memory, a
    ``StoreError`` from the file store as if it were damaged)."""
    iii = make_app(store_config)
    async with iii.running():
        for call in (iii.runs.get_async, iii.runs.wait_async, iii.runs.cancel_async):
            with pytest.raises(InvocationError) as caught:
                await call(bad)
            assert caught.value.code == "invalid_request"
            assert f"not {type(bad).__name__}" in caught.value.message
