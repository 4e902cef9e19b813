"""The testing helpers (SPEC §9) in the cases a review found them short (2026-12-03):
``drain`` moves a virtual clock on while handlers wait for retrying runs, waits for a
cron fire whose time the test advanced past, and for the jobs a late registration
releases; the inspection helpers return runs with decoded payloads and refuse a
misspelt queue."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    QueueConfig,
    StoreConfig,
    SystemClock,
    TriggerAction,
)
from iii_embedded.testing import (
    DrainTimeout,
    VirtualClock,
    dead_jobs,
    drain,
    drain_blocking,
    held_jobs,
    http_request,
    queued_jobs,
    running_jobs,
)

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


# --- found by a review of the testing helpers (2026-12-03, second round) ---------------


async def test_the_inspection_helpers_return_every_run_not_the_first_thousand(
    store_config: StoreConfig,
) -> None:
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    iii.register_function("f", lambda _: None)
    async with iii.running():
        await iii.batch_trigger_async("f", list(range(1500)), queue="default", delay_ms=60_000)
        queued = await queued_jobs(iii, "default")
        stats = await iii.queue_stats_async("default")
    assert (len(queued), stats.delayed) == (1500, 1500)
    assert [run.payload for run in queued] == list(range(1500))


def test_advancing_the_clock_from_a_synchronous_test_moves_it_on_the_engines_loop() -> None:
    """The engine on its own thread (``with iii:``), the test on the main one: advancing
    the clock fires the timers on the engine's loop (from the test's thread it raised
    "no running event loop" and lost the delayed job's wake-up)."""
    clock = VirtualClock()
    iii = III(Config(queues={"q": QueueConfig(name="q")}), clock=clock, shutdown_grace_ms=0)
    ran: list[float] = []
    iii.register_function("f", lambda _: ran.append(clock.now()))
    with iii:
        start = clock.now()
        iii.trigger("f", 1, action=TriggerAction.Enqueue(queue="q", delay_ms=60_000))
        drain_blocking(iii, max_advance_s=0)  # the dispatcher now sleeps until the job's time
        clock.advance(61)
        drain_blocking(iii, max_advance_s=0)
        stats = iii.queue_stats("q")
    assert ran == [start + 61]
    assert (stats.ready, stats.delayed, stats.completed) == (0, 0, 1)


def test_drain_awaited_on_another_event_loop_drains_the_engines() -> None:
    """An engine started with ``iii.start()``, a program on its own asyncio loop: drain
    runs on the engine's loop (it advanced the clock from the wrong loop, timed out, and
    broke the shutdown)."""
    import asyncio

    clock = VirtualClock()
    iii = III(Config(queues={"q": QueueConfig(name="q")}), clock=clock, shutdown_grace_ms=0)
    ran: list[int] = []
    iii.register_function("f", ran.append)

    async def program() -> None:
        await iii.trigger_async("f", 1, action=TriggerAction.Enqueue(queue="q", delay_ms=5000))
        await drain(iii, timeout=10)

    iii.start()
    try:
        asyncio.run(program())
    finally:
        iii.shutdown()
    assert ran == [1]


def test_running_the_engine_under_trio_says_it_needs_asyncio() -> None:
    pytest.importorskip("trio")

    async def main() -> None:
        async with III().running():
            pass

    with pytest.raises(RuntimeError, match=r"engine runs on asyncio .* iii\.start\(\)"):
        anyio.run(main, backend="trio")


async def test_drain_stops_the_clock_at_a_waiters_timeout_before_a_later_retry(
    store_config: StoreConfig,
) -> None:
    """A handler waits for a child with ``timeout_ms=10_000``; the child's retry is due
    after 60 s. The wait times out at +10 s of virtual time, not at +60 (drain jumped
    straight to the retry, past the timeout)."""
    clock = VirtualClock()
    queues = {
        "parent": QueueConfig(name="parent"),
        "child": QueueConfig(name="child", max_retries=2, backoff_ms=60_000),
    }
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    seen: list[tuple[str, float]] = []
    child_calls: list[float] = []

    async def child(_: Any) -> None:
        child_calls.append(clock.now())
        if len(child_calls) == 1:
            raise RuntimeError("flaky")

    async def parent(payload: Any) -> None:
        t0 = clock.now()
        try:
            await iii.trigger_and_wait_async("child", payload, queue="child", timeout_ms=10_000)
            seen.append(("done", clock.now() - t0))
        except InvocationError as exc:
            seen.append((exc.code, clock.now() - t0))

    iii.register_function("child", child)
    iii.register_function("parent", parent)
    async with iii.running():
        await iii.trigger_async("parent", {}, action=TriggerAction.Enqueue(queue="parent"))
        await drain(iii, timeout=10)
    assert seen == [("TIMEOUT", 10.0)]
    assert [t - child_calls[0] for t in child_calls] == [0.0, 60.0]


