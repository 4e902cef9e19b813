"""Trigger.dev-style triggering (SPEC §6): runs, batches, waiting, idempotency, delays,
cancellation — on both stores."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    QueueConfig,
    RunFailedError,
    StoreConfig,
    TriggerAction,
)
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["in_memory", "file_based"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    if request.param == "in_memory":
        return StoreConfig()
    return StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))


def make_app(store: StoreConfig, clock: VirtualClock | None = None, **queues: QueueConfig) -> III:
    all_queues = {
        "work": QueueConfig(name="work", max_retries=3, backoff_ms=1000),
        "fifo": QueueConfig(name="fifo", type="fifo", message_group_field="g", concurrency=1),
        "one": QueueConfig(name="one", concurrency=1),
        "five": QueueConfig(name="five", concurrency=5),
        **queues,
    }
    return III(
        Config(queues=all_queues, store=store), clock=clock or VirtualClock(), shutdown_grace_ms=0
    )


async def test_batch_trigger_stores_all_in_order_and_runs_them(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    seen: list[int] = []
    iii.register_function("double", lambda n: seen.append(n) or n * 2)
    async with iii.running():
        ids = await iii.batch_trigger_async("double", [1, 2, 3], queue="work")
        assert len(set(ids)) == 3
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
    assert sorted(seen) == [1, 2, 3]
    assert [(r.status, r.output, r.function_id, r.queue, r.attempts) for r in runs if r] == [
        ("completed", 2, "double", "work", 1),
        ("completed", 4, "double", "work", 1),
        ("completed", 6, "double", "work", 1),
    ]


async def test_an_atomic_batch_with_one_bad_item_stores_nothing(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    iii.register_function("pay", lambda d: d)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.batch_trigger_async(
                "pay", [{"g": "a"}, {"g": "b"}, {"amount": 3}, {"g": "c"}], queue="fifo"
            )
        assert caught.value.code == "enqueue_error"
        assert caught.value.message.startswith("item 2: FIFO queue 'fifo' requires field 'g'")
        with pytest.raises(InvocationError, match="item 1: payload is not JSON-serialisable"):
            await iii.batch_trigger_async("pay", [{"g": 1}, {"g": 2, "x": {1, 2}}], queue="fifo")
        stats = await iii.queue_stats_async("fifo")
        assert (stats.ready, stats.completed) == (0, 0)


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
        results = []

        async def wait() -> None:
            results.append(await iii.trigger_and_wait_async("flaky", {"x": 21}, queue="work"))

        tg.start_soon(wait)
        await drain(iii)  # advances the virtual clock through both backoffs
    [result] = results
    assert (result.ok, result.status, result.output, result.error) == (
        True,
        "completed",
        {"answer": 42},
        None,
    )
    assert result.unwrap() == {"answer": 42}
    assert attempts == 3


async def test_trigger_and_wait_returns_an_error_result_after_exhaustion(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)

    @iii.function("broken")
    async def broken(_: Any) -> None:
        raise ValueError("bad input")

    async with iii.running(), anyio.create_task_group() as tg:
        results = []

        async def wait() -> None:
            results.append(await iii.trigger_and_wait_async("broken", {}, queue="work"))

        tg.start_soon(wait)
        await drain(iii)
    [result] = results
    assert (result.ok, result.status) == (False, "failed")
    assert result.error is not None and (result.error.type, result.error.message) == (
        "ValueError",
        "bad input",
    )
    with pytest.raises(RunFailedError) as caught:
        result.unwrap()
    assert (caught.value.run_id, caught.value.function_id) == (result.id, "broken")


async def test_batch_and_wait_keeps_input_order_with_mixed_outcomes(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)

    @iii.function("check")
    async def check(n: int) -> int:
        if n % 2:
            raise ValueError(f"odd {n}")
        await anyio.sleep(0.001 * (5 - n))  # later items finish first
        return n * 10

    async with iii.running(), anyio.create_task_group() as tg:
        batches = []

        async def wait() -> None:
            batches.append(
                await iii.batch_trigger_and_wait_async("check", [0, 1, 2, 3, 4], queue="five")
            )

        tg.start_soon(wait)
        await drain(iii)
    [batch] = batches
    assert [r.output for r in batch.runs] == [0, None, 20, None, 40]
    assert [r.ok for r in batch.runs] == [True, False, True, False, True]
    assert [r.error.message if r.error else None for r in batch.runs] == [
        None,
        "odd 1",
        None,
        "odd 3",
        None,
    ]
    assert not batch.ok


async def test_idempotency_key_returns_the_first_receipt_while_it_lives(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config, work=QueueConfig(name="work", max_retries=1))
    fail = True

    @iii.function("charge")
    async def charge(_: Any) -> str:
        if fail:
            raise RuntimeError("declined")
        return "charged"

    action = TriggerAction.Enqueue(queue="work", idempotency_key="order-7", delay_ms=5000)
    async with iii.running():
        first = await iii.trigger_async("charge", {"n": 1}, action=action)
        second = await iii.trigger_async("charge", {"n": 2}, action=action)
        assert second == first
        assert (await iii.queue_stats_async("work")).delayed == 1
        await drain(iii)
        run = await iii.runs.get_async(first["messageReceiptId"])
        assert run is not None and run.status == "failed"
        fail = False
        third = await iii.trigger_async("charge", {"n": 3}, action=action)
        assert third != first  # the failed run released its key
        await drain(iii)
        again = await iii.trigger_async("charge", {"n": 4}, action=action)
        assert again == third  # a completed run keeps its key for its retention


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
        assert run is not None and run.status == "delayed"
        await drain(iii, max_advance_s=59.9)
        assert started == []
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
    assert calls == 5


async def test_cancel_of_a_queued_run_prevents_its_execution(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    ran: list[Any] = []
    iii.register_function("job", ran.append)
    async with iii.running():
        receipt = await iii.trigger_async(
            "job", "x", action=TriggerAction.Enqueue(queue="work", delay_ms=1000)
        )
        result = await iii.runs.cancel_async(receipt["messageReceiptId"])
        assert (result.cancelled, result.status_before) == (True, "delayed")
        await drain(iii)
        run = await iii.runs.get_async(receipt["messageReceiptId"])
        assert run is not None and run.status == "cancelled"
        again = await iii.runs.cancel_async(receipt["messageReceiptId"])
        assert (again.cancelled, again.message) == (
            False,
            "nothing to cancel: the run already cancelled",
        )
        missing = await iii.runs.cancel_async("no-such-run")
        assert (missing.cancelled, missing.message) == (False, "no such run")
    assert ran == []


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
        results = []

        async def wait() -> None:
            results.append(await iii.trigger_and_wait_async("long", {}, queue="work"))

        tg.start_soon(wait)
        await started.wait()
        [running] = [j for j in (await iii.runtime.store.list_jobs(state="running"))]
        result = await iii.runs.cancel_async(running.id)
        assert (result.cancelled, result.status_before) == (True, "running")
        await stopped.wait()
    assert [(r.status, r.ok) for r in results] == [("cancelled", False)]


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


async def test_100_parallel_waits_inside_one_handler_on_a_queue_of_5(
    store_config: StoreConfig,
) -> None:
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
        results = await asyncio.gather(
            *(iii.trigger_and_wait_async("leaf", n, queue="five") for n in range(count))
        )
        return sum(r.unwrap() for r in results)

    async with iii.running():
        result = await iii.trigger_async("fan_out", 100, timeout_ms=60_000)
    assert result == sum(n * n for n in range(100))
    assert peak <= 5


async def test_a_handler_waits_for_a_job_of_its_own_concurrency_1_queue(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)

    @iii.function("child")
    async def child(n: int) -> int:
        return n + 1

    @iii.function("parent")
    async def parent(n: int) -> int:
        result = await iii.trigger_and_wait_async("child", n, queue="one")
        return int(result.unwrap()) * 10

    @iii.function("sync_parent")
    def sync_parent(n: int) -> int:
        return int(iii.trigger_and_wait("child", n, queue="one").unwrap()) * 100

    async with iii.running(), anyio.create_task_group() as tg:
        results = []

        async def wait(fid: str) -> None:
            results.append(await iii.trigger_and_wait_async(fid, 1, queue="one"))

        tg.start_soon(wait, "parent")
        tg.start_soon(wait, "sync_parent")
        with anyio.fail_after(10):
            await drain(iii)
    assert sorted(r.unwrap() for r in results) == [20, 200]


async def test_waiting_for_a_job_of_ones_own_fifo_group_fails_fast(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        if data["n"] == 0:
            await iii.trigger_and_wait_async("step", {"g": data["g"], "n": 1}, queue="fifo")
        return data["n"]

    async with iii.running(), anyio.create_task_group() as tg:
        results = []

        async def wait() -> None:
            results.append(
                await iii.trigger_and_wait_async("step", {"g": "A", "n": 0}, queue="fifo")
            )

        tg.start_soon(wait)
        with anyio.fail_after(10):
            await drain(iii)
    [result] = results
    assert result.status == "failed"
    assert result.error is not None and result.error.type == "InvocationError"
    assert "deadlock" in result.error.message


async def test_trigger_and_wait_times_out_and_the_run_goes_on(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    release = anyio.Event()

    @iii.function("slow")
    async def slow(_: Any) -> str:
        await release.wait()
        return "done"

    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_and_wait_async("slow", {}, queue="work", timeout_ms=50)
        assert caught.value.code == "TIMEOUT"
        release.set()
        await drain(iii)
        assert (await iii.queue_stats_async("work")).completed == 1


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
        ids = iii.batch_trigger("square", [4])
        result = iii.trigger_and_wait("square", 5)
        run = iii.runs.get(result.id)
        assert run is not None and run.output == 25
        assert iii.runs.cancel(result.id).cancelled is False
        assert len(ids) == 1


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
    assert (run.status, run.output, run.function_id, run.attempts) == (
        "completed",
        {"value": 42},
        "answer",
        1,
    )
