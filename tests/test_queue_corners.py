"""Corners of the queue layer found by a review (2026-12-03), on both stores where they
touch one: queue options are checked wherever they are given, bad ``RetryAfter`` delays
fail the attempt instead of parking or losing jobs, redrive takes ids in any order and
repeats, DLQ paging is checked, and a topic subscriber that is not registered yet does
not cost the others their copies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    ConfigError,
    InvocationError,
    QueueConfig,
    RetryAfter,
    StoreConfig,
    TriggerAction,
)
from iii_embedded._config_loader import parse_config
from iii_embedded.testing import VirtualClock, dead_jobs, drain

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backoff_ms": 1.5}, "backoff_ms must be an integer >= 0, got 1.5"),
        ({"concurrency": 2.5}, "concurrency must be an integer >= 1, got 2.5"),
        ({"max_retries": "5"}, "max_retries must be an integer >= 0, got '5'"),
        ({"max_retries": True}, "max_retries must be an integer >= 0, got True"),
        ({"jitter": "no"}, "jitter must be true or false, got 'no'"),
        ({"max_retries": 2**32}, "max_retries must be at most 4294967295, got 4294967296"),
        ({"timeout_ms": 2**63}, f"timeout_ms must be at most {2**63 - 1}, got {2**63}"),
        ({"message_group_field": 3}, "message_group_field must be a field name, got 3"),
    ],
)
def test_queue_options_given_in_python_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        QueueConfig(name="q", **options)
    assert str(caught.value) == message


def test_queue_options_of_a_topic_subscription_are_checked_when_it_is_registered() -> None:
    iii = III()
    iii.register_function("audit", lambda _: None)
    with pytest.raises(ValueError) as caught:
        iii.register_trigger(
            {
                "type": "queue",
                "function_id": "audit",
                "config": {"topic": "orders", "queue_config": {"backoff_ms": 1.5}},
            }
        )
    assert str(caught.value) == (
        "queue trigger of 'audit': queue_config: backoff_ms must be an integer >= 0, got 1.5"
    )


def test_a_count_beyond_u32_in_the_config_file_is_an_error_with_its_line() -> None:
    text = (
        "modules:\n"
        "  - class: modules::queue::QueueModule\n"
        "    config:\n"
        "      queue_configs:\n"
        "        q:\n"
        "          max_retries: 100000000000000000000\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="iii-config.yaml")
    assert str(caught.value) == (
        "iii-config.yaml:6: queue 'q': max_retries must be at most 4294967295, "
        "got 100000000000000000000"
    )


def test_backoff_of_a_late_retry_is_capped_not_a_huge_integer() -> None:
    queue = QueueConfig(name="q", backoff_ms=1000, max_retries=2**32 - 1)
    assert queue.backoff_delay_ms(4_000_000_000) == 2**63 - 1
    assert QueueConfig(name="q", max_backoff_ms=60_000).backoff_delay_ms(10**9) == 60_000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 2**32}, "max_attempts must be at most 4294967295, got 4294967296"),
        (
            {"delay_ms": 10**400},
            f"delay_ms must be a number of milliseconds from 0 to 2**63-1, got {10**400}",
        ),
    ],
)
async def test_enqueue_options_out_of_range_are_an_enqueue_error(
    store_config: StoreConfig, options: dict[str, Any], message: str
) -> None:
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    iii.register_function("noop", lambda _: None)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("noop", {}, action=TriggerAction.Enqueue(**options))
        stored = await iii.runtime.store.list_jobs()
    assert str(caught.value) == f"enqueue_error: {message}"
    assert stored == []


@pytest.mark.parametrize("delay", [float("nan"), float("inf"), -1, True, "5"])
def test_retry_after_refuses_a_delay_that_is_not_a_finite_number(delay: Any) -> None:
    with pytest.raises(ValueError) as caught:
        RetryAfter(delay)
    assert str(caught.value) == (
        f"RetryAfter delay_ms must be a number of milliseconds from 0 to 2**63-1, got {delay!r}"
    )


async def test_a_bad_retry_after_fails_its_attempt_and_costs_no_other_job(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    queues = {"q": QueueConfig(name="q", max_retries=3, backoff_ms=1000)}
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    calls: dict[int, int] = {}

    @iii.function("work")
    async def work(data: dict[str, int]) -> int:
        calls[data["n"]] = calls.get(data["n"], 0) + 1
        if data["n"] == 0:
            raise RetryAfter(float("nan"))
        return data["n"]

    async with iii.running():
        await iii.batch_trigger_async("work", [{"n": n} for n in range(10)], queue="q")
        await drain(iii)
        dead = await dead_jobs(iii, "q")
        stats = await iii.queue_stats_async("q")
    # The bad job went through its three attempts, with the queue's backoff, to the DLQ;
    # the nine others completed once each (their outcomes were not lost with its write).
    assert calls == {0: 3, **{n: 1 for n in range(1, 10)}}
    assert [(d.attempts, d.error.type if d.error else None) for d in dead] == [(3, "ValueError")]
    assert (stats.completed, stats.dead) == (9, 1)


async def test_redrive_and_discard_take_ids_in_any_order_and_repeated(
    store_config: StoreConfig,
) -> None:
    clock = VirtualClock()
    queues = {
        "q": QueueConfig(name="q", type="fifo", message_group_field="g", max_retries=1),
    }
    iii = III(Config(queues=queues, store=store_config), clock=clock, shutdown_grace_ms=0)
    broken = {"on": True}
    ran: list[int] = []

    @iii.function("work")
    async def work(data: dict[str, Any]) -> None:
        if broken["on"]:
            raise ValueError(f"job {data['n']}")
        ran.append(data["n"])

    async with iii.running():
        ids = await iii.batch_trigger_async(
            "work", [{"g": "A", "n": n} for n in (1, 2, 3)], queue="q"
        )
        await drain(iii)
        broken["on"] = False
        moved = await iii.dlq_redrive_async("q", [ids[2], ids[1], ids[2], ids[0]])
        await drain(iii)
        broken["on"] = True
        again = await iii.batch_trigger_async("work", [{"g": "B", "n": 4}], queue="q")
        await drain(iii)
        discarded = await iii.dlq_discard_async("q", [again[0], again[0]])
        left = await dead_jobs(iii, "q")
    assert moved == ids  # oldest failure first, each once
    assert ran == [1, 2, 3]  # the group's order, not the order the ids were given in
    assert discarded == again and left == []


@pytest.mark.parametrize(("name", "value"), [("offset", -1), ("limit", -1), ("limit", 2.5)])
async def test_dlq_paging_values_are_checked(
    store_config: StoreConfig, name: str, value: Any
) -> None:
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    async with iii.running():
        with pytest.raises(ValueError) as caught:
            await iii.dlq_list_async("default", **{name: value})
    assert str(caught.value) == f"dlq_list {name} must be an integer >= 0, got {value!r}"


async def test_a_subscriber_not_registered_yet_gets_its_copy_held_and_others_theirs(
    store_config: StoreConfig,
) -> None:
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    got: dict[str, list[Any]] = {"audit": [], "later": []}
    iii.register_function("audit", got["audit"].append)
    for fid in ("audit", "later"):
        iii.register_trigger({"type": "queue", "function_id": fid, "config": {"topic": "orders"}})
    async with iii.running():
        await iii.trigger_async("enqueue", {"topic": "orders", "data": {"n": 1}})
        await drain(iii)
        seen_before = list(got["later"])
        iii.register_function("later", got["later"].append)
        await drain(iii)
    assert got["audit"] == [{"n": 1}]
    assert seen_before == [] and got["later"] == [{"n": 1}]


class _Unprintable:
    """A return value that is not JSON and whose ``repr`` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_output_that_neither_json_nor_repr_can_write_completes_its_run(
    store_config: StoreConfig, sync: bool
) -> None:
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)

    def outcome(kind: str) -> Any:
        if kind == "unprintable":
            return _Unprintable()
        if kind == "huge_int":
            return 10**5000  # past str()'s digit limit: repr raises ValueError
        return kind

    async def outcome_async(kind: str) -> Any:
        return outcome(kind)

    iii.register_function("work", outcome if sync else outcome_async)
    async with iii.running():
        results = await iii.batch_trigger_and_wait_async(
            "work", ["unprintable", "huge_int", "plain"]
        )
    # The handlers returned: their runs completed (the engine did not stop, nor were
    # they retried), each output a placeholder that names the value's type.
    assert [(r.status, r.output) for r in results.runs] == [
        ("completed", "<_Unprintable object: repr failed with RuntimeError>"),
        ("completed", "<int object: repr failed with ValueError>"),
        ("completed", "plain"),
    ]


