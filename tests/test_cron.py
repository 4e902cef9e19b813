"""Cron triggers (SPEC §7) on the virtual clock: schedules in iii's 6- and 7-field forms and
the classic 5-field form, the payload, no overlapping runs, errors, the decorator."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import anyio
import pytest

from iii_embedded import III
from iii_embedded.testing import VirtualClock

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC).timestamp()


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


class Recorder:
    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.event = anyio.Event()

    async def __call__(self, payload: dict[str, Any]) -> None:
        self.payloads.append(payload)
        self.event.set()

    async def next(self) -> dict[str, Any]:
        with anyio.fail_after(5):
            await self.event.wait()
        self.event = anyio.Event()
        return self.payloads[-1]


async def advance(clock: VirtualClock, seconds: float) -> None:
    clock.advance(seconds)
    for _ in range(5):
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("expression", "first", "second"),
    [
        ("*/10 * * * * *", 10, 20),  # iii: seconds first
        ("0 */5 * * * *", 300, 600),  # iii: every five minutes
        ("*/15 * * * *", 900, 1800),  # classic five fields
        ("30 0 12 * * * 2026", 30, 86_400 + 30),  # iii 7 fields: 12:00:30 daily, in 2026
    ],
)
async def test_fires_at_the_scheduled_times_with_the_iii_payload(
    expression: str, first: int, second: int | None
) -> None:
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    record = Recorder()
    iii.register_function("job", record)
    iii.register_trigger(
        {"type": "cron", "id": "job-1", "function_id": "job", "config": {"expression": expression}}
    )
    async with iii.running():
        await advance(clock, first - 1)
        assert record.payloads == []
        await advance(clock, 1)
        payload = await record.next()
        if second is not None:
            await advance(clock, second - first)
            await record.next()
    assert payload == {
        "trigger": "cron",
        "job_id": "job-1",
        "scheduled_time": iso(T0 + first),
        "actual_time": iso(T0 + first),
    }
    assert len(record.payloads) == (2 if second else 1)


async def test_a_run_still_going_is_not_started_twice(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    started = 0
    release = anyio.Event()
    entered = anyio.Event()

    @iii.function("slow", cron="*/10 * * * * *")
    async def slow(_: Any) -> None:
        nonlocal started
        started += 1
        entered.set()
        await release.wait()

    caplog.set_level(logging.INFO, logger="iii_embedded.cron")
    async with iii.running():
        await advance(clock, 10)
        with anyio.fail_after(5):
            await entered.wait()
        await advance(clock, 10)
        await advance(clock, 10)
        assert started == 1
        release.set()
        entered = anyio.Event()
        await advance(clock, 10)
        with anyio.fail_after(5):
            await entered.wait()
    assert started == 2
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 2


async def test_a_failing_run_is_logged_and_the_schedule_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    calls = 0
    second = anyio.Event()

    def flaky(_: Any) -> None:  # a sync handler, run in a worker thread
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first run fails")
        second.set()

    iii.register_function("flaky", flaky)
    iii.register_trigger(
        {"type": "cron", "function_id": "flaky", "config": {"expression": "0 * * * * *"}}
    )
    caplog.set_level(logging.ERROR, logger="iii_embedded.cron")
    async with iii.running():
        await advance(clock, 60)
        while calls < 1:
            await anyio.sleep(0.001)
        while not caplog.records:
            await anyio.sleep(0.001)
        await advance(clock, 60)
        with anyio.fail_after(5):
            await second.wait()
    assert calls == 2
    assert "first run fails" in (caplog.records[0].exc_text or "")


async def test_missed_fire_times_collapse_into_one_run() -> None:
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    record = Recorder()
    iii.register_function("tick", record)
    iii.register_trigger(
        {"type": "cron", "function_id": "tick", "config": {"expression": "* * * * * *"}}
    )
    async with iii.running():
        await advance(clock, 3600)  # an hour of one-second ticks passes at once
        await record.next()
        await advance(clock, 1)
        await record.next()
    assert len(record.payloads) == 2


def test_invalid_expressions_are_refused_naming_the_expression() -> None:
    iii = III()
    with pytest.raises(ValueError, match="'every minute' has 2 fields"):
        iii.register_trigger(
            {"type": "cron", "function_id": "f", "config": {"expression": "every minute"}}
        )
    with pytest.raises(ValueError, match="invalid cron expression '99 \\* \\* \\* \\*'"):
        iii.register_trigger(
            {"type": "cron", "function_id": "f", "config": {"expression": "99 * * * *"}}
        )
    with pytest.raises(ValueError, match=r"needs config\.expression"):
        iii.register_trigger({"type": "cron", "function_id": "f", "config": {}})
