"""Registering functions as iii's SDK does: ids that are required, and the
``FunctionRef`` that ``register_function`` returns, whose ``unregister()`` removes the
function (its queued jobs are held until the id is registered again)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, FunctionRef, InvocationError, QueueConfig, TriggerAction
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


def make_app() -> III:
    return III(clock=VirtualClock(), shutdown_grace_ms=0)


@pytest.mark.parametrize("blank", ["", "  ", "\t\n"])
def test_an_empty_or_blank_id_is_refused_naming_it(blank: str) -> None:
    iii = make_app()
    with pytest.raises(ValueError, match="id is required") as caught:
        iii.register_function(blank, lambda data: data)
    assert repr(blank) in str(caught.value)
    with pytest.raises(ValueError, match="id is required"):
        iii.register_function({"id": blank}, lambda data: data)
    assert iii.registry.user_ids() == []


def test_register_function_returns_a_ref_with_id_description_and_metadata() -> None:
    iii = make_app()
    ref = iii.register_function(
        {"id": "greet", "description": "Greets", "metadata": {"v": 1}}, lambda data: data
    )
    assert (ref.id, ref.description, ref.metadata) == ("greet", "Greets", {"v": 1})
    assert ref == FunctionRef(id="greet", description="Greets", metadata={"v": 1})


async def test_unregister_removes_the_function_from_calls_and_enqueues() -> None:
    iii = make_app()
    ref = iii.register_function("greet", lambda data: f"hello {data}")
    async with iii.running():
        assert await iii.trigger_async("greet", "ann") == "hello ann"
        ref.unregister()
        assert "greet" not in iii.registry
        with pytest.raises(InvocationError) as sync_error:
            await iii.trigger_async("greet", "bob")
        assert sync_error.value.code == "function_not_found"
        with pytest.raises(InvocationError) as enqueue_error:
            await iii.trigger_async("greet", "bob", action=TriggerAction.Enqueue(queue="default"))
        assert enqueue_error.value.code == "enqueue_error"
        # Registered again (by id): it works again.
        iii.register_function("greet", lambda data: f"hi {data}")
        assert await iii.trigger_async("greet", "cy") == "hi cy"


async def test_queued_jobs_of_an_unregistered_function_are_held_until_it_is_back() -> None:
    iii = make_app()
    done: list[Any] = []
    ref = iii.register_function("work", done.append)
    async with iii.running():
        # Stored while the function is registered, delivered after it is gone: the job
        # must wait, as a job for an unknown function does.
        await iii.trigger_async(
            "work", 1, action=TriggerAction.Enqueue(queue="default", delay_ms=1000)
        )
        ref.unregister()
        await drain(iii)
        assert done == []
        assert (await iii.queue_stats_async("default")).held == 1
        iii.register_function("work", done.append)
        await drain(iii)
        assert done == [1]
        stats = await iii.queue_stats_async("default")
        assert (stats.held, stats.ready, stats.completed) == (0, 0, 1)


async def test_a_running_attempt_finishes_after_its_function_is_unregistered() -> None:
    iii = make_app()
    started, release = anyio.Event(), anyio.Event()
    results: list[str] = []

    async def slow(data: Any) -> str:
        started.set()
        await release.wait()
        results.append(data)
        return "done"

    ref = iii.register_function("slow", slow)
    async with iii.running():
        receipt = await iii.trigger_async(
            "slow", "a", action=TriggerAction.Enqueue(queue="default")
        )
        with anyio.fail_after(5):
            await started.wait()
        ref.unregister()
        release.set()
        await drain(iii)
        run = await iii.runs.get_async(receipt["messageReceiptId"])
    assert results == ["a"]
    assert run is not None
    assert (run.status, run.output) == ("completed", "done")


async def test_unregistering_twice_or_after_the_id_was_registered_again_is_harmless() -> None:
    iii = make_app()
    first = iii.register_function("f", lambda data: "first")
    first.unregister()
    first.unregister()  # twice: nothing to do
    second = iii.register_function("f", lambda data: "second")
    first.unregister()  # a stale ref: it must not remove the new registration
    async with iii.running():
        assert await iii.trigger_async("f", None) == "second"
        second.unregister()
        assert "f" not in iii.registry


def test_a_ref_built_by_hand_unregisters_nothing() -> None:
    iii = make_app()
    iii.register_function("f", lambda data: data)
    FunctionRef(id="f").unregister()
    assert "f" in iii.registry


async def test_a_sync_job_already_lined_up_behind_a_running_one_is_held_after_unregister() -> None:
    """A queue with one slot lines the next sync job up for the running handler's thread
    (``QueueRunner._chain``) with its handler: after ``unregister`` that thread must not
    start it."""
    iii = III(
        Config(queues={"one": QueueConfig(name="one", concurrency=1)}),
        clock=VirtualClock(),
        shutdown_grace_ms=0,
    )
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def work(data: int) -> None:
        ran.append(data)
        if data == 1:
            started.set()
            release.wait(5)

    ref = iii.register_function("work", work)
    async with iii.running():
        for n in (1, 2):
            await iii.trigger_async("work", n, action=TriggerAction.Enqueue(queue="one"))
        await anyio.to_thread.run_sync(started.wait, 5)
        ref.unregister()
        release.set()
        await drain(iii)
        assert ran == [1]
        assert (await iii.queue_stats_async("one")).held == 1


@pytest.mark.parametrize("bad", [0, -1, "30000", True, float("nan")])
def test_a_bad_invocation_timeout_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="invocation_timeout_ms must be a number"):
        III(invocation_timeout_ms=bad)


async def test_invocation_timeout_ms_bounds_sync_calls_that_give_no_timeout() -> None:
    clock = VirtualClock()
    iii = III(clock=clock, shutdown_grace_ms=0, invocation_timeout_ms=2_000)

    async def stuck(_: Any) -> None:
        await anyio.sleep_forever()

    iii.register_function("stuck", stuck)
    async with iii.running():
        errors: list[InvocationError] = []

        async def call() -> None:
            try:
                await iii.trigger_async("stuck", None)
            except InvocationError as exc:
                errors.append(exc)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                clock.advance(1.999)
                await anyio.wait_all_tasks_blocked()
                assert errors == []
                clock.advance(0.001)
    assert [str(e) for e in errors] == ["TIMEOUT: Function 'stuck' did not return within 2000 ms"]


def test_a_handler_that_cannot_take_the_payload_is_refused_when_registered() -> None:
    """A handler is called with one argument, the payload: one that takes none, or needs a
    second, would fail every call and every retry with a TypeError. It is refused at once,
    naming the function and its parameters."""
    iii = make_app()

    def no_payload() -> int:
        return 1

    async def two_needed(data: Any, extra: Any) -> int:
        return 1

    with pytest.raises(TypeError, match=r"handler of 'tick' must take one argument, the payload"):
        iii.register_function("tick", no_payload)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'pair'.*are \(data, extra\)"):
        iii.function("pair")(two_needed)
    with pytest.raises(TypeError, match=r"'lam'.*are \(\)"):
        iii.register_function("lam", lambda: 1)  # type: ignore[arg-type,misc]
    assert not any(fid in iii.registry for fid in ("tick", "pair", "lam"))


class _Callable:
    def __call__(self, data: Any, scale: int = 2) -> Any:
        return data * scale


def _with_default(data: Any, scale: int = 3) -> Any:
    return data * scale


def _keyword_only(data: Any, *, extra: int = 0) -> Any:
    return data + extra


async def test_handlers_that_take_one_argument_in_any_form_are_accepted() -> None:
    """Defaults, ``*args``, keyword-only parameters, partials, callable objects and
    callables whose signature cannot be read (builtins) are all accepted."""
    import functools

    iii = make_app()
    iii.register_function("default", _with_default)
    iii.register_function("star", lambda *args: args[0] * 4)
    iii.register_function("kwonly", _keyword_only)
    iii.register_function("partial", functools.partial(lambda scale, data: data * scale, 5))
    iii.register_function("object", _Callable())
    iii.register_function("builtin", abs)
    async with iii.running():
        results = [
            await iii.trigger_async(fid, 2)
            for fid in ("default", "star", "kwonly", "partial", "object")
        ]
        assert results == [6, 8, 2, 10, 4]
        assert await iii.trigger_async("builtin", -7) == 7


def test_a_duplicate_id_is_refused_saying_what_to_do() -> None:
    iii = make_app()
    iii.register_function("orders::create", lambda data: data)
    with pytest.raises(ValueError) as caught:
        iii.register_function("orders::create", lambda data: data)
    assert str(caught.value) == (
        "function 'orders::create' is already registered: give this handler another id, or "
        "unregister the first one (the FunctionRef register_function returned)"
    )


def test_a_trigger_registered_again_while_another_thread_undoes_it_stays_bound() -> None:
    """The last handle of a binding is unregistered in one thread while another thread
    registers the same trigger again. The re-registration must not be counted against a
    binding that is being undone: it runs after the undo, and binds again. (It used to
    find the binding still there, count itself, and then lose it to the undo.)"""
    from iii_embedded._triggers import _TRIGGER_TYPES, Binding, register_trigger_type

    bound: set[str] = set()
    registered_during_undo: list[bool] = []
    undoing = threading.Event()
    request = {"type": "probe", "function_id": "f", "config": {"name": "a"}}
    iii = III(shutdown_grace_ms=0)

    def registrar(app: III, trigger: Any) -> Binding:
        registered_during_undo.append(undoing.is_set())
        bound.add(trigger["config"]["name"])

        def undo() -> None:
            undoing.set()
            again = threading.Thread(target=iii.register_trigger, args=(request,))
            again.start()
            # A registration that can overtake the undo does so at once; one that waits
            # for it is still waiting after this bound (it cannot finish before we do).
            again.join(0.5)
            bound.discard(trigger["config"]["name"])
            undoing.clear()
            threads.append(again)

        return Binding(key=("probe", trigger["config"]["name"]), undo=undo)

    threads: list[threading.Thread] = []
    register_trigger_type("probe", registrar)
    iii.register_function("f", lambda data: data)
    iii.start()
    try:
        first = iii.register_trigger(request)
        remover = threading.Thread(target=first.unregister)
        remover.start()
        remover.join(10)
        for thread in threads:
            thread.join(10)
        assert registered_during_undo == [False, False]
        assert bound == {"a"}
        assert [t["config"]["name"] for t in iii.triggers] == ["a"]
    finally:
        iii.shutdown()
        _TRIGGER_TYPES.pop("probe")


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "queue", "function_id": "f", "config": {"topic": "t"}},
        {"type": "http", "function_id": "f", "config": {"api_path": "/f", "http_method": "POST"}},
        {"type": "cron", "function_id": "f", "config": {"expression": "0 * * * * *"}},
    ],
)
def test_a_trigger_with_iiis_condition_function_id_is_refused(request_: dict[str, Any]) -> None:
    """iii runs a trigger's ``condition_function_id`` first and skips the handler when it
    returns ``false``. It was accepted and ignored here, so every message, request or fire
    ran the handler that the condition was there to hold back."""
    iii = III()
    iii.register_function("f", lambda data: data)
    iii.register_function("only_big", lambda data: data["amount"] > 100)
    refused = {**request_, "config": {**request_["config"], "condition_function_id": "only_big"}}
    with pytest.raises(ValueError, match="condition_function_id is not supported") as error:
        iii.register_trigger(refused)
    assert "check the condition in 'f' itself" in str(error.value)
    iii.register_trigger(request_)  # the same trigger without a condition is bound