class _Unspeakable(Exception):
    """An exception whose ``str`` raises (as some libraries' do when an attribute their
    message names was never set)."""

    def __str__(self) -> str:
        raise AttributeError("no message")


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_an_exception_whose_str_raises_fails_its_attempt_like_any_other(
    store_config: StoreConfig, sync: bool
) -> None:
    queues = {"q": QueueConfig(name="q", max_retries=2, backoff_ms=10)}
    iii = III(Config(queues=queues, store=store_config), shutdown_grace_ms=0)

    def work(kind: str) -> str:
        if kind == "bad":
            raise _Unspeakable()
        return kind

    async def work_async(kind: str) -> str:
        return work(kind)

    iii.register_function("work", work if sync else work_async)
    async with iii.running():
        # Bounded: a sync job's failure used to raise in the loop's callback that settles
        # it, so its run never ended.
        with anyio.fail_after(10):
            failed = await iii.trigger_and_wait_async("work", "bad", queue="q")
            after = await iii.trigger_and_wait_async("work", "fine", queue="q")
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("work", "bad")
        dead = await dead_jobs(iii, "q")
    placeholder = "<_Unspeakable: str() raised AttributeError>"
    # Retried, then dead-lettered with a placeholder message; the engine went on.
    assert (failed.status, failed.error.type if failed.error else None) == (
        "failed",
        "_Unspeakable",
    )
    assert failed.error is not None and failed.error.message == placeholder
    assert [d.attempts for d in dead] == [2]
    assert (after.status, after.output) == ("completed", "fine")
    assert caught.value.code == "invocation_failed"
    assert caught.value.message == f"_Unspeakable: {placeholder}"


