"""Event hooks for metrics, the runtime's log records, and JSON logs (SPEC §10)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

import iii_embedded._queues
from iii_embedded import (
    III,
    Config,
    JsonFormatter,
    Logger,
    NonRetryableError,
    QueueConfig,
    StoreConfig,
    StoreError,
    TriggerAction,
)
from iii_embedded._stores import Job, NewJob
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app() -> III:
    return III(
        Config(queues={"q": QueueConfig(name="q", max_retries=2, backoff_ms=10)}),
        clock=VirtualClock(),
        shutdown_grace_ms=0,
    )


async def test_hooks_fire_for_each_job_event() -> None:
    iii = make_app()
    events: Counter[str] = Counter()
    seen: dict[str, list[str]] = {}

    def hook(name: str) -> Any:
        def record(job: Any, **info: Any) -> None:
            events[name] += 1
            seen.setdefault(name, []).append(job.function_id)

        return record

    for name in ("job_started", "job_succeeded", "job_failed", "job_retried", "job_dead_lettered"):
        iii.on(name, hook(name))
    iii.register_function("ok", lambda _: "fine")
    iii.register_function("bad", lambda _: 1 / 0)
    async with iii.running():
        for fid in ("ok", "bad"):
            await iii.trigger_async(fid, {}, action=TriggerAction.Enqueue(queue="q"))
        await drain(iii)
    assert events == Counter(
        {
            "job_started": 3,
            "job_succeeded": 1,
            "job_failed": 2,
            "job_retried": 1,
            "job_dead_lettered": 1,
        }
    )
    assert seen["job_dead_lettered"] == ["bad"]


async def test_a_failing_hook_is_logged_and_the_job_unaffected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    iii = make_app()
    iii.on("job_succeeded", lambda job, **info: 1 / 0)
    iii.register_function("ok", lambda _: "fine")
    async with iii.running():
        await iii.trigger_async("ok", {}, action=TriggerAction.Enqueue(queue="q"))
        await drain(iii)
        assert (await iii.queue_stats_async("q")).completed == 1
    assert any("event hook" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="unknown event"):
        iii.on("job_exploded", print)


async def test_runtime_logs_carry_the_job_fields(caplog: pytest.LogCaptureFixture) -> None:
    iii = make_app()
    iii.register_function("bad", lambda _: 1 / 0)
    caplog.set_level(logging.INFO, logger="iii_embedded")
    async with iii.running():
        receipt = await iii.trigger_async("bad", {}, action=TriggerAction.Enqueue(queue="q"))
        await drain(iii)
    failed = [r for r in caplog.records if "failed attempt" in r.getMessage()]
    dead = [r for r in caplog.records if "dead-letter queue" in r.getMessage()]
    assert len(failed) == 1 and len(dead) == 1
    assert dead[0].levelno == logging.WARNING
    for record, attempt in ((failed[0], 1), (dead[0], 2)):
        assert record.function_id == "bad"  # type: ignore[attr-defined]
        assert record.receipt_id == receipt["messageReceiptId"]  # type: ignore[attr-defined]
        assert record.queue == "q"  # type: ignore[attr-defined]
        assert record.attempt == attempt  # type: ignore[attr-defined]
        assert record.duration_ms >= 0  # type: ignore[attr-defined]
    assert "ZeroDivisionError: division by zero" in failed[0].getMessage()


async def test_json_formatter_writes_one_object_per_record() -> None:
    iii = make_app()
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("iii_embedded.user")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def work(data: dict[str, Any]) -> None:
        Logger().info("charging", {"amount": data["amount"]})

    iii.register_function("pay", work)
    try:
        async with iii.running():
            receipt = await iii.trigger_async(
                "pay", {"amount": 5}, action=TriggerAction.Enqueue(queue="q")
            )
            await drain(iii)
    finally:
        logger.removeHandler(handler)
    [line] = lines
    record = json.loads(line)
    assert record["message"] == "charging {'amount': 5}"
    assert record["level"] == "info"
    assert (record["function_id"], record["receipt_id"], record["queue"], record["attempt"]) == (
        "pay",
        receipt["messageReceiptId"],
        "q",
        1,
    )
    assert record["data"] == {"amount": 5}


@pytest.mark.parametrize("on_file", [False, True], ids=["in_memory", "file_based"])
async def test_every_cancelled_run_fires_job_cancelled_once_whatever_its_state(
    on_file: bool, tmp_path: Path
) -> None:
    """Running, prefetched, queued and delayed runs all end ``cancelled``, and each fires
    the hook exactly once, whether its runner settled it or the cancel did."""
    queue = QueueConfig(name="q", concurrency=1, prefetch=1)
    store = (
        StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))
        if on_file
        else StoreConfig()
    )
    iii = III(Config(queues={"q": queue}, store=store), clock=VirtualClock(), shutdown_grace_ms=0)
    started = anyio.Event()
    ran: list[int] = []

    async def block(n: int) -> None:
        ran.append(n)
        started.set()
        await anyio.sleep_forever()

    iii.register_function("block", block)
    cancelled: list[str] = []
    iii.on("job_cancelled", lambda job, **_: cancelled.append(job.id))
    async with iii.running():
        runner = iii.runtime.runners["q"]
        ids = []
        for n in range(3):
            receipt = await iii.trigger_async("block", n, action=TriggerAction.Enqueue(queue="q"))
            ids.append(str(receipt["messageReceiptId"]))
        delayed = TriggerAction.Enqueue(queue="q", delay_ms=60_000)
        ids.append(str((await iii.trigger_async("block", 3, action=delayed))["messageReceiptId"]))
        with anyio.fail_after(10):
            await started.wait()
            while runner.prefetched_count != 1:
                await anyio.lowlevel.checkpoint()
        results = [await iii.runs.cancel_async(i) for i in reversed(ids)]
        await drain(iii)
        runs = [await iii.runs.get_async(i) for i in ids]
        stats = await iii.queue_stats_async("q")
    assert [r.cancelled for r in results] == [True] * 4
    assert [r.status for r in runs if r is not None] == ["cancelled"] * 4
    assert ran == [0]  # only the first started; the prefetched one never did
    assert sorted(cancelled) == sorted(ids)
    assert (stats.running, stats.ready, stats.delayed) == (0, 0, 0)


async def test_a_run_whose_attempt_fails_after_its_cancel_was_asked_ends_cancelled_at_once(
    store_config: StoreConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The attempt fails before the cancel's stop reaches it (its retry is decided, not
    yet written, when another run cancels it). The run ends ``cancelled`` when that retry
    is written, with the failed attempt's error, instead of going back to the queue to
    wait out its backoff (1,000 s here) and being cancelled only then: its waiter hears
    at once, the hooks say failed then cancelled (not retried), and a second cancel finds
    it finished. Until 2026-12-03 it read ``delayed`` until its retry fell due."""
    clock = VirtualClock()
    queue = QueueConfig(name="work", concurrency=1, prefetch=4, backoff_ms=1_000_000)
    iii = III(Config(queues={"work": queue}, store=store_config), clock=clock, shutdown_grace_ms=0)
    gate = anyio.Event()
    results: list[Any] = []

    async def job(p: dict[str, Any]) -> None:
        if "gate" in p:
            await gate.wait()
        elif "fail" in p:
            raise RuntimeError("attempt fails")  # before the cancel's flag reaches it
        elif "cancel" in p:  # cancels another run, in the same worker's turn
            results.append(await iii.runs.cancel_async(p["cancel"]))

    async def enqueue(payload: dict[str, Any]) -> str:
        action = TriggerAction.Enqueue(queue="work")
        return str((await iii.trigger_async("job", payload, action=action))["messageReceiptId"])

    iii.register_function("job", job)
    hooked: list[tuple[str, str]] = []
    for name in ("job_failed", "job_retried", "job_cancelled"):
        iii.on(name, lambda j, _name=name, **_: hooked.append((_name, j.id)))
    caplog.set_level(logging.INFO, logger="iii_embedded")
    async with iii.running():
        runner = iii.runtime.runners["work"]
        await enqueue({"gate": 0})  # holds the one slot: the next two are prefetched
        a = await enqueue({"fail": 1})
        await enqueue({"cancel": a})
        waited: Any = None
        async with anyio.create_task_group() as tg:

            async def wait_for_a() -> None:
                nonlocal waited
                waited = await iii.runs.wait_async(a)

            tg.start_soon(wait_for_a)
            gate.set()  # A fails (its retry not written yet), then the next run flags A
            with anyio.fail_after(5):  # not drain(): it would move the clock to A's retry
                while waited is None:
                    await anyio.lowlevel.checkpoint()
        at = clock.now()
        run = await iii.runs.get_async(a)
        again = await iii.runs.cancel_async(a)
        stats = (await iii.stats_async())["work"]
        await drain(iii)
        settled = runner.unsettled
    assert [r.message for r in results] == ["running; asked to stop"]
    assert waited is not None and waited.status == "cancelled"
    assert run is not None and (run.status, run.attempts) == ("cancelled", 1)
    assert run.error is not None and run.error.message == "attempt fails"
    assert run.finished_at == at
    assert (again.cancelled, again.status_before) == (False, "cancelled")
    assert hooked == [("job_failed", a), ("job_cancelled", a)]
    assert (stats.failed, stats.retried) == (1, 0)
    assert settled == 0
    assert any("is not retried" in r.getMessage() and a in r.getMessage() for r in caplog.records)


