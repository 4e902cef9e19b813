"""Batches (SPEC §6): ``batch_trigger`` stores all runs in one transaction or none, and
``batch_trigger_and_wait`` returns every outcome in input order, on both stores."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    BatchResult,
    Config,
    InvocationError,
    QueueConfig,
    StoreConfig,
)
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app(store: StoreConfig, clock: VirtualClock | None = None) -> III:
    queues = {
        "work": QueueConfig(name="work", max_retries=2, backoff_ms=1000),
        "fifo": QueueConfig(name="fifo", type="fifo", message_group_field="g", concurrency=1),
        "five": QueueConfig(name="five", concurrency=5),
    }
    return III(
        Config(queues=queues, store=store), clock=clock or VirtualClock(), shutdown_grace_ms=0
    )


async def test_batch_trigger_stores_all_in_order_and_runs_them(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    seen: list[int] = []

    @iii.function("double")
    def double(n: int) -> int:
        seen.append(n)
        return n * 2

    async with iii.running():
        ids = await iii.batch_trigger_async("double", [1, 2, 3], queue="work")
        assert len(set(ids)) == 3
        queued = await iii.runtime.store.list_jobs("work")
        assert [j.id for j in queued] == ids  # stored in input order
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
                "pay", [{"g": "a"}, {"g": "b"}, {"g": "c"}, {"amount": 3}, {"g": "d"}], queue="fifo"
            )
        assert caught.value.code == "enqueue_error"
        assert caught.value.message == (
            "item 3: FIFO queue 'fifo' requires field 'g' in data, but it was not found"
        )
        with pytest.raises(InvocationError, match=r"^enqueue_error: item 1: FIFO queue 'fifo': "):
            await iii.batch_trigger_async("pay", [{"g": 1}, {"g": None}], queue="fifo")
        with pytest.raises(InvocationError, match="item 1: payload is not JSON-serialisable"):
            await iii.batch_trigger_async("pay", [{"g": 1}, {"g": 2, "x": {1, 2}}], queue="fifo")
        assert await iii.runtime.store.list_jobs() == []


async def test_a_batch_for_an_unknown_queue_or_function_stores_nothing(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("f", lambda d: d)
    async with iii.running():
        with pytest.raises(InvocationError, match="Queue 'nope' not found"):
            await iii.batch_trigger_async("f", [1, 2], queue="nope")
        with pytest.raises(InvocationError, match="Function 'g' not found"):
            await iii.batch_trigger_async("g", [1, 2], queue="work")
        with pytest.raises(InvocationError, match="2 idempotency keys for 3 payloads"):
            await iii.batch_trigger_async("f", [1, 2, 3], queue="work", idempotency_keys=["a", "b"])
        assert await iii.runtime.store.list_jobs() == []
        assert await iii.batch_trigger_async("f", [], queue="work") == []


async def test_batch_idempotency_keys_apply_per_item(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    iii.register_function("f", lambda d: d)
    async with iii.running():
        first = await iii.batch_trigger_async(
            "f", [1, 2, 3], queue="work", delay_ms=1000, idempotency_keys=["a", None, "a"]
        )
        assert first[2] == first[0] and first[1] != first[0]
        second = await iii.batch_trigger_async(
            "f", [4, 5], queue="work", idempotency_keys=["a", "b"]
        )
        assert second[0] == first[0] and second[1] not in first
        assert len(await iii.runtime.store.list_jobs()) == 3


async def test_batch_trigger_with_a_delay_delays_every_run(store_config: StoreConfig) -> None:
    clock = VirtualClock()
    iii = make_app(store_config, clock)
    started: list[float] = []
    iii.register_function("f", lambda _: started.append(clock.now()))
    async with iii.running():
        t0 = clock.now()
        ids = await iii.batch_trigger_async("f", [1, 2], queue="work", delay_ms=2000)
        assert [(r.status if r else None) for r in [await iii.runs.get_async(i) for i in ids]] == [
            "delayed",
            "delayed",
        ]
        await drain(iii)
    assert started == [t0 + 2, t0 + 2]


async def test_batch_and_wait_keeps_input_order_with_mixed_outcomes(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    release = {n: anyio.Event() for n in range(5)}

    @iii.function("check")
    async def check(n: int) -> int:
        await release[n].wait()
        if n % 2:
            raise ValueError(f"odd {n}")
        return n * 10

    async with iii.running(), anyio.create_task_group() as tg:
        batches: list[BatchResult] = []

        async def wait() -> None:
            batches.append(
                await iii.batch_trigger_and_wait_async("check", [0, 1, 2, 3, 4], queue="five")
            )

        tg.start_soon(wait)
        for n in reversed(range(5)):  # later items finish first
            release[n].set()
        await drain(iii)
    [batch] = batches
    assert batch.id and batch.id not in [r.id for r in batch.runs]
    assert [r.output for r in batch.runs] == [0, None, 20, None, 40]
    assert batch.outputs == [0, None, 20, None, 40]
    assert [r.status for r in batch.runs] == ["completed", "failed"] * 2 + ["completed"]
    assert [r.error.message if r.error else None for r in batch.runs] == [
        None,
        "odd 1",
        None,
        "odd 3",
        None,
    ]
    assert not batch.ok


async def test_batch_and_wait_of_an_invalid_batch_raises_and_stores_nothing(
    store_config: StoreConfig,
) -> None:
    iii = make_app(store_config)
    iii.register_function("f", lambda d: d)
    async with iii.running():
        with pytest.raises(InvocationError, match=r"^enqueue_error: item 1: "):
            await iii.batch_trigger_and_wait_async("f", [{"g": 1}, {}], queue="fifo")
        assert await iii.runtime.store.list_jobs() == []
        empty = await iii.batch_trigger_and_wait_async("f", [], queue="fifo")
    assert (empty.runs, empty.ok) == ([], True)


async def test_batch_and_wait_runs_fifo_items_in_group_order(store_config: StoreConfig) -> None:
    iii = make_app(store_config)
    order: list[Any] = []

    @iii.function("step")
    async def step(data: dict[str, Any]) -> Any:
        order.append((data["g"], data["n"]))
        return data["n"]

    payloads = [{"g": g, "n": n} for n in range(3) for g in ("a", "b")]
    async with iii.running():
        batch = await iii.batch_trigger_and_wait_async("step", payloads, queue="fifo")
    assert batch.outputs == [0, 0, 1, 1, 2, 2]
    assert [n for g, n in order if g == "a"] == [0, 1, 2]
    assert [n for g, n in order if g == "b"] == [0, 1, 2]


def test_the_batch_calls_are_typed_to_take_any_iterable() -> None:
    """They take any iterable of payloads (a generator too) and of idempotency keys, as
    docs/triggering.md says; their annotations said ``Sequence``, so ``mypy --strict``
    refused a program that passed a generator."""
    import typing
    from collections.abc import Iterable

    calls = [
        III.batch_trigger,
        III.batch_trigger_async,
        III.batch_trigger_and_wait,
        III.batch_trigger_and_wait_async,
    ]
    for call in calls:
        hints = typing.get_type_hints(call)
        assert hints["payloads"] == Iterable[Any], call.__name__
        assert hints["idempotency_keys"] == Iterable[str | None] | None, call.__name__


async def test_a_batch_of_a_generator_stores_one_run_per_item() -> None:
    iii = make_app(StoreConfig())
    iii.register_function("double", lambda n: n * 2)
    async with iii.running():
        batch = await iii.batch_trigger_and_wait_async(
            "double", (n for n in range(3)), idempotency_keys=(f"k{n}" for n in range(3))
        )
    assert batch.outputs == [0, 2, 4]