async def test_drain_waits_for_a_synchronous_call_in_flight() -> None:
    """A call with no action whose handler awaits something outside the engine: drain
    waits for it (it returned at once), and does not move the clock under it (a delayed
    job an hour ahead made it time the call out)."""
    clock = VirtualClock()
    iii = III(Config(queues={"q": QueueConfig(name="q")}), clock=clock, shutdown_grace_ms=0)
    entered, release = anyio.Event(), anyio.Event()
    out: list[Any] = []
    drained: list[float] = []

    async def slow(_: Any) -> str:
        entered.set()
        await release.wait()  # outside the engine: a socket, say
        return "ok"

    async def call() -> None:
        try:
            out.append(await iii.trigger_async("slow", 1))
        except InvocationError as exc:
            out.append(exc.code)

    async def drain_it() -> None:
        await drain(iii, timeout=10)
        drained.append(clock.now())

    iii.register_function("slow", slow)
    iii.register_function("later", lambda _: None)
    async with iii.running(), anyio.create_task_group() as tg:
        start = clock.now()
        later = TriggerAction.Enqueue(queue="q", delay_ms=3_600_000)
        await iii.trigger_async("later", 1, action=later)
        tg.start_soon(call)
        await entered.wait()
        tg.start_soon(drain_it)
        for _ in range(50):  # drain gets every chance to return early
            await anyio.lowlevel.checkpoint()
        before = (list(drained), clock.now() - start)
        release.set()
    assert before == ([], 0.0)
    assert out == ["ok"]
    assert drained == [start + 3600]


async def test_drain_blocking_on_the_engines_loop_names_the_fix() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)
    async with iii.running():
        with pytest.raises(RuntimeError, match=r"use `await drain\(iii\)`"):
            drain_blocking(iii)


async def test_drain_moves_the_clock_under_a_call_that_only_waits_on_a_nested_call() -> None:
    """A synchronous call whose handler makes another synchronous call, which waits for a
    child that retries in 10 s: the outer call only waits, so drain moves the clock to the
    retry (it counted the outer call as running and timed out; found by a review)."""
    clock = VirtualClock()
    queue = QueueConfig(name="q", max_retries=2, backoff_ms=10_000)
    iii = III(Config(queues={"q": queue}), clock=clock, shutdown_grace_ms=0)
    calls: list[float] = []
    out: list[Any] = []

    async def child(_: Any) -> str:
        calls.append(clock.now())
        if len(calls) == 1:
            raise RuntimeError("flaky")
        return "ok"

    async def inner(_: Any) -> Any:
        return (await iii.trigger_and_wait_async("child", {}, queue="q")).status

    async def outer(_: Any) -> Any:
        return await iii.trigger_async("inner", {})

    for fid, handler in (("child", child), ("inner", inner), ("outer", outer)):
        iii.register_function(fid, handler)

    async def call() -> None:
        out.append(await iii.trigger_async("outer", {}))

    async with iii.running(), anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(5):
            while not calls:  # the child's first attempt has run
                await anyio.lowlevel.checkpoint()
        await drain(iii, timeout=10)
    assert out == ["completed"]
    assert [t - calls[0] for t in calls] == [0.0, 10.0]