def one_slot_app(store: StoreConfig) -> III:
    """A queue "work" with one slot and room to prefetch 4, on ``store``."""
    queue = QueueConfig(name="work", concurrency=1, prefetch=4)
    return III(
        Config(queues={"work": queue}, store=store), clock=VirtualClock(), shutdown_grace_ms=0
    )


async def test_a_redriven_run_is_not_stopped_by_a_cancel_asked_of_its_dead_attempt(
    store_config: StoreConfig,
) -> None:
    """A cancel flags a running attempt that then dies: the redriven run is a new one,
    which the spent request does not stop. It runs, and fires no ``job_cancelled``."""
    iii = one_slot_app(store_config)
    gate = anyio.Event()
    results: list[Any] = []
    ran: list[str] = []

    async def job(p: dict[str, Any]) -> None:
        if "gate" in p:
            await gate.wait()
        elif "fail" in p:
            ran.append("A")
            if len(ran) == 1:
                raise NonRetryableError("dies")  # its outcome is not written yet...
        elif "cancel" in p:
            results.append(await iii.runs.cancel_async(p["cancel"]))  # ...when this flags it

    async def enqueue(payload: dict[str, Any]) -> str:
        action = TriggerAction.Enqueue(queue="work")
        return str((await iii.trigger_async("job", payload, action=action))["messageReceiptId"])

    iii.register_function("job", job)
    hooked: list[str] = []
    iii.on("job_cancelled", lambda j, **_: hooked.append(j.id))
    async with iii.running():
        await enqueue({"gate": 0})
        a = await enqueue({"fail": 1})
        await enqueue({"cancel": a})
        gate.set()
        await drain(iii)
        dead = await iii.runs.get_async(a)
        await iii.dlq_redrive_async("work", [a])
        await drain(iii)
        run = await iii.runs.get_async(a)
    assert [r.message for r in results] == ["running; asked to stop"]
    assert dead is not None and dead.status == "failed"
    assert ran == ["A", "A"]
    assert run is not None and (run.status, run.attempts) == ("completed", 1)
    assert hooked == []


