"""The three trigger actions (SPEC §3): synchronous, Void and Enqueue."""

from __future__ import annotations

import asyncio
import fractions
import logging
import numbers
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    QueueConfig,
    TriggerAction,
    current_invocation,
)
from iii_embedded._stores._memory import MemoryStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app(clock: VirtualClock | None = None, store: MemoryStore | None = None) -> III:
    config = Config(
        queues={
            "payment": QueueConfig(
                name="payment", type="fifo", message_group_field="transaction_id"
            ),
            "email": QueueConfig(name="email", concurrency=5),
        }
    )
    return III(config, clock=clock or VirtualClock(), store=store, shutdown_grace_ms=0)


# --- synchronous ---------------------------------------------------------------------


async def test_sync_call_returns_the_handlers_value_for_async_and_sync_handlers() -> None:
    iii = make_app()

    @iii.function("math::add")
    async def add(data: dict[str, int]) -> int:
        return data["a"] + data["b"]

    @iii.function("math::mul")
    def mul(data: dict[str, int]) -> int:
        return data["a"] * data["b"]

    async with iii.running():
        assert await iii.trigger_async("math::add", {"a": 2, "b": 3}) == 5
        assert (
            await iii.trigger_async({"function_id": "math::mul", "payload": {"a": 4, "b": 5}}) == 20
        )


async def test_handler_receives_exactly_the_payload_object() -> None:
    iii = make_app()
    received: list[Any] = []
    payload = {"nested": [1, 2, {"x": None}]}

    @iii.function("echo")
    async def echo(data: Any) -> None:
        received.append(data)

    async with iii.running():
        await iii.trigger_async("echo", payload)
    assert received == [payload]


async def test_sync_error_is_invocation_failed_with_the_original_as_cause() -> None:
    iii = make_app()

    @iii.function("boom")
    async def boom(_: Any) -> None:
        raise KeyError("missing")

    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("boom", {})
    err = caught.value
    assert err.code == "invocation_failed"
    assert str(err) == f"invocation_failed: {err.message}"
    assert "KeyError" in err.message
    assert isinstance(err.__cause__, KeyError)


async def test_a_handler_that_raises_type_error_leaves_the_callers_context() -> None:
    """(A handler that cannot take the payload is refused when registered: see
    test_registry.py.)"""
    iii = make_app()

    @iii.function("two_args")
    async def two_args(data: Any) -> None:
        raise TypeError("two_args() missing 1 required positional argument: 'extra'")

    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("two_args", {})
        # The caller's invocation context is left as it was, not as the failed call's.
        assert current_invocation() is None
    assert caught.value.code == "invocation_failed"
    assert "TypeError" in caught.value.message
    assert isinstance(caught.value.__cause__, TypeError)


@pytest.mark.parametrize("timeout_ms", ["50", -1, True, [50]])
async def test_a_timeout_that_is_not_a_number_of_ms_is_an_invalid_request(timeout_ms: Any) -> None:
    iii = make_app()
    ran: list[Any] = []

    @iii.function("f")
    async def f(data: Any) -> Any:
        ran.append(data)
        return data

    async with iii.running():
        for request in (
            {"function_id": "f", "payload": 1, "timeout_ms": timeout_ms},
            "f",
        ):
            with pytest.raises(InvocationError) as caught:
                if isinstance(request, dict):
                    await iii.trigger_async(request)
                else:
                    await iii.trigger_async(request, 1, timeout_ms=timeout_ms)
            assert caught.value.code == "invalid_request"
            assert f"got {timeout_ms!r}" in caught.value.message
            assert current_invocation() is None
        assert await iii.trigger_async({"function_id": "f", "payload": 2, "timeout_ms": 50}) == 2
    assert ran == [2]


async def test_unknown_function_is_function_not_found() -> None:
    iii = make_app()
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("nope::nope", {})
    assert caught.value.code == "function_not_found"
    assert str(caught.value) == "function_not_found: Function 'nope::nope' not found"


async def test_sync_timeout_cancels_an_async_handler() -> None:
    clock = VirtualClock()
    iii = make_app(clock)
    started = anyio.Event()
    cancelled = anyio.Event()

    @iii.function("slow")
    async def slow(_: Any) -> str:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return "never"

    async with iii.running(), anyio.create_task_group() as tg:
        outcome: dict[str, BaseException] = {}

        async def call() -> None:
            try:
                await iii.trigger_async("slow", {}, timeout_ms=5_000)
            except InvocationError as exc:
                outcome["error"] = exc

        tg.start_soon(call)
        await started.wait()
        clock.advance(4.999)
        await anyio.lowlevel.checkpoint()
        assert "error" not in outcome
        clock.advance(0.002)
        with anyio.fail_after(10):  # a call that never times out fails here, not hangs
            await cancelled.wait()
    assert isinstance(outcome["error"], InvocationError)
    assert outcome["error"].code == "TIMEOUT"