def test_a_clock_shared_by_two_started_apps_fires_each_timer_on_its_own_loop() -> None:
    """Two engines on their own threads, one VirtualClock: advancing it from the test's
    thread wakes each engine's timers on that engine's loop, whichever stopped first (the
    clock knew one loop, the last started, and lost the other's timers once it stopped)."""
    clock = VirtualClock()

    def app() -> III:
        return III(Config(queues={"q": QueueConfig(name="q")}), clock=clock, shutdown_grace_ms=0)

    a, b = app(), app()
    ran: list[tuple[str, float]] = []
    a.register_function("f", lambda _: ran.append(("a", clock.now())))
    b.register_function("f", lambda _: ran.append(("b", clock.now())))
    a.start()
    b.start()
    try:
        start = clock.now()
        later = TriggerAction.Enqueue(queue="q", delay_ms=60_000)
        a.trigger("f", 1, action=later)
        b.trigger("f", 1, action=later)
        drain_blocking(a, max_advance_s=0)
        drain_blocking(b, max_advance_s=0)
        clock.advance(30)
        b.shutdown()  # b's timer is gone with it; a's must still fire
        clock.advance(31)
        drain_blocking(a, max_advance_s=0)
    finally:
        a.shutdown()
        b.shutdown()
    assert ran == [("a", start + 61)]


async def test_a_virtual_clock_forgets_timers_cancelled_before_their_time() -> None:
    """Timers left before their deadline (a wait's timeout that did not expire, a sleep
    cut short) stayed in the clock's heap until the clock reached them, with what they
    referenced: a test that starts and stops one app many times, or waits with timeouts
    on a clock it never moves that far, grew them without end. They are swept once they
    outnumber the live ones."""
    clock = VirtualClock()
    live = clock.call_at(clock.now() + 10, lambda: None)
    for _ in range(500):
        with clock.deadline_scope(clock.now() + 60):
            await anyio.lowlevel.checkpoint()
        clock.call_at(clock.now() + 60, lambda: None)()  # set, then cancelled
        with anyio.move_on_after(0):  # a sleep cut short
            await clock.sleep_until(clock.now() + 60)
    assert len(clock._timers) < 64  # the live timer, and fewer dead ones than a sweep takes
    assert clock.next_deadline() == clock.now() + 10
    live()
    assert clock.next_deadline() is None


async def test_drain_moves_the_clock_to_a_fifo_groups_head_not_to_a_job_behind_it(
    store_config: StoreConfig,
) -> None:
    """A job due before its group's head waits for it: drain had the file store's clock
    at that job's time (nothing could run there), the memory store's at the head's;
    found by the two stores' differential fuzz."""
    clock = VirtualClock(0.0)
    fifo = QueueConfig(name="ledger", type="fifo", message_group_field="account")
    iii = III(
        Config(queues={"ledger": fifo}, store=store_config), clock=clock, shutdown_grace_ms=0
    )
    ran: list[tuple[str, float]] = []

    @iii.function("post")
    async def post(entry: dict[str, str]) -> None:
        ran.append((entry["what"], clock.now()))

    async with iii.running():
        for what, delay_ms in (("head", 700), ("behind", 300)):
            action = TriggerAction.Enqueue(queue="ledger", delay_ms=delay_ms)
            await iii.trigger_async("post", {"account": "a", "what": what}, action=action)
        await drain(iii, max_advance_s=0.3)
        assert (clock.now(), ran) == (0.0, [])
        await drain(iii, max_advance_s=1.0)
    assert ran == [("head", 0.7), ("behind", 0.7)]
    assert clock.now() == 0.7


async def test_drain_runs_a_retry_whose_time_the_test_advanced_the_clock_past(
    store_config: StoreConfig,
) -> None:
    """``clock.advance`` past a delayed retry, then ``drain``: the memory store's drain
    returned at once (the queue's timer had fired, but its dispatcher had not run yet and
    still read idle), leaving the retry unrun."""
    clock = VirtualClock()
    queues = {"work": QueueConfig(name="work", max_retries=2, backoff_ms=1000)}
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    calls: list[float] = []

    @iii.function("flaky")
    async def flaky(_: Any) -> str:
        calls.append(clock.now())
        if len(calls) == 1:
            raise ConnectionError("first attempt fails")
        return "done"

    async with iii.running():
        start = clock.now()
        receipt = await iii.trigger_async("flaky", {}, action=TriggerAction.Enqueue(queue="work"))
        await drain(iii, max_advance_s=0)  # the first attempt; its retry is due at +1 s
        assert [run.status for run in await queued_jobs(iii, "work")] == ["delayed"]
        clock.advance(5)
        await drain(iii, max_advance_s=0)
        run = await iii.runs.get_async(receipt["messageReceiptId"])
    assert [t - start for t in calls] == [0, 5]
    assert (run.status, run.attempts, run.output) == ("completed", 2, "done")