async def test_a_run_held_for_an_unknown_function_and_cancelled_before_that_is_written(
    store_config: StoreConfig,
) -> None:
    """A job of a function not registered here is settled ``held`` (to wait for it); a
    cancel that comes before that outcome is written wins: the run ends ``cancelled``,
    unattempted, with one hook, instead of waiting, flagged, for the function."""
    iii = one_slot_app(store_config)
    gate = anyio.Event()
    results: list[Any] = []

    async def job(p: dict[str, Any]) -> None:
        if "gate" in p:
            await gate.wait()
        else:  # runs in the worker's turn right after the ghost job was settled held
            results.append(await iii.runs.cancel_async(p["cancel"]))

    iii.register_function("job", job)
    hooked: list[str] = []
    iii.on("job_cancelled", lambda j, **_: hooked.append(j.id))
    enqueue = TriggerAction.Enqueue(queue="work")
    async with iii.running():
        await iii.trigger_async("job", {"gate": 0}, action=enqueue)
        ghost = "ghost-1"  # stored by a process that has the function; this one has not
        now = iii.runtime.clock.now()
        ghost_job = NewJob(
            id=ghost,
            queue="work",
            function_id="ghost",
            payload="{}",
            created_at=now,
            available_at=now,
            max_attempts=3,
        )
        await iii.runtime.store.enqueue([ghost_job])
        iii.runtime.runners["work"].wake()  # as its next poll for other processes' jobs
        await iii.trigger_async("job", {"cancel": ghost}, action=enqueue)
        gate.set()
        await drain(iii)
        run = await iii.runs.get_async(ghost)
        stats = await iii.queue_stats_async("work")
    assert [r.cancelled for r in results] == [True]
    assert run is not None and (run.status, run.attempts) == ("cancelled", 0)
    assert hooked == [ghost]
    assert (stats.held, stats.ready, stats.running) == (0, 0, 0)


