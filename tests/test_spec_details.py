"""SPEC statements that no other test checked directly: every Logger level, a dict
request's timeout, the statistics' oldest-ready age and DLQ counter, both spellings of the
DLQ functions' queue field, a queued run's status, the short worker names, the pytest
plugin's fixtures and the inspection helpers, and that the core never imports the HTTP
server."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    InvocationTimeoutError,
    Logger,
    NonRetryableError,
    QueueConfig,
    TriggerAction,
)
from iii_embedded._config_loader import load_config
from iii_embedded.testing import VirtualClock, drain, queued_jobs, running_jobs

pytestmark = pytest.mark.anyio
WORK = TriggerAction.Enqueue(queue="work")


def app_with_work(clock: VirtualClock, **queue: Any) -> III:
    config = Config(queues={"work": QueueConfig(name="work", **queue)})
    return III(config, clock=clock, shutdown_grace_ms=0)


async def test_every_logger_level_is_tagged_with_the_invocation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    iii = app_with_work(VirtualClock())

    @iii.function("noisy")
    async def noisy(_: Any) -> None:
        log = Logger()
        log.debug("d")
        log.info("i", {"k": 1})
        log.warn("w")
        log.error("e")

    caplog.set_level(logging.DEBUG, logger="iii_embedded.user")
    async with iii.running():
        receipt = (await iii.trigger_async("noisy", None, action=WORK))["messageReceiptId"]
        await drain(iii)
    records = [r for r in caplog.records if r.name == "iii_embedded.user"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("DEBUG", "d"),
        ("INFO", "i {'k': 1}"),
        ("WARNING", "w"),
        ("ERROR", "e"),
    ]
    for r in records:
        assert (r.function_id, r.receipt_id, r.queue, r.attempt) == (  # type: ignore[attr-defined]
            "noisy",
            receipt,
            "work",
            1,
        )


async def test_a_dict_request_times_out_after_its_timeout_ms() -> None:
    clock = VirtualClock()
    iii = III(clock=clock, shutdown_grace_ms=0)
    started = anyio.Event()

    @iii.function("sleepy")
    async def sleepy(_: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    async with iii.running(), anyio.create_task_group() as tg:
        errors: list[InvocationError] = []

        async def call() -> None:
            try:
                await iii.trigger_async(
                    {"function_id": "sleepy", "payload": None, "timeout_ms": 100}
                )
            except InvocationError as exc:
                errors.append(exc)

        tg.start_soon(call)
        await started.wait()
        clock.advance(0.099)
        await anyio.wait_all_tasks_blocked()
        assert errors == []
        clock.advance(0.001)
    assert [(e.code, e.message) for e in errors] == [
        ("TIMEOUT", "Function 'sleepy' did not return within 100 ms")
    ]
    assert all(isinstance(e, InvocationTimeoutError) for e in errors)
    assert all(isinstance(e, TimeoutError) for e in errors)


async def test_statistics_count_the_oldest_ready_age_and_the_dead_lettered() -> None:
    clock = VirtualClock()
    iii = app_with_work(clock, max_retries=1, concurrency=1)
    gate, began = anyio.Event(), anyio.Event()

    @iii.function("doomed")
    async def doomed(_: Any) -> None:
        began.set()
        await gate.wait()
        raise NonRetryableError("no")

    async with iii.running():
        for n in range(2):
            await iii.trigger_async("doomed", n, action=WORK)
        await began.wait()  # the first runs; the second waits, ready, for the only slot
        clock.advance(5)
        waiting = await iii.stats_async()
        gate.set()
        await drain(iii)
        after = await iii.stats_async()
    assert (waiting["work"].ready, waiting["work"].running) == (1, 1)
    assert waiting["work"].oldest_ready_age_s == 5.0
    assert (after["work"].dead, after["work"].dead_lettered, after["work"].failed) == (2, 2, 2)
    assert after["work"].oldest_ready_age_s is None


async def test_a_run_waiting_for_its_slot_is_queued() -> None:
    iii = app_with_work(VirtualClock(), concurrency=1)
    gate, began = anyio.Event(), anyio.Event()

    @iii.function("slow")
    async def slow(_: Any) -> None:
        began.set()
        await gate.wait()

    async with iii.running():
        first = (await iii.trigger_async("slow", 1, action=WORK))["messageReceiptId"]
        second = (await iii.trigger_async("slow", 2, action=WORK))["messageReceiptId"]
        await began.wait()
        statuses = [(await iii.runs.get_async(r)).status for r in (first, second)]  # type: ignore[union-attr]
        inspected = (
            [j.id for j in await running_jobs(iii)],
            [j.id for j in await queued_jobs(iii)],
        )
        gate.set()
        await drain(iii)
    assert statuses == ["running", "queued"]
    assert inspected == ([first], [second])


@pytest.mark.parametrize("field", ["queue", "topic"])
async def test_the_dlq_functions_take_queue_or_its_alias_topic(field: str) -> None:
    iii = app_with_work(VirtualClock(), max_retries=1)
    iii.register_function("bad", _raise)

    async def dead(n: int) -> str:
        receipt = await iii.trigger_async("bad", n, action=WORK)
        await drain(iii)
        return str(receipt["messageReceiptId"])

    async with iii.running():
        one, two, three = [await dead(n) for n in range(3)]
        listed = await iii.trigger_async("engine::queue::dlq_messages", {field: "work"})
        stats = await iii.trigger_async("engine::queue::topic_stats", {field: "work"})
        again = await iii.trigger_async(
            "iii::queue::redrive_message", {field: "work", "message_id": one}
        )
        await drain(iii)
        dropped = await iii.trigger_async(
            "iii::queue::discard_message", {field: "work", "message_id": two}
        )
        redriven = await iii.trigger_async("iii::queue::redrive", {field: "work"})
        await drain(iii)
        left = await iii.trigger_async("engine::queue::dlq_messages", {field: "work"})
    assert isinstance(listed, list) and len(listed) == 3
    assert stats["dlq_depth"] == 3
    assert again and dropped
    assert redriven == {"queue": "work", "redriven": 2}
    assert sorted(m["id"] for m in left) == sorted([one, three])


def _raise(_: Any) -> None:
    raise ValueError("always")


def test_the_short_worker_names_queue_and_http_load(tmp_path: Path) -> None:
    path = tmp_path / "iii-config.yaml"
    path.write_text(
        "workers:\n"
        "  - name: queue\n"
        "    config:\n"
        "      queue_configs:\n"
        "        payment: {type: fifo, message_group_field: id}\n"
        "  - name: http\n"
        "    config: {port: 3999, host: 127.0.0.2}\n"
    )
    config = load_config(path)
    assert config.queues["payment"].type == "fifo"
    assert config.queues["payment"].message_group_field == "id"
    assert config.http is not None
    assert (config.http.host, config.http.port) == ("127.0.0.2", 3999)


def test_the_core_never_imports_the_http_server_or_the_cron_parser() -> None:
    code = (
        "import sys, iii_embedded\n"
        "iii = iii_embedded.III()\n"
        "iii.register_function('f', lambda d: d)\n"
        "print(sorted(m for m in ('uvicorn', 'croniter') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_the_pytest_plugin_gives_a_virtual_clock_and_an_app_on_it(
    iii_clock: VirtualClock, iii_app: III
) -> None:
    assert iii_app.clock is iii_clock
    seen: list[float] = []
    iii_app.register_function("later", lambda _: seen.append(iii_clock.now()))
    async with iii_app.running():
        start = iii_clock.now()
        await iii_app.trigger_async(
            "later", None, action=TriggerAction.Enqueue(queue="default", delay_ms=60_000)
        )
        await drain(iii_app)  # moves virtual time to the delayed job, in no real time
    assert seen == [start + 60]