async def test_held_jobs_lists_the_runs_waiting_for_their_function(
    store_config: StoreConfig,
) -> None:
    """A job whose function is not registered is held: counted in the statistics, but
    neither queued nor running, so no helper listed it."""
    clock = VirtualClock()
    iii = III(Config(store=store_config), clock=clock, shutdown_grace_ms=0)
    ref = iii.register_function("resize", lambda image: f"{image['name']} resized")
    iii.register_function("other", lambda _: None)
    async with iii.running():
        action = TriggerAction.Enqueue(queue="default", delay_ms=1000)
        receipt = await iii.trigger_async("resize", {"name": "cat.png"}, action=action)
        ref.unregister()
        await drain(iii)  # the job falls due and is held, not attempted
        held = await held_jobs(iii, "default")
        everywhere = await held_jobs(iii)
        queued = await queued_jobs(iii, "default")
        stats = await iii.queue_stats_async("default")
        with pytest.raises(ValueError):
            await held_jobs(iii, "defualt")
        iii.register_function("resize", lambda image: f"{image['name']} resized")
        await drain(iii)
        after = await held_jobs(iii)
        run = await iii.runs.get_async(receipt["messageReceiptId"])
    assert [(r.id, r.payload, r.attempts) for r in held] == [
        (receipt["messageReceiptId"], {"name": "cat.png"}, 0)
    ]
    assert [r.id for r in everywhere] == [r.id for r in held]
    assert (queued, stats.held, after) == ([], 1, [])
    assert (run.status, run.output) == ("completed", "cat.png resized")


async def test_drain_with_max_advance_returns_while_a_handler_waits_for_a_later_retry(
    store_config: StoreConfig,
) -> None:
    """``drain(iii, max_advance_s=60)`` while a parent waits for a child whose retry is
    due after the limit: drain kept waiting in wall time until ``DrainTimeout`` (30 s by
    default), though nothing could happen within the limit. It returns with the parent
    still waiting; a waiter's timeout within the limit still fires at its own time."""
    clock = VirtualClock()
    queues = {
        "parent": QueueConfig(name="parent"),
        "child": QueueConfig(name="child", max_retries=2, backoff_ms=100_000),
    }
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    child_calls: list[float] = []
    outcomes: list[tuple[str, float]] = []

    async def child(_: Any) -> str:
        child_calls.append(clock.now())
        if len(child_calls) % 2:
            raise ConnectionError("flaky")
        return "ok"

    async def parent(timeout_ms: int) -> None:
        t0 = clock.now()
        try:
            result = await iii.trigger_and_wait_async(
                "child", {}, queue="child", timeout_ms=timeout_ms
            )
            outcomes.append((str(result.output), clock.now() - t0))
        except InvocationError as exc:
            outcomes.append((exc.code, clock.now() - t0))

    iii.register_function("child", child)
    iii.register_function("parent", parent)
    async with iii.running():
        start = clock.now()
        await iii.trigger_async("parent", 200_000, action=TriggerAction.Enqueue(queue="parent"))
        await drain(iii, max_advance_s=60, timeout=10)
        waiting = await running_jobs(iii, "parent")
        first = (clock.now() - start, list(outcomes))
        await drain(iii, timeout=10)
        second = (clock.now() - start, list(outcomes))
        start = clock.now()
        await iii.trigger_async("parent", 30_000, action=TriggerAction.Enqueue(queue="parent"))
        await drain(iii, max_advance_s=60, timeout=10)
        third = (clock.now() - start, list(outcomes))
    assert [run.payload for run in waiting] == [200_000]
    assert first == (0.0, [])
    assert second == (100.0, [("ok", 100.0)])
    assert third == (30.0, [("ok", 100.0), ("TIMEOUT", 30.0)])