async def test_an_async_hook_that_raises_cancelled_error_itself_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An async hook that awaits work someone else cancelled fails like any failing hook:
    its CancelledError used to cancel the engine's task group, which ended the program's
    ``running()`` block silently at its next await."""
    iii = make_app()

    async def metrics(job: Any, **info: Any) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    iii.on("job_succeeded", metrics)
    iii.register_function("ok", lambda _: "fine")
    reached_the_end = False
    async with iii.running():
        await iii.trigger_async("ok", {}, action=TriggerAction.Enqueue(queue="q"))
        await drain(iii)
        completed = (await iii.queue_stats_async("q")).completed
        reached_the_end = True
    assert (reached_the_end, completed) == (True, 1)
    assert any(
        r.getMessage().startswith("event hook") and "job_succeeded failed" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_hook_that_calls_sys_exit_is_logged_and_the_engine_goes_on(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing hook is logged, never raised: a ``SystemExit`` too. From a sync hook
    it went up through the queue's worker and out of the event loop, ending the engine
    (and here the test's loop) at once."""
    iii = make_app()

    def exits(job: Any, **info: Any) -> None:
        raise SystemExit(2)

    async def exits_async(job: Any, **info: Any) -> None:
        await anyio.lowlevel.checkpoint()
        raise SystemExit(2)

    iii.on("job_succeeded", exits if kind == "sync" else exits_async)
    iii.register_function("ok", lambda _: "fine")
    async with iii.running():
        for _ in range(2):
            await iii.trigger_async("ok", {}, action=TriggerAction.Enqueue(queue="q"))
            await drain(iii)
        completed = (await iii.queue_stats_async("q")).completed
    assert completed == 2
    failures = [r for r in caplog.records if r.getMessage().startswith("event hook")]
    assert len(failures) == 2 and all("job_succeeded failed" in r.getMessage() for r in failures)


async def test_an_async_hook_runs_and_drain_and_shutdown_wait_for_it() -> None:
    iii = make_app()
    seen: list[Any] = []
    gate = anyio.Event()

    async def record(job: Any, **info: Any) -> None:
        if info["output"] == "4":  # the last job's hook waits until shutdown has begun
            await gate.wait()
        seen.append(info["output"])

    iii.on("job_succeeded", record)
    iii.register_function("work", lambda n: n * 2)

    async def open_gate_once_stopping() -> None:
        while not (iii.is_running and iii.runtime.stopping):
            await anyio.lowlevel.checkpoint()
        gate.set()

    async with anyio.create_task_group() as tg:
        async with iii.running():
            await iii.trigger_async("work", 21, action=TriggerAction.Enqueue(queue="q"))
            await drain(iii)  # waits for the hook's task too
            after_drain = list(seen)
            receipt = await iii.trigger_async("work", 2, action=TriggerAction.Enqueue(queue="q"))
            while (run := await iii.runs.get_async(receipt["messageReceiptId"])) is None or (
                run.status != "completed"
            ):
                await anyio.lowlevel.checkpoint()
            tg.start_soon(open_gate_once_stopping)
        # The block ended with the last hook waiting: shutdown waited for it.
        at_exit = list(seen)
    assert after_drain == ["42"]
    assert at_exit == ["42", "4"]


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({(1, 2): "x"}, "{(1, 2): 'x'}"),
        ({"v": float("nan")}, "{'v': nan}"),
    ],
)
async def test_json_formatter_writes_valid_json_whatever_the_data(data: Any, shown: str) -> None:
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello", None, None)
    record.data = data
    line = JsonFormatter().format(record)
    parsed = json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert (parsed["message"], parsed["data"]) == ("hello", shown)