async def test_an_error_naming_a_file_whose_name_is_not_utf8_reaches_the_dlq(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    """Python keeps a file name's undecodable bytes as lone surrogates (``os.listdir``,
    ``sys.argv``, the environment), and an error message may quote such a name: the file
    store's UTF-8 could not write the failed attempt, so the job stayed running until its
    lease ran out, ran again and failed the same way, for ever, and never reached the
    dead-letter queue (its waiters waited for ever too)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (Path(os.fsdecode(os.fsencode(inbox) + b"/report-\xff.csv"))).write_text("")
    queues = {"q": QueueConfig(name="q", max_retries=2, backoff_ms=10)}
    iii = III(Config(queues=queues, store=store_config), shutdown_grace_ms=0)

    @iii.function("import")
    async def import_reports(_: Any) -> None:
        for name in os.listdir(inbox):
            raise ValueError(f"cannot import {name}")

    async with iii.running():
        with anyio.fail_after(10):
            failed = await iii.trigger_and_wait_async("import", {}, queue="q")
        dead = await dead_jobs(iii, "q")
    assert failed.status == "failed" and failed.error is not None
    # The undecodable byte is kept as its escape, the rest as it was.
    assert failed.error.message == "cannot import report-\\udcff.csv"
    assert "ValueError: cannot import report-\\udcff.csv" in failed.error.traceback
    assert [(d.attempts, d.error.message) for d in dead] == [(2, failed.error.message)]


async def test_a_cancelled_error_an_async_handler_raises_itself_fails_its_attempt(
    store_config: StoreConfig,
) -> None:
    queues = {"q": QueueConfig(name="q", max_retries=2, backoff_ms=10)}
    iii = III(Config(queues=queues, store=store_config), shutdown_grace_ms=0)
    reached_the_end = False

    @iii.function("work")
    async def work(kind: str) -> str:
        if kind == "bad":
            # Awaiting work that something else cancelled (not the engine: nothing asked
            # this run to stop) raises CancelledError in the handler.
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
        return kind

    async with iii.running():
        with anyio.fail_after(10):
            failed = await iii.trigger_and_wait_async("work", "bad", queue="q")
            after = await iii.trigger_and_wait_async("work", "fine", queue="q")
        dead = await dead_jobs(iii, "q")
        reached_the_end = True
    # It used to go up through the queue's worker and cancel the engine's task group,
    # which ended this block silently at the first wait: nothing below ran.
    assert reached_the_end
    assert (failed.status, failed.error.type if failed.error else None) == (
        "failed",
        "CancelledError",
    )
    assert [d.attempts for d in dead] == [2]
    assert (after.status, after.output) == ("completed", "fine")


async def test_a_handler_that_turns_its_timeout_into_an_error_leaves_its_worker_uncancelled(
    store_config: StoreConfig,
) -> None:
    queues = {"q": QueueConfig(name="q", concurrency=1, prefetch=0, timeout_ms=50, max_retries=1)}
    iii = III(Config(queues=queues, store=store_config), shutdown_grace_ms=0)
    cancelling: list[int] = []

    @iii.function("cleanup_fails")
    async def cleanup_fails(_: Any) -> None:
        try:
            await anyio.sleep(10)
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None  # the timeout's cancellation

    @iii.function("look")
    async def look(kind: str) -> str:
        task = asyncio.current_task()
        assert task is not None
        cancelling.append(task.cancelling())
        if kind == "own_cancel":
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # the handler's own CancelledError: a failed attempt
        return kind

    async with iii.running():
        with anyio.fail_after(10):
            timed_out = await iii.trigger_and_wait_async("cleanup_fails", {}, queue="q")
            fine = await iii.trigger_and_wait_async("look", "fine", queue="q")
            own = await iii.trigger_and_wait_async("look", "own_cancel", queue="q")
            after = await iii.trigger_and_wait_async("look", "after", queue="q")
    assert timed_out.error is not None and timed_out.error.message == "cleanup failed"
    # One worker ran them all; the timeout's cancellation was taken back from it, so the
    # next handler's own CancelledError was its failure, not read as the engine stopping.
    assert cancelling == [0, 0, 0]
    assert [fine.status, own.status, after.status] == ["completed", "failed", "completed"]