async def test_default_sync_timeout_is_thirty_seconds() -> None:
    clock = VirtualClock()
    iii = make_app(clock)
    started = anyio.Event()

    @iii.function("slow")
    async def slow(_: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    async with iii.running(), anyio.create_task_group() as tg:
        errors: list[InvocationError] = []

        async def call() -> None:
            with pytest.raises(InvocationError) as caught:
                await iii.trigger_async("slow", {})
            errors.append(caught.value)

        tg.start_soon(call)
        await started.wait()
        clock.advance(29.9)
        await anyio.lowlevel.checkpoint()
        assert errors == []
        clock.advance(0.2)
    assert [e.code for e in errors] == ["TIMEOUT"]


# --- void ------------------------------------------------------------------------------


async def test_void_returns_none_at_once_and_runs_the_handler() -> None:
    iii = make_app()
    ran = anyio.Event()
    release = anyio.Event()

    @iii.function("analytics::track")
    async def track(data: dict[str, str]) -> None:
        await release.wait()
        ran.set()

    async with iii.running():
        result = await iii.trigger_async(
            {
                "function_id": "analytics::track",
                "payload": {"e": "x"},
                "action": TriggerAction.Void(),
            }
        )
        assert result is None
        assert not ran.is_set()  # the caller did not wait for the handler
        release.set()
        await ran.wait()


async def test_void_errors_never_reach_the_caller_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    iii = make_app()
    calls = 0

    @iii.function("flaky")
    async def flaky(_: Any) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("void failure")

    caplog.set_level(logging.ERROR, logger="iii_embedded")
    async with iii.running():
        assert await iii.trigger_async("flaky", {}, action={"type": "void"}) is None
        await drain(iii)
    assert calls == 1  # no retry
    messages = [r.getMessage() for r in caplog.records]
    assert any("void trigger of 'flaky' failed" in m for m in messages)
    assert any("void failure" in (r.exc_text or "") for r in caplog.records)


async def test_a_cancelled_error_a_handler_raises_itself_is_its_error_in_every_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler that awaits work someone else cancelled raises ``CancelledError``
    though nothing cancelled it. It used to cancel the engine's task group from a Void
    call or a cron fire, ending the program's ``running()`` block silently, and to reach
    a synchronous caller as a bare ``CancelledError``."""
    clock = VirtualClock(start=1_700_000_000.0)  # 100 s before a fire of the cron below
    iii = make_app(clock)
    reached: list[str] = []

    @iii.function("fetch")
    async def fetch(_: Any) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    iii.register_trigger(
        {"type": "cron", "function_id": "fetch", "config": {"expression": "0 */5 * * * *"}}
    )
    caplog.set_level(logging.ERROR, logger="iii_embedded")
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("fetch", {})
        reached.append("sync")
        await iii.trigger_async("fetch", {}, action=TriggerAction.Void())
        await drain(iii)
        reached.append("void")
        clock.advance(200)
        await drain(iii)
        reached.append("cron")
    assert reached == ["sync", "void", "cron"]
    assert (caught.value.code, caught.value.message) == ("invocation_failed", "CancelledError: ")
    messages = [r.getMessage() for r in caplog.records]
    assert "void trigger of 'fetch' failed (the caller is not told)" in messages
    assert "cron job 'cron::fetch' (fetch) failed" in messages


@pytest.mark.parametrize("kind", ["async", "async-suspended", "sync"])
async def test_sys_exit_in_a_handler_is_its_error_and_the_engine_lives_on(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``sys.exit()`` (or a ``KeyboardInterrupt`` raised by hand) in a handler is that
    handler's error, in every caller, as it already was for a sync handler's queued job.
    From an async handler, or a sync one whose result the loop awaits, it went up
    through the engine's task and out of its event loop: the engine died without its
    graceful shutdown, and a synchronous caller got the ``SystemExit`` itself."""
    clock = VirtualClock(start=1_700_000_000.0)  # 100 s before a fire of the cron below
    config = Config(queues={"q": QueueConfig(name="q", max_retries=1)})
    iii = III(config, clock=clock, shutdown_grace_ms=0)
    errors = {"exits": SystemExit(3), "interrupts": KeyboardInterrupt()}

    for function_id, error in errors.items():
        if kind == "sync":

            def handler(_: Any, error: BaseException = error) -> None:
                raise error

        else:

            async def handler(_: Any, error: BaseException = error) -> None:
                if kind == "async-suspended":
                    await anyio.sleep(0)
                raise error

        iii.register_function(function_id, handler)
        iii.register_trigger(
            {"type": "cron", "function_id": function_id, "config": {"expression": "0 */5 * * * *"}}
        )
    iii.register_function("echo", lambda data: data)
    caplog.set_level(logging.ERROR, logger="iii_embedded")
    outcomes: dict[str, Any] = {}
    async with iii.running():
        for function_id in errors:
            with pytest.raises(InvocationError) as caught:
                await iii.trigger_async(function_id, {})
            outcomes[f"{function_id} sync"] = (caught.value.code, caught.value.message)
            assert caught.value.__cause__ is errors[function_id]
            await iii.trigger_async(function_id, {}, action=TriggerAction.Void())
            run = await iii.trigger_and_wait_async(function_id, {}, queue="q")
            assert run.error is not None
            outcomes[f"{function_id} queued"] = (run.status, run.error.type, run.error.message)
        await drain(iii)
        clock.advance(200)
        await drain(iii)
        outcomes["still serving"] = await iii.trigger_async("echo", 5)
    messages = [r.getMessage() for r in caplog.records]
    assert outcomes == {
        "exits sync": ("invocation_failed", "SystemExit: 3"),
        "exits queued": ("failed", "RuntimeError", "SystemExit(3)"),
        "interrupts sync": ("invocation_failed", "KeyboardInterrupt: "),
        "interrupts queued": ("failed", "RuntimeError", "KeyboardInterrupt()"),
        "still serving": 5,
    }
    for function_id in errors:
        assert f"void trigger of {function_id!r} failed (the caller is not told)" in messages
        assert f"cron job 'cron::{function_id}' ({function_id}) failed" in messages


# --- enqueue ---------------------------------------------------------------------------


async def test_enqueue_returns_a_receipt_once_stored_and_the_job_runs_with_its_payload() -> None:
    store = MemoryStore()
    iii = make_app(store=store)
    got: list[tuple[Any, str | None]] = []

    @iii.function("emails::send")
    async def send(data: Any) -> None:
        inv = current_invocation()
        assert inv is not None
        got.append((data, inv.receipt_id))

    async with iii.running():
        receipt = await iii.trigger_async(
            "emails::send", {"to": "a@example.com"}, action=TriggerAction.Enqueue(queue="email")
        )
        assert set(receipt) == {"messageReceiptId"}
        stored = await store.get(receipt["messageReceiptId"])
        assert stored is not None and stored.queue == "email"
        await drain(iii)
    assert got == [({"to": "a@example.com"}, receipt["messageReceiptId"])]


@pytest.mark.parametrize(
    ("function_id", "payload", "queue", "message"),
    [
        ("pay", {"transaction_id": "t1"}, "nope", "enqueue_error: Queue 'nope' not found"),
        (
            "pay",
            {"amount": 1},
            "payment",
            "enqueue_error: FIFO queue 'payment' requires field 'transaction_id' in data, "
            "but it was not found",
        ),
        (
            "pay",
            {"transaction_id": None},
            "payment",
            "enqueue_error: FIFO queue 'payment': field 'transaction_id' must not be null",
        ),
        ("ghost", {"transaction_id": "t"}, "payment", "enqueue_error: Function 'ghost' not found"),
    ],
)
async def test_enqueue_errors_use_iii_messages_and_store_nothing(
    function_id: str, payload: Any, queue: str, message: str
) -> None:
    store = MemoryStore()
    iii = make_app(store=store)
    iii.register_function("pay", lambda data: None)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async(function_id, payload, action=TriggerAction.Enqueue(queue=queue))
        assert str(caught.value) == message
        assert caught.value.code == "enqueue_error"
        assert await store.list_jobs() == []


async def test_enqueue_of_a_payload_that_is_not_json_is_an_enqueue_error() -> None:
    store = MemoryStore()
    iii = make_app(store=store)
    iii.register_function("pay", lambda data: None)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async(
                "pay", {"when": object()}, action=TriggerAction.Enqueue(queue="email")
            )
        assert caught.value.code == "enqueue_error"
        assert "not JSON-serialisable" in caught.value.message
        assert await store.list_jobs() == []


async def test_dict_form_of_the_enqueue_action_is_accepted() -> None:
    iii = make_app()
    seen: list[Any] = []
    iii.register_function("emails::send", seen.append)
    async with iii.running():
        receipt = await iii.trigger_async(
            {
                "function_id": "emails::send",
                "payload": {"n": 1},
                "action": {"type": "enqueue", "queue": "email"},
            }
        )
        await drain(iii)
    assert "messageReceiptId" in receipt
    assert seen == [{"n": 1}]


@pytest.mark.parametrize(
    "action",
    [TriggerAction.Enqueue(), {"type": "enqueue"}, {"type": "enqueue", "queue": None}],
    ids=["object", "dict", "dict-none"],
)
async def test_an_enqueue_that_names_no_queue_goes_to_the_default_queue(action: Any) -> None:
    iii = make_app()
    seen: list[Any] = []
    iii.register_function("emails::send", seen.append)
    async with iii.running():
        receipt = await iii.trigger_async("emails::send", {"n": 1}, action=action)
        run = await iii.runs.get_async(str(receipt["messageReceiptId"]))
        await drain(iii)
    assert run is not None and run.queue == "default"
    assert seen == [{"n": 1}]


@pytest.mark.parametrize("queue", ["", 7])
async def test_an_enqueue_whose_queue_is_not_a_name_is_an_enqueue_error(queue: Any) -> None:
    iii = make_app()
    iii.register_function("emails::send", lambda _: None)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async(
                "emails::send", {"n": 1}, action={"type": "enqueue", "queue": queue}
            )
        stored = await iii.runtime.store.list_jobs()
    assert caught.value.code == "enqueue_error"
    assert f"'queue' must be a queue name, not {queue!r}" in str(caught.value)
    assert stored == []


_DELAY_MS = "delay_ms must be a number of milliseconds from 0 to 2**63-1, got "


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("delay_ms", "abc", _DELAY_MS + "'abc'"),
        ("delay_ms", -5, _DELAY_MS + "-5"),
        ("delay_ms", True, _DELAY_MS + "True"),
        ("delay_ms", float("nan"), _DELAY_MS + "nan"),
        ("delay_ms", 2**63, _DELAY_MS + str(2**63)),
        ("max_attempts", "x", "max_attempts must be an integer >= 1, got 'x'"),
        ("max_attempts", 0, "max_attempts must be an integer >= 1, got 0"),
        ("max_attempts", 2.5, "max_attempts must be an integer >= 1, got 2.5"),
        ("idempotency_key", 7, "idempotency_key must be a string, got 7"),
    ],
)
@pytest.mark.parametrize("form", ["dict", "object"])
async def test_a_bad_enqueue_option_is_an_enqueue_error_naming_it_and_stores_nothing(
    option: str, value: Any, message: str, form: str
) -> None:
    iii = make_app()
    iii.register_function("emails::send", lambda _: None)
    action: Any = (
        {"type": "enqueue", "queue": "email", option: value}
        if form == "dict"
        else TriggerAction.Enqueue(queue="email", **{option: value})
    )
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("emails::send", {"n": 1}, action=action)
        stored = await iii.runtime.store.list_jobs()
    assert (caught.value.code, str(caught.value)) == ("enqueue_error", f"enqueue_error: {message}")
    assert stored == []


