"""Cron triggers (SPEC §7) on the virtual clock: schedules in iii's 6- and 7-field forms and
the classic 5-field form, the payload, no overlapping runs, errors, the decorator, and
runtimes sharing a file store running each fire once."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from contextlib import closing
from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, StoreConfig, StoreError
from iii_embedded._cron import parse_expression
from iii_embedded._stores._sqlite import DB_FILENAME
from iii_embedded.testing import VirtualClock, drain

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
        # the shorthands iii's parser takes (T0 is Sunday 2026-03-01 12:00)
        ("@hourly", 3600, 7200),
        ("@daily", 43_200, 43_200 + 86_400),
        ("@weekly", 43_200 + 6 * 86_400, 43_200 + 13 * 86_400),  # Sundays at 00:00
        ("@monthly", 31 * 86_400 - 43_200, 61 * 86_400 - 43_200),  # April 1, May 1
        ("@yearly", 306 * 86_400 - 43_200, 671 * 86_400 - 43_200),  # 2027-01-01, 2028-01-01
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


@pytest.mark.parametrize(
    ("expression", "days"),
    [
        # T0 is Sunday 2026-03-01: the next six fire days of each, as docs/cron.md reads them
        ("0 0 0 13 * FRI", ["03-06", "03-13", "03-20", "03-27", "04-03", "04-10"]),  # either
        ("0 0 0 * * 1", ["03-02", "03-09", "03-16", "03-23", "03-30", "04-06"]),  # 1: Monday
        ("0 0 0 * * 7", ["03-08", "03-15", "03-22", "03-29", "04-05", "04-12"]),  # 7: Sunday
        ("0 0 0 29 2 *", ["02-29"] * 6),  # leap years only (2028, 2032, ...)
    ],
)
def test_day_fields_read_as_classic_cron_does(expression: str, days: list[str]) -> None:
    """The day rules docs/cron.md states (croniter's, classic cron's): a weekday number
    0-7 with Monday 1 and Sunday 0 or 7, and either day field matching when both are
    restricted (iii's Rust crate differs on both: its Sunday is 1, and both must match)."""
    iii = III(clock=VirtualClock(start=T0))
    iii.register_function("f", lambda event: None)
    iii.register_trigger({"type": "cron", "function_id": "f", "config": {"expression": expression}})
    schedule = parse_expression(expression, T0)
    fires = [dt.datetime.fromtimestamp(schedule.get_next(float), dt.UTC) for _ in range(6)]
    assert [f.strftime("%m-%d") for f in fires] == days
    assert {f.strftime("%H:%M:%S") for f in fires} == {"00:00:00"}


async def test_a_schedule_registered_while_running_fires_from_the_loop_or_another_thread() -> None:
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    on_loop, elsewhere = Recorder(), Recorder()
    iii.register_function("on-loop", on_loop)
    iii.register_function("elsewhere", elsewhere)

    def schedule(function_id: str) -> None:
        iii.register_trigger(
            {"type": "cron", "function_id": function_id, "config": {"expression": "*/10 * * * * *"}}
        )

    async with iii.running():
        schedule("on-loop")  # from async code on the engine's loop
        await anyio.to_thread.run_sync(schedule, "elsewhere")  # from another thread
        await advance(clock, 10)
        first = await on_loop.next(), await elsewhere.next()
    assert [p["scheduled_time"] for p in first] == [iso(T0 + 10)] * 2


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
        late = await record.next()
        await advance(clock, 1)
        await record.next()
        await advance(clock, 9.5)  # ten ticks pass, and half a second more
        latest = await record.next()
    assert len(record.payloads) == 3
    # Each run is for the latest fire time that had passed, not for the first one missed.
    assert (late["scheduled_time"], late["actual_time"]) == (iso(T0 + 3600), iso(T0 + 3600))
    assert (latest["scheduled_time"], latest["actual_time"]) == (
        iso(T0 + 3610),
        iso(T0 + 3610.5),
    )


async def test_a_jump_past_the_schedules_last_time_fires_once_for_that_last_time() -> None:
    """Noon every day of 2026, and the clock jumps from November into the next year: one
    run, for the latest time that passed (the schedule's very last), not for the first
    one missed. Until 2026-12-03 it ran for the first (no time after the last one made
    the search give up)."""
    clock = VirtualClock(start=dt.datetime(2026, 11, 14, 22, 0, tzinfo=dt.UTC).timestamp())
    iii = III(clock=clock, shutdown_grace_ms=0)
    record = Recorder()
    iii.register_function("noon", record)
    iii.register_trigger(
        {"type": "cron", "function_id": "noon", "config": {"expression": "0 0 12 * * * 2026"}}
    )
    async with iii.running():
        await advance(clock, dt.datetime(2027, 1, 5, tzinfo=dt.UTC).timestamp() - clock.now())
        late = await record.next()
    assert [p["scheduled_time"] for p in record.payloads] == ["2026-12-31T12:00:00Z"]
    assert late["actual_time"] == "2027-01-05T00:00:00Z"


async def test_a_functions_second_schedule_fires_on_its_own_and_a_repeat_is_one(
    store_config: StoreConfig,
) -> None:
    """Two cron triggers of one function, neither with an ``id``: each fires on its own
    schedule, as in iii, under an id made from its expression, whatever order they were
    registered in (until 2026-12-03 both had ``cron::tick``: one schedule in a file
    store, two in memory). The same schedule registered again is kept once; an explicit
    id already taken by another schedule is refused, naming both."""
    clock = VirtualClock(start=T0)
    iii = III(Config(store=store_config), clock=clock, shutdown_grace_ms=0)
    record = Recorder()
    iii.register_function("tick", record)
    for expression in ("0 */5 * * * *", "0 */3 * * * *", "0 */5 * * * *"):
        iii.register_trigger(
            {"type": "cron", "function_id": "tick", "config": {"expression": expression}}
        )
    nightly = {"type": "cron", "id": "nightly", "function_id": "tick"}
    iii.register_trigger({**nightly, "config": {"expression": "0 0 3 * * *"}})
    with pytest.raises(
        ValueError,
        match=r"cron trigger id 'nightly' is already the schedule '0 0 3 \* \* \*' "
        r"of 'tick': give the cron trigger '0 0 4 \* \* \*' of 'tick' an 'id'",
    ):
        iii.register_trigger({**nightly, "config": {"expression": "0 0 4 * * *"}})
    every_3, every_5 = "cron::tick::0 */3 * * * *", "cron::tick::0 */5 * * * *"
    assert sorted((j.job_id, j.expression) for j in iii.cron_jobs) == [
        (every_3, "0 */3 * * * *"),
        (every_5, "0 */5 * * * *"),
        ("nightly", "0 0 3 * * *"),
    ]
    other = III(clock=clock)  # the other order: the same ids
    for expression in ("0 */3 * * * *", "0 */5 * * * *"):
        other.register_trigger(
            {"type": "cron", "function_id": "tick", "config": {"expression": expression}}
        )
    assert sorted(j.job_id for j in other.cron_jobs) == [every_3, every_5]
    async with iii.running():
        for minute in range(1, 16):
            await advance(clock, 60)
            due = len([m for m in range(1, minute + 1) if m % 3 == 0]) + minute // 5
            await until(lambda due=due: len(record.payloads) >= due, f"{due} fires")
            await until(lambda: not iii.runtime.cron_fires, "they end")  # before the next
    fires = sorted((p["scheduled_time"], p["job_id"]) for p in record.payloads)
    assert fires == sorted(
        [(iso(T0 + 60 * m), every_3) for m in (3, 6, 9, 12, 15)]
        + [(iso(T0 + 60 * m), every_5) for m in (5, 10, 15)]
    )


def test_invalid_expressions_are_refused_naming_the_expression_and_the_trigger() -> None:
    iii = III()
    with pytest.raises(ValueError) as wrong_count:
        iii.register_trigger(
            {"type": "cron", "function_id": "f", "config": {"expression": "every minute"}}
        )
    assert str(wrong_count.value) == (  # invalid, not a schedule that has no fire time
        "the cron trigger of 'f': invalid cron expression 'every minute': it has 2 fields; "
        "expected 5 (min hour day month weekday), 6 (iii: seconds first) or 7 (… and year), "
        "or one of @yearly, @monthly, @weekly, @daily, @hourly"
    )
    with pytest.raises(
        ValueError, match="the cron trigger of 'f': invalid cron expression '99 \\* \\* \\* \\*'"
    ):
        iii.register_trigger(
            {"type": "cron", "function_id": "f", "config": {"expression": "99 * * * *"}}
        )
    with pytest.raises(ValueError) as unknown_shorthand:
        iii.register_trigger(
            {"type": "cron", "function_id": "f", "config": {"expression": "@reboot"}}
        )
    assert str(unknown_shorthand.value) == (
        "the cron trigger of 'f': invalid cron expression '@reboot': it has 1 field; expected 5 "
        "(min hour day month weekday), 6 (iii: seconds first) or 7 (… and year), or one of "
        "@yearly, @monthly, @weekly, @daily, @hourly"
    )
    with pytest.raises(  # the decorator's cron= too
        ValueError, match="the cron trigger of 'g': invalid cron expression '\\* \\* \\*'"
    ):
        iii.function("g", cron="* * *")(lambda event: None)
    with pytest.raises(ValueError, match=r"needs config\.expression"):
        iii.register_trigger({"type": "cron", "function_id": "f", "config": {}})
    with pytest.raises(ValueError, match="cron expression '0 0 0 31 2 \\*' of 'f' has no fire"):
        iii.register_trigger(  # the 31st of February
            {"type": "cron", "function_id": "f", "config": {"expression": "0 0 0 31 2 *"}}
        )
    # Far off is not never: croniter would look only 50 years ahead by default.
    far = III(clock=VirtualClock(start=0.0))
    far.register_trigger(
        {"type": "cron", "function_id": "f", "config": {"expression": "0 0 0 29 2 * 2096"}}
    )
    assert [job.expression for job in far.cron_jobs] == ["0 0 0 29 2 * 2096"]
    past = III(clock=VirtualClock(start=T0))
    with pytest.raises(ValueError, match="has no fire time after 2026-03-01T12:00:00Z"):
        past.register_trigger(  # noon every day of 2025
            {"type": "cron", "function_id": "f", "config": {"expression": "0 0 12 * * * 2025"}}
        )


async def test_a_schedule_whose_last_year_has_passed_stops_and_the_engine_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``... 2026``: noon every day of 2026. After its last fire it has no next time: that
    schedule ends with a warning; the engine, its queues and other schedules go on."""
    clock = VirtualClock(start=dt.datetime(2026, 12, 31, 11, 0, tzinfo=dt.UTC).timestamp())
    iii = III(clock=clock, shutdown_grace_ms=0)
    last_year, hourly = Recorder(), Recorder()
    iii.register_function("noon", last_year)
    iii.register_function("hourly", hourly)
    for fid, expression in (("noon", "0 0 12 * * * 2026"), ("hourly", "0 0 * * * *")):
        iii.register_trigger(
            {"type": "cron", "function_id": fid, "config": {"expression": expression}}
        )
    iii.register_function("echo", lambda x: x)
    with caplog.at_level(logging.WARNING, logger="iii_embedded"):
        async with iii.running():
            await advance(clock, 3600)
            last = await last_year.next()
            await hourly.next()
            await advance(clock, 3600)
            await hourly.next()
            answer = await iii.trigger_async("echo", 7)
    assert [p["scheduled_time"] for p in last_year.payloads] == ["2026-12-31T12:00:00Z"]
    assert last["job_id"] == "cron::noon"
    assert [p["scheduled_time"] for p in hourly.payloads] == [
        "2026-12-31T12:00:00Z",
        "2026-12-31T13:00:00Z",
    ]
    assert answer == 7
    assert any(
        "cron job 'cron::noon' (noon): its schedule '0 0 12 * * * 2026' has no fire time after"
        in r.getMessage()
        for r in caplog.records
    )


# --- runtimes sharing a file store (SPEC §5: several processes MAY share one store) -----


async def until(condition: Any, what: str) -> None:
    """Wait (on the real clock, up to 5 s) for a condition that other tasks or the store's
    thread make true."""
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.001)
    assert condition(), what


def sharing(store_dir: str, clock: VirtualClock) -> III:
    """An app on the file store in ``store_dir``, as one of several processes would be."""
    config = Config(store=StoreConfig(store_method="file_based", file_path=store_dir))
    return III(config, clock=clock, shutdown_grace_ms=0)


def lease_until(tmp_path: Any) -> float:
    """The lease of the last cron fire taken in the test's store, as committed."""
    with closing(sqlite3.connect(tmp_path / "store" / DB_FILENAME)) as conn:
        (until,) = conn.execute("SELECT lease_until FROM cron_fires").fetchone()
    return float(until)


class Log:
    """Cron log lines of this test, by what they say."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG, logger="iii_embedded.cron")
        self.caplog = caplog

    def count(self, text: str, at: float) -> int:
        return sum(
            text in r.getMessage() and iso(at) in r.getMessage() for r in self.caplog.records
        )


async def test_runtimes_sharing_a_file_store_run_each_fire_once(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(start=T0)
    log = Log(caplog)
    runs: list[tuple[str, str]] = []
    apps = [sharing(str(tmp_path / "store"), clock) for _ in range(2)]
    for name, app in zip("ab", apps, strict=True):

        async def tick(payload: dict[str, Any], name: str = name) -> None:
            runs.append((payload["scheduled_time"], name))

        app.register_function("tick", tick)
        app.register_trigger(
            {"type": "cron", "function_id": "tick", "config": {"expression": "*/10 * * * * *"}}
        )
    async with apps[0].running(), apps[1].running():
        for fire in (10, 20, 30):
            await advance(clock, 10)
            # One runtime runs the fire; the other is told it runs elsewhere.
            await until(lambda f=fire: log.count("runs in another process", T0 + f) == 1, "skip")
            await until(lambda f=fire: [t for t, _ in runs].count(iso(T0 + f)) == 1, "run")
            await until(lambda: not any(app.runtime.cron_fires for app in apps), "it ends")
    assert sorted(t for t, _ in runs) == [iso(T0 + 10), iso(T0 + 20), iso(T0 + 30)]


async def test_a_fire_still_running_in_one_runtime_holds_back_the_next_in_all(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(start=T0)
    log = Log(caplog)
    started: list[str] = []
    release = anyio.Event()
    apps = [sharing(str(tmp_path / "store"), clock) for _ in range(2)]
    for app in apps:

        @app.function("slow", cron="*/10 * * * * *")
        async def slow(payload: dict[str, Any]) -> None:
            started.append(payload["scheduled_time"])
            if len(started) == 1:
                await release.wait()

    async with apps[0].running(), apps[1].running():
        await advance(clock, 10)
        await until(lambda: started == [iso(T0 + 10)], "the first fire runs")
        await advance(clock, 10)
        # The runtime running it skips the 20 s fire itself; the other finds it taken.
        await until(lambda: log.count("previous run is still going", T0 + 20) == 1, "own skip")
        await until(lambda: log.count("runs in another process", T0 + 20) == 1, "other skip")
        assert started == [iso(T0 + 10)]
        # Its 30 s lease is renewed while it runs: a minute later the schedule is still
        # held. (Each renewal is waited for: the virtual clock would otherwise outrun the
        # store's thread, as a real one never does by 20 s.)
        for fire in range(30, 90, 10):
            await until(lambda f=fire: lease_until(tmp_path) == T0 + f - 10 + 30, "renewed")
            await advance(clock, 10)
            await until(lambda f=fire: log.count("runs in another process", T0 + f) == 1, "held")
        assert started == [iso(T0 + 10)]
        release.set()
        await until(lambda: not any(app.runtime.cron_fires for app in apps), "the fire ends")
        await advance(clock, 10)
        await until(lambda: started == [iso(T0 + 10), iso(T0 + 90)], "the next fire runs")


async def test_a_runtime_that_stops_mid_fire_does_not_hold_back_the_next(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(start=T0)
    started: list[str] = []
    store_dir = str(tmp_path / "store")
    first, second = sharing(store_dir, clock), sharing(store_dir, clock)
    entered = anyio.Event()

    @first.function("slow", cron="*/10 * * * * *")
    async def forever(payload: dict[str, Any]) -> None:
        started.append(payload["scheduled_time"])
        entered.set()
        await anyio.sleep_forever()

    @second.function("slow", cron="*/10 * * * * *")
    async def quick(payload: dict[str, Any]) -> None:
        started.append(payload["scheduled_time"])

    async with first.running():
        await advance(clock, 10)
        with anyio.fail_after(5):
            await entered.wait()
    # `first` stopped with its fire running (its lease had 30 s left); `second` starts and
    # takes the next fire at once.
    async with second.running():
        await advance(clock, 10)
        await until(lambda: len(started) == 2, "the next fire runs")
    assert started == [iso(T0 + 10), iso(T0 + 20)]


async def test_a_store_error_while_taking_a_fire_skips_it_and_the_schedule_goes_on(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = VirtualClock(start=T0)
    iii = sharing(str(tmp_path / "store"), clock)
    record = Recorder()
    iii.register_function("tick", record)
    iii.register_trigger(
        {"type": "cron", "function_id": "tick", "config": {"expression": "*/10 * * * * *"}}
    )
    caplog.set_level(logging.ERROR, logger="iii_embedded.cron")
    async with iii.running():
        store = iii.runtime.store
        real = store.claim_fire
        failures = iter([StoreError(f"{store.location}: committing failed: the disk is full")])

        async def flaky(*args: Any, **kwargs: Any) -> bool:
            for exc in failures:
                raise exc
            return await real(*args, **kwargs)

        monkeypatch.setattr(store, "claim_fire", flaky)
        await advance(clock, 10)
        await until(lambda: len(caplog.records) == 1, "the error is logged")
        await advance(clock, 10)
        payload = await record.next()
    [error] = [r.getMessage() for r in caplog.records]
    assert f"skipped at {iso(T0 + 10)}" in error and "the disk is full" in error
    assert [p["scheduled_time"] for p in record.payloads] == [iso(T0 + 20)]
    assert payload["scheduled_time"] == iso(T0 + 20)


@pytest.mark.parametrize("serve", [True, False])
async def test_an_engine_started_with_serve_false_runs_no_schedule(serve: bool) -> None:
    """``running(serve=False)`` (``iii-embedded trigger --app``) leaves cron to the app."""
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    record = Recorder()
    iii.register_function("job", record)
    iii.register_function("ping", lambda _: "pong")
    iii.register_trigger(
        {
            "type": "cron",
            "id": "job-1",
            "function_id": "job",
            "config": {"expression": "* * * * * *"},
        }
    )
    async with iii.running(serve=serve):
        await advance(clock, 5)
        if serve:
            assert (await record.next())["job_id"] == "job-1"
        else:
            assert await iii.trigger_async("ping", None) == "pong"  # the engine runs
            assert record.payloads == []


EVERY_10_S = "*/10 * * * * *"


def cron(function_id: str, expression: str = EVERY_10_S, **extra: Any) -> dict[str, Any]:
    return {
        "type": "cron",
        "function_id": function_id,
        "config": {"expression": expression},
        **extra,
    }


async def test_an_unregistered_schedule_stops_and_its_running_fire_finishes() -> None:
    """``register_trigger`` returns a handle; ``unregister()`` stops the schedule (a tick
    schedule beside it shows the time that passed), a fire already running finishes, and
    the schedule registered again fires again."""
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    entered, release = anyio.Event(), anyio.Event()
    fired: list[str] = []
    finished: list[str] = []
    ticks = Recorder()

    async def job(payload: dict[str, Any]) -> None:
        fired.append(payload["scheduled_time"])
        if len(fired) == 1:
            entered.set()
            await release.wait()
        finished.append(payload["scheduled_time"])

    iii.register_function("job", job)
    iii.register_function("tick", ticks)
    handle = iii.register_trigger(cron("job"))
    iii.register_trigger(cron("tick"))
    assert (handle.type, handle.function_id, handle.config) == (
        "cron",
        "job",
        {"expression": EVERY_10_S},
    )
    async with iii.running():
        await advance(clock, 10)
        with anyio.fail_after(5):
            await entered.wait()
        handle.unregister()
        handle.unregister()  # twice: harmless
        release.set()
        await drain(iii)
        for _ in range(3):
            await advance(clock, 10)
            await drain(iii)
        assert (fired, finished) == ([iso(T0 + 10)], [iso(T0 + 10)])
        assert [p["scheduled_time"] for p in ticks.payloads] == [
            iso(T0 + s) for s in (10, 20, 30, 40)
        ]
        iii.register_trigger(cron("job"))  # again
        await advance(clock, 10)
        await drain(iii)
    assert fired == [iso(T0 + 10), iso(T0 + 50)]
    assert [job.function_id for job in iii.cron_jobs] == ["tick", "job"]


async def test_a_schedule_unregistered_before_start_or_at_once_never_fires() -> None:
    """Unregistered before the engine starts; registered while it runs and unregistered
    before the schedule's task first ran (from the loop) or from another thread."""
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    fired = Recorder()
    ticks = Recorder()
    for function_id in ("before", "at-once", "elsewhere"):
        iii.register_function(function_id, fired)
    iii.register_function("tick", ticks)
    iii.register_trigger(cron("tick"))
    iii.register_trigger(cron("before")).unregister()
    async with iii.running():
        iii.register_trigger(cron("at-once")).unregister()
        elsewhere = iii.register_trigger(cron("elsewhere"))
        await anyio.lowlevel.checkpoint()
        await anyio.to_thread.run_sync(elsewhere.unregister)
        for _ in range(3):
            await advance(clock, 10)
            await drain(iii)
    assert fired.payloads == []
    assert len(ticks.payloads) == 3
    assert [job.function_id for job in iii.cron_jobs] == ["tick"]
    assert iii.triggers == [cron("tick")]


async def test_a_schedule_registered_twice_stays_until_both_handles_are_unregistered() -> None:
    clock = VirtualClock(start=T0)
    iii = III(clock=clock, shutdown_grace_ms=0)
    fired = Recorder()

    @iii.function("job", cron=EVERY_10_S)  # the decorator's registration is one
    async def job(payload: dict[str, Any]) -> None:
        await fired(payload)

    handle = iii.register_trigger(cron("job"))  # the same schedule: it fires once
    named = iii.register_trigger(cron("job", id="nightly"))  # one of its own
    assert named.id == "nightly"
    async with iii.running():
        await advance(clock, 10)
        await drain(iii)
        named.unregister()
        handle.unregister()  # the decorator's registration still holds it
        await advance(clock, 10)
        await drain(iii)
    assert sorted((p["scheduled_time"], p["job_id"]) for p in fired.payloads) == [
        (iso(T0 + 10), "cron::job"),
        (iso(T0 + 10), "nightly"),
        (iso(T0 + 20), "cron::job"),
    ]
