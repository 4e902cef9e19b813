"""Handlers run without a cancel scope until they suspend (``_fastpath``): timeouts and
cancellation must still behave exactly as with one."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from iii_embedded import III, InvocationError, TriggerAction
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


async def test_a_handler_with_its_own_cancel_scopes_returns_normally() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)

    @iii.function("scoped")
    async def scoped(_: Any) -> str:
        with anyio.move_on_after(0.001) as scope:
            await anyio.sleep(10)
        with anyio.CancelScope():
            await anyio.lowlevel.checkpoint()
        return f"moved on: {scope.cancelled_caught}"

    async with iii.running():
        assert await iii.trigger_async("scoped", {}) == "moved on: True"
        await iii.trigger_async("scoped", {}, action=TriggerAction.Enqueue(queue="default"))
        await drain(iii)
        assert (await iii.queue_stats_async("default")).completed == 1


async def test_a_timeout_inside_a_handler_owned_scope_is_still_a_timeout() -> None:
    clock = VirtualClock()
    iii = III(clock=clock, shutdown_grace_ms=0)
    entered = anyio.Event()

    @iii.function("nested")
    async def nested(_: Any) -> None:
        with anyio.CancelScope():
            entered.set()
            await anyio.sleep_forever()

    async with iii.running(), anyio.create_task_group() as tg:
        errors: list[str] = []

        async def call() -> None:
            try:
                await iii.trigger_async("nested", {}, timeout_ms=1000)
            except InvocationError as exc:
                errors.append(exc.code)

        tg.start_soon(call)
        await entered.wait()
        clock.advance(1)
    assert errors == ["TIMEOUT"]


async def test_a_handler_that_swallows_the_timeout_and_returns_keeps_its_value() -> None:
    clock = VirtualClock()
    iii = III(clock=clock, shutdown_grace_ms=0)
    entered = anyio.Event()

    @iii.function("stubborn")
    async def stubborn(_: Any) -> str:
        try:
            entered.set()
            await anyio.sleep_forever()
        except BaseException:
            return "caught"
        return "unreachable"

    async with iii.running(), anyio.create_task_group() as tg:
        results: list[Any] = []

        async def call() -> None:
            results.append(await iii.trigger_async("stubborn", {}, timeout_ms=1000))
            # The task is not left cancelled: it can still await.
            await anyio.lowlevel.checkpoint()
            results.append("still usable")

        tg.start_soon(call)
        await entered.wait()
        clock.advance(1)
    assert results == ["caught", "still usable"]


async def test_cancellation_from_outside_passes_through_the_handler() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)
    entered = anyio.Event()

    @iii.function("wait")
    async def wait(_: Any) -> None:
        entered.set()
        await anyio.sleep_forever()

    async with iii.running():
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(iii.trigger_async, "wait", {})
                await entered.wait()
                outer.cancel()
        assert outer.cancelled_caught


async def test_a_sync_handler_that_times_out_is_abandoned_and_its_result_dropped() -> None:
    clock = VirtualClock()
    iii = III(clock=clock, shutdown_grace_ms=0)
    release = threading.Event()
    entered = threading.Event()
    finished = threading.Event()

    @iii.function("blocking")
    def blocking(_: Any) -> str:
        entered.set()
        release.wait(10)
        finished.set()
        return "late"

    async with iii.running(), anyio.create_task_group() as tg:
        errors: list[str] = []

        async def call() -> None:
            try:
                await iii.trigger_async("blocking", {}, timeout_ms=500)
            except InvocationError as exc:
                errors.append(exc.code)

        tg.start_soon(call)
        await anyio.to_thread.run_sync(entered.wait)
        clock.advance(0.5)
    assert errors == ["TIMEOUT"]
    release.set()
    assert await anyio.to_thread.run_sync(finished.wait, 5)
