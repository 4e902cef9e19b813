"""The testing helpers (SPEC §9) in the cases a review found them short (2026-12-03):
``drain`` moves a virtual clock on while handlers wait for retrying runs, waits for a
cron fire whose time the test advanced past, and for the jobs a late registration
releases; the inspection helpers return runs with decoded payloads and refuse a
misspelt queue."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
from iii_embedded.testing import VirtualClock, drain, queued_jobs, running_jobs

pytestmark = pytest.mark.anyio


async def test_drain_moves_the_clock_on_while_a_handler_waits_for_retrying_runs(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    queues = {"work": QueueConfig(name="work", max_retries=3, backoff_ms=1000)}
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    failed_once: set[int] = set()
    outputs: list[Any] = []

    @iii.function("child")
    async def child(n: int) -> int:
        if n not in failed_once:
            failed_once.add(n)
            raise ConnectionError(f"child {n} failed")
        return n * 10

    @iii.function("parent")
    async def parent(_: Any) -> None:
        batch = await iii.batch_trigger_and_wait_async("child", [1, 2], queue="work")
        outputs.append(batch.outputs)

    async with iii.running():
        start = clock.now()
        await iii.trigger_async("parent", {}, action=TriggerAction.Enqueue())
        await drain(iii, timeout=10)
    assert outputs == [[10, 20]]
    assert clock.now() - start == pytest.approx(1.0)  # the children's one backoff


async def test_drain_waits_for_the_cron_fire_a_test_advanced_the_clock_past() -> None:
    clock = VirtualClock(start=1_700_000_000.0)  # 22:13:20 UTC, 100 s before a fire time
    iii = III(clock=clock, shutdown_grace_ms=0)
    fires: list[str] = []

    @iii.function("cleanup", cron="0 */5 * * * *")
    async def cleanup(event: dict[str, Any]) -> None:
        await anyio.lowlevel.checkpoint()
        fires.append(event["scheduled_time"])

    async with iii.running():
        await drain(iii)
        before = list(fires)
        clock.advance(200)
        await drain(iii)
        first = list(fires)
        for _ in range(287):  # the rest of a day, five minutes at a time
            clock.advance(300)
            await drain(iii)
    assert before == []
    assert first == ["2023-11-14T22:15:00Z"]
    assert len(fires) == 288 and len(set(fires)) == 288


@pytest.mark.parametrize("caller", ["cron", "void"])
async def test_drain_moves_the_clock_on_while_a_cron_fire_or_void_call_waits_for_a_retry(
    caller: str,
) -> None:
    clock = VirtualClock(start=1_700_000_000.0)  # 100 s before a five-minute mark
    queues = {"work": QueueConfig(name="work", max_retries=3, backoff_ms=1000)}
    iii = III(Config(queues=queues), clock=clock, shutdown_grace_ms=0)
    calls: list[float] = []
    results: list[Any] = []

    @iii.function("flaky")
    async def flaky(_: Any) -> str:
        calls.append(clock.now())
        if len(calls) == 1:
            raise ConnectionError("first attempt fails")
        return "ok"

    async def wait_for_flaky(_: Any) -> None:
        result = await iii.trigger_and_wait_async("flaky", {}, queue="work")
        results.append(result.output)

    iii.function("tick", cron="0 */5 * * * *" if caller == "cron" else None)(wait_for_flaky)
    async with iii.running():
        if caller == "cron":
            clock.advance(100)
        else:
            await iii.trigger_async("tick", {}, action=TriggerAction.Void())
        await drain(iii, timeout=10)
    assert results == ["ok"]
    assert calls[1] - calls[0] == pytest.approx(1.0)  # the retry's backoff, moved to


async def test_the_inspection_helpers_return_runs_with_decoded_payloads(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    queues = {"email": QueueConfig(name="email", concurrency=1, prefetch=0)}
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    started = anyio.Event()
    release = anyio.Event()

    @iii.function("send")
    async def send(message: dict[str, str]) -> None:
        started.set()
        await release.wait()

    async with iii.running():
        for to in ("a", "b"):
            await iii.trigger_async("send", {"to": to}, action=TriggerAction.Enqueue(queue="email"))
        with anyio.fail_after(10):
            await started.wait()
        running = await running_jobs(iii, "email")
        queued = await queued_jobs(iii, "email")
        everywhere = await queued_jobs(iii)
        with pytest.raises(ValueError) as misspelt:
            await queued_jobs(iii, "emial")
        with pytest.raises(ValueError):
            await running_jobs(iii, "nosuch")
        release.set()
        await drain(iii)
    assert [(r.payload, r.status, r.queue) for r in running] == [({"to": "a"}, "running", "email")]
    assert [(r.payload, r.status) for r in queued] == [({"to": "b"}, "queued")]
    assert [r.id for r in everywhere] == [r.id for r in queued]
    assert str(misspelt.value) == "Queue 'emial' not found"