async def test_drain_timeout_names_the_held_run_a_handler_waits_for(
    store_config: StoreConfig,
) -> None:
    """A parent waits for a child whose function was unregistered: the child is held and
    drain can only time out. The message said "1 job(s) claimed and not settled", with
    nothing about the wait or the held run."""
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    ref = iii.register_function("child", lambda n: n)

    @iii.function("parent")
    async def parent(n: int) -> Any:
        return (await iii.trigger_and_wait_async("child", n, delay_ms=1000)).output

    async with iii.running():
        await iii.trigger_async("parent", 1, action=TriggerAction.Enqueue())
        await drain(iii, max_advance_s=0)  # the parent now waits for its delayed child
        ref.unregister()
        with pytest.raises(DrainTimeout) as timed_out:
            await drain(iii, timeout=0.5)
    assert str(timed_out.value) == (
        "still busy after 0.5 s of wall time: 1 job(s) claimed and not settled in "
        "'default' (1 waiting for other runs); 1 run(s) held in 'default' (function not "
        "registered)"
    )


async def test_dead_jobs_without_a_queue_lists_every_queues_dead_jobs(
    store_config: StoreConfig,
) -> None:
    """``assert await dead_jobs(iii) == []`` checks that nothing died anywhere; the queue
    was a required argument."""
    queues = {name: QueueConfig(name=name, max_retries=1) for name in ("email", "payment")}
    iii = III(Config(queues=queues, store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)

    @iii.function("fail")
    async def fail(what: str) -> None:
        raise ValueError(f"{what} failed")

    async with iii.running():
        before = await dead_jobs(iii)
        for queue in ("payment", "email", "payment"):
            action = TriggerAction.Enqueue(queue=queue)
            await iii.trigger_async("fail", f"{queue} job", action=action)
            await drain(iii)
        everywhere = await dead_jobs(iii)
        with pytest.raises(ValueError):
            await dead_jobs(iii, "emial")
    assert before == []
    assert [(job.queue, job.payload, job.attempts) for job in everywhere] == [
        ("email", "email job", 1),
        ("payment", "payment job", 1),
        ("payment", "payment job", 1),
    ]


def test_the_iii_app_fixture_stops_an_engine_the_test_left_started(tmp_path: Path) -> None:
    """A synchronous test that calls ``iii_app.start()`` and no ``shutdown()`` left the
    engine and its threads running into the next tests."""
    (tmp_path / "test_left_running.py").write_text(
        "import threading\n"
        "started = []\n"
        "def test_starts_and_forgets(iii_app):\n"
        "    iii_app.register_function('echo', lambda d: d)\n"
        "    started.append(iii_app.start())\n"
        "    assert iii_app.trigger('echo', 1) == 1\n"
        "def test_next_test():\n"
        "    assert not started[0].is_running\n"
        "    assert not [t.name for t in threading.enumerate() if 'portal' in t.name]\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_left_running.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "2 passed" in done.stdout, done.stdout + done.stderr


async def test_http_request_calls_an_http_trigger_and_drain_runs_what_it_enqueued(
    store_config: StoreConfig,
) -> None:
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    shipped: list[str] = []

    async def create(request: dict[str, Any]) -> dict[str, Any]:
        order = {"id": request["path_params"]["id"], **request["body"]}
        action = TriggerAction.Enqueue(delay_ms=3_600_000)
        await iii.trigger_async("ship", order, action=action)
        return {
            "status_code": 201,
            "body": {"order": order, "page": request["query_params"]["page"]},
            "headers": {"x-seen": request["headers"]["x-client"]},
        }

    iii.register_function("create", create)
    iii.register_function("ship", lambda order: shipped.append(order["id"]))
    route = {"api_path": "/orders/:id", "http_method": "POST"}
    iii.register_trigger({"type": "http", "function_id": "create", "config": route})
    async with iii.running():
        created = await http_request(
            iii, "POST", "/orders/4%2F2?page=2", json={"sku": "tea"}, headers={"X-Client": "t1"}
        )
        missing = await http_request(iii, "GET", "/nowhere")
        text = await http_request(iii, "POST", "/orders/7", body=b"not json")
        await drain(iii)
    assert (created.status_code, created.headers["x-seen"]) == (201, "t1")
    assert created.json() == {"order": {"id": "4/2", "sku": "tea"}, "page": "2"}
    assert (missing.status_code, missing.json()["error"]) == (404, "not found")
    assert text.status_code == 500
    assert shipped == ["4/2"]


async def test_drain_inside_a_handler_is_refused_at_once_naming_the_handler() -> None:
    """A handler that drains would wait for itself: refused at once with a message that
    says so (it used to end in DrainTimeout blaming a running call), in an async handler
    and in a sync one (``drain_blocking``)."""
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)

    @iii.function("drains")
    async def drains(_: Any) -> str:
        try:
            await drain(iii, timeout=5)
        except RuntimeError as exc:
            return str(exc)
        return "drained"

    @iii.function("drains_blocking")
    def drains_blocking(_: Any) -> str:
        try:
            drain_blocking(iii, timeout=5)
        except RuntimeError as exc:
            return str(exc)
        return "drained"

    async with iii.running():
        said = await iii.trigger_async("drains", None)
        said_blocking = await iii.trigger_async("drains_blocking", None)
    assert said == (
        "drain() waits until every handler has returned, and it was called inside the "
        "handler of 'drains', which would wait for itself: call it from the test"
    )
    assert "drain_blocking() waits until every handler has returned" in said_blocking
    assert "handler of 'drains_blocking'" in said_blocking


async def test_drain_runs_a_job_that_fell_due_while_its_queue_read_the_next_due_time() -> None:
    """A test moves a virtual clock past a delayed job while the queue's dispatcher is
    reading when that job falls due (the store's answer is already in the past when it
    arrives): the dispatcher set a timer for that past time, which a virtual clock fires
    only at its next move, and went idle; ``drain`` then found nothing running and nothing
    delayed and returned with the job unrun (seen with a FIFO queue beside a standard one
    on a file store, where reads take a thread's turn)."""
    clock = VirtualClock()
    iii = III(Config(queues={"work": QueueConfig(name="work")}), clock=clock, shutdown_grace_ms=0)
    ran: list[float] = []
    iii.register_function("job", lambda _: ran.append(clock.now()))

    async with iii.running():
        store = iii.runtime.store
        read = store.next_available_at
        test_task = asyncio.current_task()

        async def read_while_the_test_advances(queue: str, now: float) -> float | None:
            answer = await read(queue, now)
            if answer is not None and asyncio.current_task() is not test_task:
                clock.advance_to(answer)  # as a test's advance landing during the read
            return answer

        store.next_available_at = read_while_the_test_advances  # type: ignore[method-assign]
        start = clock.now()
        action = TriggerAction.Enqueue(queue="work", delay_ms=1000)
        await iii.trigger_async("job", {}, action=action)
        await drain(iii, max_advance_s=0)
        store.next_available_at = read  # type: ignore[method-assign]
    assert [t - start for t in ran] == [1.0]


class _LateTimers(SystemClock):
    """The system clock, with timers that fire late: an event loop busy elsewhere comes
    round to a due timer only after the wall clock has passed its time."""

    def call_at(
        self, deadline: float, callback: Callable[[], None], *, drain_stops: bool = True
    ) -> Callable[[], None]:
        return super().call_at(deadline + 5.0, callback, drain_stops=drain_stops)


async def test_drain_on_the_system_clock_runs_a_job_that_fell_due_before_its_timer_fired(
    store_config: StoreConfig,
) -> None:
    """Until 2026-12-03 drain returned with such a job unrun: the job was no longer
    delayed (no due time ahead to sleep to), its queue idle until its timer fired, and
    so every queue looked quiet once the other queue's job ended (found by a chaos run,
    under load)."""
    queues = {"other": QueueConfig(name="other")}
    iii = III(Config(queues=queues, store=store_config), clock=_LateTimers(), shutdown_grace_ms=0)
    ran: list[str] = []

    @iii.function("busy")
    async def busy(due: float) -> None:
        with anyio.fail_after(10):
            while time.time() <= due:  # runs until the delayed job has fallen due
                await anyio.sleep(0.005)
        ran.append("busy")

    iii.register_function("later", lambda _: ran.append("later"))
    async with iii.running():
        due = time.time() + 0.05
        later = await iii.trigger_async(
            "later", {}, action=TriggerAction.Enqueue(queue="default", delay_ms=50)
        )
        await iii.trigger_async("busy", due, action=TriggerAction.Enqueue(queue="other"))
        with anyio.fail_after(4):  # well before the late timer
            await drain(iii)
        run = await iii.runs.get_async(later)
    assert ran == ["busy", "later"]
    assert run is not None and run.status == "completed"