class _Count:
    """An integer type that is not ``int`` (as numpy's are): registered as Integral."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __lt__(self, other: int) -> bool:
        return self.value < other


numbers.Integral.register(_Count)


@pytest.mark.parametrize("form", ["dict", "object"])
async def test_enqueue_options_of_other_number_types_are_accepted(form: str) -> None:
    iii = make_app(VirtualClock())
    iii.register_function("emails::send", lambda _: None)
    options: dict[str, Any] = {"max_attempts": _Count(2), "delay_ms": fractions.Fraction(1, 2)}
    action: Any = (
        {"type": "enqueue", "queue": "email", **options}
        if form == "dict"
        else TriggerAction.Enqueue(queue="email", **options)
    )
    async with iii.running():
        receipt = await iii.trigger_async("emails::send", {"n": 1}, action=action)
        run = await iii.runs.get_async(str(receipt["messageReceiptId"]))
    assert run is not None and (run.max_attempts, type(run.max_attempts)) == (2, int)


# --- nesting and threads ---------------------------------------------------------------


async def test_nested_triggers_from_sync_and_async_handlers_do_not_deadlock() -> None:
    iii = make_app()

    @iii.function("leaf")
    async def leaf(data: dict[str, int]) -> int:
        return data["n"] * 10

    @iii.function("middle::sync")
    def middle_sync(data: dict[str, int]) -> int:
        return int(iii.trigger("leaf", data)) + 1

    @iii.function("top::async")
    async def top(data: dict[str, int]) -> int:
        first = await iii.trigger_async("middle::sync", data)
        second = await iii.trigger_async("leaf", {"n": first})
        return int(second)

    async with iii.running():
        assert await iii.trigger_async("top::async", {"n": 2}) == 210


async def test_sync_trigger_on_the_loop_thread_raises_naming_trigger_async() -> None:
    iii = make_app()
    iii.register_function("x", lambda d: d)
    async with iii.running():
        with pytest.raises(RuntimeError, match="trigger_async"):
            iii.trigger("x", 1)


async def test_every_blocking_call_on_the_loop_thread_names_its_async_twin() -> None:
    """Not "this call blocks": the error says which call, and what to await instead."""
    iii = make_app()
    iii.register_function("x", lambda d: d)
    calls: dict[str, Callable[[], object]] = {
        "iii.batch_trigger": lambda: iii.batch_trigger("x", [1]),
        "iii.trigger_and_wait": lambda: iii.trigger_and_wait("x", 1),
        "iii.batch_trigger_and_wait": lambda: iii.batch_trigger_and_wait("x", [1]),
        "iii.stats": iii.stats,
        "iii.queue_stats": lambda: iii.queue_stats("default"),
        "iii.dlq_list": lambda: iii.dlq_list("default"),
        "iii.dlq_redrive": lambda: iii.dlq_redrive("default"),
        "iii.dlq_discard": lambda: iii.dlq_discard("default"),
        "iii.runs.get": lambda: iii.runs.get("r"),
        "iii.runs.wait": lambda: iii.runs.wait("r"),
        "iii.runs.cancel": lambda: iii.runs.cancel("r"),
    }
    async with iii.running():
        for name, call in calls.items():
            with pytest.raises(RuntimeError) as caught:
                call()
            assert str(caught.value) == (
                f"{name}() blocks, and this is the engine's event-loop thread: "
                f"use `await {name}_async(...)` in async code"
            )


def test_start_and_shutdown_run_the_engine_in_a_background_thread() -> None:
    iii = III(shutdown_grace_ms=0)
    threads: list[int] = []

    @iii.function("where")
    async def where(_: Any) -> bool:
        threads.append(threading.get_ident())
        return True

    iii.start()
    try:
        assert iii.trigger({"function_id": "where", "payload": None}) is True
        receipt = iii.trigger("where", None, action=TriggerAction.Enqueue(queue="default"))
        assert "messageReceiptId" in receipt
    finally:
        iii.shutdown()
    assert threads and all(t != threading.get_ident() for t in threads)
    assert not iii.is_running


async def test_trigger_async_from_another_event_loop_thread_is_bridged() -> None:
    iii = III(shutdown_grace_ms=0)

    @iii.function("double")
    async def double(n: int) -> int:
        return n * 2

    iii.start()
    try:
        # This test's own event loop is not the engine's.
        assert await iii.trigger_async("double", 21) == 42
    finally:
        await anyio.to_thread.run_sync(iii.shutdown)


def test_trigger_before_start_explains_how_to_start() -> None:
    iii = III()
    iii.register_function("x", lambda d: d)
    with pytest.raises(RuntimeError, match="not running"):
        iii.trigger("x", 1)


def test_duplicate_function_ids_raise_value_error() -> None:
    iii = III()
    ref = iii.register_function({"id": "a::b"}, lambda d: d)
    assert ref.id == "a::b"
    with pytest.raises(ValueError, match="already registered"):
        iii.register_function("a::b", lambda d: d)


# --- call shapes (a review of the public API, 2026-12-03) --------------------------------


async def test_the_function_id_may_be_given_by_keyword_but_only_once() -> None:
    iii = make_app()
    iii.register_function("echo", lambda x: x)
    async with iii.running():
        assert await iii.trigger_async(function_id="echo", payload=7) == 7
        with pytest.raises(InvocationError, match="give the function id once"):
            await iii.trigger_async("echo", 1, function_id="echo")


@pytest.mark.parametrize(
    "extra",
    [
        {"action": TriggerAction.Enqueue(queue="email")},
        {"payload": {"x": 1}},
        {"timeout_ms": 50},
    ],
)
async def test_a_request_dict_with_arguments_beside_it_is_refused(extra: dict[str, Any]) -> None:
    """Those arguments were dropped: an Enqueue beside a dict became a synchronous call."""
    iii = make_app()
    ran: list[Any] = []
    iii.register_function("work", ran.append)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async({"function_id": "work", "payload": 1}, **extra)
        await drain(iii)
    assert caught.value.code == "invalid_request"
    assert "not as arguments as well" in caught.value.message
    assert ran == []


@pytest.mark.parametrize("payloads", [{"id": "o-1", "total": 5}, "ab", b"ab"])
async def test_a_batch_of_one_dict_or_a_string_is_refused_not_split(payloads: Any) -> None:
    iii = make_app()
    ran: list[Any] = []
    iii.register_function("orders::create", ran.append)
    async with iii.running():
        with pytest.raises(InvocationError, match="payloads must be a list"):
            await iii.batch_trigger_async("orders::create", payloads, queue="email")
        with pytest.raises(InvocationError, match="payloads must be a list"):
            await iii.batch_trigger_and_wait_async("orders::create", payloads, queue="email")
        await drain(iii)
        stats = await iii.queue_stats_async("email")
    assert (ran, stats.completed) == ([], 0)


def test_an_unbounded_timeout_does_not_time_a_sync_handler_out_at_once() -> None:
    """``float("inf")`` and figures past what a thread can wait overflowed the blocking
    wait, which reported TIMEOUT at once and dropped the handler's result."""
    iii = III(shutdown_grace_ms=0)
    iii.register_function("sync", lambda x: x)
    with iii:
        answers = [
            iii.trigger({"function_id": "sync", "payload": n, "timeout_ms": n})
            for n in (float("inf"), 10**13)
        ]
    assert answers == [float("inf"), 10**13]


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (
            {"type": "enqueue", "queue": "email", "idempotencyKey": "k"},
            "enqueue_error: Enqueue action has an unknown key 'idempotencyKey' "
            "(did you mean 'idempotency_key'?); its keys are type, queue, delay_ms, "
            "idempotency_key and max_attempts",
        ),
        (
            {"type": "enqueue", "queue": "email", "delay": 500, "ttl": 5},
            "enqueue_error: Enqueue action has unknown keys 'delay', 'ttl'; its keys are "
            "type, queue, delay_ms, idempotency_key and max_attempts",
        ),
        (
            {"type": "void", "delay_ms": 500},
            "invalid_action: Void action has an unknown key 'delay_ms'; its only key is type",
        ),
    ],
)
async def test_an_action_dict_with_a_key_it_does_not_know_is_refused_naming_it(
    action: dict[str, Any], message: str
) -> None:
    """A Trigger.dev user writes ``idempotencyKey``; a key the action does not know was
    ignored, so the enqueue happened without the idempotency (or the delay) it asked for."""
    iii = make_app()
    seen: list[Any] = []
    iii.register_function("emails::send", seen.append)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("emails::send", {"n": 1}, action=action)
        stored = await iii.runtime.store.list_jobs()
        await drain(iii)
    assert str(caught.value) == message
    assert (stored, seen) == ([], [])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"function_id": "emails::send", "payload": {"n": 1}, "timeoutMs": 5},
            "invalid_request: a trigger request has an unknown key 'timeoutMs' (did you mean "
            "'timeout_ms'?); its keys are function_id, payload, action and timeout_ms",
        ),
        (
            {"function_id": "emails::send", "data": {"n": 1}},
            "invalid_request: a trigger request has an unknown key 'data' (did you mean "
            "'payload'?); its keys are function_id, payload, action and timeout_ms",
        ),
        (
            {"functionId": "emails::send", "queue": "email"},
            "invalid_request: a trigger request has unknown keys 'functionId', 'queue'; its "
            "keys are function_id, payload, action and timeout_ms",
        ),
    ],
)
async def test_a_request_dict_with_a_key_it_does_not_know_is_refused_naming_it(
    request_: dict[str, Any], message: str
) -> None:
    """A request dict's unknown keys were ignored: ``timeoutMs`` left the call with the
    default timeout, and ``data`` (iii's wire name) called the function with no payload."""
    iii = make_app()
    seen: list[Any] = []
    iii.register_function("emails::send", seen.append)
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async(request_)
        await drain(iii)
    assert str(caught.value) == message
    assert seen == []