async def test_json_formatter_writes_a_data_cycle_as_its_repr() -> None:
    cycle: dict[str, Any] = {"a": 1}
    cycle["self"] = cycle
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "hello", None, None)
    record.data = cycle
    assert json.loads(JsonFormatter().format(record))["data"] == "{'a': 1, 'self': {...}}"


@pytest.mark.parametrize("every_s", [60.0, 0.0])
async def test_a_store_that_keeps_failing_is_logged_once_and_its_recovery_too(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    every_s: float,
) -> None:
    """A full disk fails every claim of a queue with jobs waiting, one per poll (10 a
    second by default) for as long as it lasts: one ERROR says so, the repeats are
    counted (a line a minute at most), and one line says when the store works again. A
    failure that loses outcomes (their jobs will run again) is always logged: there are
    at most as many as jobs were claimed before, since no claim succeeds meanwhile."""
    monkeypatch.setattr(iii_embedded._queues, "_FAILURE_LOG_EVERY_S", every_s)
    failures = 0
    failing = False
    release = anyio.Event()

    class FullDisk(SQLiteStore):
        async def exchange(self, outcomes: Any, queue: str, **kwargs: Any) -> list[Job]:
            nonlocal failures, failing
            if queue == "q" and failing:
                failures += 1
                if failures == 5:
                    release.set()  # the running job finishes: its outcome is not written
                failing = failures < 25
                raise StoreError(f"{self.path}: committing failed: the disk is full")
            return await super().exchange(outcomes, queue, **kwargs)

    directory = tmp_path / "store"
    config = Config(
        queues={"q": QueueConfig(name="q", poll_interval_ms=1)},
        store=StoreConfig(store_method="file_based", file_path=str(directory)),
    )
    iii = III(config, store=FullDisk(directory), shutdown_grace_ms=0)
    running = anyio.Event()
    done = anyio.Event()

    async def fn(data: str) -> None:
        if data == "slow":
            running.set()
            await release.wait()
        else:
            done.set()

    iii.register_function("fn", fn)
    caplog.set_level(logging.INFO, logger="iii_embedded.queue")
    async with iii.running():
        await iii.trigger_async("fn", "slow", action=TriggerAction.Enqueue(queue="q"))
        with anyio.fail_after(10):
            await running.wait()
            failing = True
            # Delayed, so that its claim is the dispatcher's, not one made at enqueue.
            await iii.trigger_async(
                "fn", "fast", action=TriggerAction.Enqueue(queue="q", delay_ms=1)
            )
            await done.wait()
    lines = [
        (r.levelname, r.getMessage()) for r in caplog.records if r.name == "iii_embedded.queue"
    ]
    error = f"{directory / DB_FILENAME}: committing failed: the disk is full"

    def failed(outcomes: int) -> tuple[str, str]:
        return (
            "ERROR",
            f"queue 'q': writing {outcomes} outcome(s) and claiming failed: {error}; jobs "
            "whose outcome was not written run again when their lease expires (failed "
            "claims alone are logged once a minute at most)",
        )

    assert lines[0] == failed(0)
    assert lines[-1] == ("WARNING", "queue 'q': the store takes writes again, after 25 failures")
    assert lines.count(failed(1)) == 1
    repeats = [line for line in lines[1:-1] if line != failed(1)]
    if every_s == 0:  # each failure logged: the one that lost the outcome as such
        lost = lines.index(failed(1)) + 1
        assert repeats == [
            (
                "ERROR",
                f"queue 'q': writing outcomes and claiming still fails ({n} failures): {error}",
            )
            for n in range(2, 26)
            if n != lost
        ]
    else:
        assert repeats == []
