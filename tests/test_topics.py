"""Topic queues (SPEC §7): publish with `enqueue` or `iii::durable::publish`, subscribe with
`queue` / `durable:subscriber` triggers; a copy per subscribed function."""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import pytest

from iii_embedded import III, InvocationError, TriggerAction
from iii_embedded._topics import topic_queue_name
from iii_embedded.testing import VirtualClock, dead_jobs, drain, drain_blocking

pytestmark = pytest.mark.anyio


def make_app() -> III:
    return III(clock=VirtualClock(), shutdown_grace_ms=0)


async def test_every_subscribed_function_gets_its_own_copy() -> None:
    iii = make_app()
    got: dict[str, list[Any]] = {"payment": [], "email": []}
    iii.register_function("orders::process-payment", got["payment"].append)
    iii.register_function("orders::send-email", got["email"].append)
    for fid in ("orders::process-payment", "orders::send-email"):
        iii.register_trigger(
            {"type": "queue", "function_id": fid, "config": {"topic": "order.created"}}
        )
    async with iii.running():
        # The old API, exactly as the seed writes it.
        await iii.trigger_async(
            {"function_id": "enqueue", "payload": {"topic": "order.created", "data": {"id": 1}}}
        )
        await iii.trigger_async(
            {
                "function_id": "iii::durable::publish",
                "payload": {"topic": "order.created", "data": {"id": 2}},
                "action": TriggerAction.Void(),
            }
        )
        await drain(iii)
    # Each copy runs in its subscriber's own standard queue, whose sync handlers run in
    # threads: two copies of one queue may run at once, in either order.
    assert {fid: sorted(p["id"] for p in payloads) for fid, payloads in got.items()} == {
        "payment": [1, 2],
        "email": [1, 2],
    }


async def test_a_topic_whose_name_holds_colons_reaches_its_subscriber() -> None:
    """Topic ``orders::created``, subscriber ``orders::process-payment``: the copy runs
    that function. Until 2026-12-03 the function id was parsed back from the queue's name
    (``topic::orders::created::orders::process-payment``) as
    ``created::orders::process-payment``, and the copy waited, held, for a function that
    does not exist. Two subscriptions whose names meet in one queue are refused."""
    iii = make_app()
    got: list[Any] = []
    iii.register_function("orders::process-payment", got.append)
    iii.register_trigger(
        {
            "type": "queue",
            "function_id": "orders::process-payment",
            "config": {"topic": "orders::created"},
        }
    )
    async with iii.running():
        await iii.trigger_async(
            {"function_id": "enqueue", "payload": {"topic": "orders::created", "data": {"id": 1}}}
        )
        await drain(iii)
        stats = await iii.queue_stats_async(
            topic_queue_name("orders::created", "orders::process-payment")
        )
    assert got == [{"id": 1}]
    assert (stats.held, stats.completed) == (0, 1)
    with pytest.raises(
        ValueError,
        match="its queue 'topic::orders::created::orders::process-payment' is already that "
        "of 'orders::process-payment' on topic 'orders::created'",
    ):
        iii.register_trigger(
            {
                "type": "queue",
                "function_id": "created::orders::process-payment",
                "config": {"topic": "orders"},
            }
        )


async def test_each_subscriber_has_its_own_retries_and_dlq() -> None:
    iii = make_app()
    calls: dict[str, int] = {"ok": 0, "bad": 0}

    def ok(_: Any) -> None:
        calls["ok"] += 1

    def bad(_: Any) -> None:
        calls["bad"] += 1
        raise RuntimeError("subscriber broken")

    iii.register_function("sub::ok", ok)
    iii.register_function("sub::bad", bad)
    iii.register_trigger(
        {"type": "durable:subscriber", "function_id": "sub::ok", "config": {"topic": "t"}}
    )
    iii.register_trigger(
        {
            "type": "queue",
            "function_id": "sub::bad",
            "config": {"topic": "t", "queue_config": {"max_retries": 4, "backoff_ms": 10}},
        }
    )
    async with iii.running():
        await iii.trigger_async("iii::durable::publish", {"queue": "t", "data": "m"})
        await drain(iii)
        dead = await dead_jobs(iii, topic_queue_name("t", "sub::bad"))
        ok_dead = await dead_jobs(iii, topic_queue_name("t", "sub::ok"))
    assert calls == {"ok": 1, "bad": 4}
    assert [d.payload for d in dead] == ["m"] and ok_dead == []


async def test_the_engine_listings_show_topics_and_queues_as_iii_does() -> None:
    """``list_topics`` and ``dlq_topics`` name each topic (its subscribers counted, their
    dead messages summed) and each named queue, but not the queues serving topics."""
    iii = make_app()

    def bad(_: Any) -> None:
        raise RuntimeError("subscriber broken")

    iii.register_function("sub::ok", lambda _: None)
    iii.register_function("sub::bad", bad)
    for fid in ("sub::ok", "sub::bad"):
        config = {"topic": "t", "queue_config": {"max_retries": 1}}
        iii.register_trigger({"type": "queue", "function_id": fid, "config": config})
    async with iii.running():
        await iii.trigger_async("iii::durable::publish", {"topic": "t", "data": 1})
        await iii.trigger_async("iii::durable::publish", {"topic": "t", "data": 2})
        await drain(iii)
        topics = await iii.trigger_async("engine::queue::list_topics", {})
        dlq = await iii.trigger_async("engine::queue::dlq_topics", {})
        dead = await iii.trigger_async("engine::queue::dlq_messages", {"topic": "t"})
        stats = await iii.trigger_async("engine::queue::topic_stats", {"topic": "t"})
    assert topics == [
        {"name": "t", "broker_type": "builtin", "subscriber_count": 2},
        {"name": "default", "broker_type": "function_queue", "subscriber_count": 10},
    ]
    assert dlq == [
        {"topic": "t", "broker_type": "builtin", "message_count": 2},
        {"topic": "default", "broker_type": "function_queue", "message_count": 0},
    ]
    # What the listing names, the other functions read.
    assert sorted(m["payload"] for m in dead) == [1, 2]
    assert (stats["dlq_depth"], stats["consumer_count"], stats["depth"]) == (2, 2, 0)


async def test_subscribing_a_function_twice_makes_the_subscriptions_compete() -> None:
    iii = make_app()
    got: list[Any] = []
    iii.register_function("worker", got.append)
    for _ in range(2):
        iii.register_trigger(
            {"type": "queue", "function_id": "worker", "config": {"topic": "jobs"}}
        )
    async with iii.running():
        for n in range(5):
            await iii.trigger_async("enqueue", {"topic": "jobs", "data": n})
        await drain(iii)
    assert sorted(got) == [0, 1, 2, 3, 4]


def test_a_second_subscription_with_another_queue_config_is_refused() -> None:
    """Until 2026-12-03 the second queue_config was ignored without a word."""
    iii = make_app()
    iii.register_function("worker", lambda _: None)
    first = {"topic": "jobs", "queue_config": {"concurrency": 2}}
    iii.register_trigger({"type": "queue", "function_id": "worker", "config": first})
    iii.register_trigger({"type": "queue", "function_id": "worker", "config": dict(first)})
    iii.register_trigger({"type": "queue", "function_id": "worker", "config": {"topic": "jobs"}})
    with pytest.raises(ValueError, match="subscribed already, with another queue_config"):
        iii.register_trigger(
            {
                "type": "queue",
                "function_id": "worker",
                "config": {"topic": "jobs", "queue_config": {"concurrency": 5}},
            }
        )
    assert iii.config.queues[topic_queue_name("jobs", "worker")].concurrency == 2


async def test_a_publish_one_subscriber_refuses_fails_whole_with_that_error() -> None:
    """Atomic fan-out: a message without the group field of a FIFO subscriber is stored
    for no subscriber, and the publisher gets the enqueue's own error (it was wrapped
    as ``invocation_failed: InvocationError: enqueue_error: ...``)."""
    iii = make_app()
    got: list[Any] = []
    iii.register_function("a", got.append)
    iii.register_function("b", got.append)
    iii.register_trigger({"type": "queue", "function_id": "a", "config": {"topic": "t"}})
    fifo = {"type": "fifo", "message_group_field": "account"}
    iii.register_trigger(
        {"type": "queue", "function_id": "b", "config": {"topic": "t", "queue_config": fifo}}
    )
    async with iii.running():
        with pytest.raises(InvocationError) as caught:
            await iii.trigger_async("enqueue", {"topic": "t", "data": {"x": 1}})
        await drain(iii)
    assert caught.value.code == "enqueue_error"
    assert str(caught.value) == (
        "enqueue_error: FIFO queue 'topic::t::b' requires field 'account' in data, "
        "but it was not found"
    )
    assert got == []


async def test_a_message_to_a_topic_without_subscribers_is_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    iii = make_app()
    caplog.set_level(logging.WARNING, logger="iii_embedded.topics")
    async with iii.running():
        assert await iii.trigger_async("enqueue", {"topic": "nobody", "data": 1}) is None
        stats = await iii.stats_async()
    assert all(s.ready == 0 for s in stats.values())
    assert any("topic 'nobody' dropped" in r.getMessage() for r in caplog.records)


async def test_a_publish_without_its_topic_or_data_fails_as_iiis_does() -> None:
    """iii's publish reads ``{topic, data}``: a payload without one of them is a
    ``deserialization_error`` naming it, an empty topic ``topic_not_set``. A publish
    without ``data`` (say, ``payload`` written for it) delivered ``None`` to every
    subscriber."""
    iii = make_app()
    got: list[Any] = []
    iii.register_function("sub", got.append)
    iii.register_trigger({"type": "queue", "function_id": "sub", "config": {"topic": "t"}})

    async def failure(function_id: str, payload: Any) -> tuple[str, str]:
        with pytest.raises(InvocationError) as error:
            await iii.trigger_async(function_id, payload)
        return error.value.code, error.value.message

    async with iii.running():
        for function_id in ("enqueue", "iii::durable::publish"):
            unreadable = f"Failed to deserialize input for {function_id}: missing field"
            assert await failure(function_id, {"topic": "t", "payload": {"id": 1}}) == (
                "deserialization_error",
                f"{unreadable} `data`",
            )
            for payload in ({"data": 1}, None, "t"):
                assert await failure(function_id, payload) == (
                    "deserialization_error",
                    f"{unreadable} `topic`",
                )
            assert await failure(function_id, {"topic": "", "data": 1}) == (
                "topic_not_set",
                "Topic is not set",
            )
        await iii.trigger_async("enqueue", {"topic": "t", "data": None})  # null is data
        await drain(iii)
    assert got == [None]


async def test_a_subscription_registered_while_running_starts_serving() -> None:
    iii = make_app()
    got: list[Any] = []
    iii.register_function("late", got.append)
    async with iii.running():
        iii.register_trigger({"type": "queue", "function_id": "late", "config": {"topic": "x"}})
        await iii.trigger_async("enqueue", {"topic": "x", "data": "hello"})
        await drain(iii)
    assert got == ["hello"]


def test_a_subscription_made_from_another_thread_starts_serving_on_the_engines_loop() -> None:
    # The iii-SDK way: the engine runs on a background thread (register_worker, start) and
    # the program subscribes from its own thread, after the engine started.
    iii = III(shutdown_grace_ms=0)
    got: list[Any] = []
    arrived = threading.Event()

    def late(data: Any) -> None:
        got.append(data)
        arrived.set()

    iii.register_function("late", late)
    with iii:
        iii.register_trigger({"type": "queue", "function_id": "late", "config": {"topic": "x"}})
        iii.trigger("enqueue", {"topic": "x", "data": "hello"})
        assert arrived.wait(timeout=10)
    assert got == ["hello"]


def test_a_subscriptions_queue_config_takes_every_queue_key() -> None:
    """``queue_config`` has the keys of ``queue_configs`` (the docs say so): ``prefetch``
    was refused as unknown, so a long-running subscriber shared by several processes
    could not set ``prefetch: 0``."""
    iii = make_app()
    keys = {"prefetch": 0, "max_backoff_ms": 5000, "jitter": True, "timeout_ms": 100}
    iii.register_trigger(
        {"type": "queue", "function_id": "f", "config": {"topic": "t", "queue_config": keys}}
    )
    queue = iii.config.queues[topic_queue_name("t", "f")]
    assert (queue.prefetch, queue.max_backoff_ms, queue.jitter, queue.timeout_ms) == (
        0,
        5000,
        True,
        100,
    )


async def test_a_subscriptions_queue_config_takes_iiis_own_key_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """iii's engine reads a subscription's ``queue_config`` in camelCase (``maxRetries``,
    ``backoffDelayMs``); iii code that set them was refused as having unknown keys. The
    keys its builtin adapter ignores are ignored here too, with a warning."""
    iii = make_app()
    calls: list[float] = []

    def bad(_: Any) -> None:
        calls.append(iii.clock.now())
        raise RuntimeError("subscriber broken")

    iii.register_function("sub::bad", bad)
    caplog.set_level(logging.WARNING, logger="iii_embedded.topics")
    iii.register_trigger(
        {
            "type": "queue",
            "function_id": "sub::bad",
            "config": {
                "topic": "t",
                "queue_config": {
                    "type": "standard",
                    "maxRetries": 3,
                    "concurrency": 2,
                    "backoffDelayMs": 250,
                    "backoffType": "exponential",
                    "visibilityTimeout": 3000,
                },
            },
        }
    )
    queue = iii.config.queues[topic_queue_name("t", "sub::bad")]
    assert (queue.max_retries, queue.concurrency, queue.backoff_ms) == (3, 2, 250)
    assert "ignores queue_config key(s) ['backoffType', 'visibilityTimeout']" in caplog.text
    with pytest.raises(ValueError, match="both 'maxRetries' and 'max_retries'"):
        iii.register_trigger(
            {
                "type": "queue",
                "function_id": "sub::other",
                "config": {"topic": "t", "queue_config": {"maxRetries": 3, "max_retries": 2}},
            }
        )
    async with iii.running():
        start = iii.clock.now()
        await iii.trigger_async("iii::durable::publish", {"topic": "t", "data": "m"})
        await drain(iii)
        dead = await dead_jobs(iii, topic_queue_name("t", "sub::bad"))
    assert [round(t - start, 3) for t in calls] == [0.0, 0.25, 0.75]
    assert [d.payload for d in dead] == ["m"]


def test_bad_subscriptions_are_refused_with_a_clear_error() -> None:
    iii = make_app()
    with pytest.raises(ValueError, match=r"needs config\.topic"):
        iii.register_trigger({"type": "queue", "function_id": "f", "config": {}})
    with pytest.raises(ValueError, match="unknown queue_config key"):
        iii.register_trigger(
            {
                "type": "queue",
                "function_id": "f",
                "config": {"topic": "t", "queue_config": {"retries": 3}},
            }
        )
    with pytest.raises(ValueError, match="unknown trigger type 'websocket'"):
        iii.register_trigger({"type": "websocket", "function_id": "f"})


async def test_an_unregistered_subscription_gets_no_new_copy_but_its_stored_ones() -> None:
    """``register_trigger`` returns a handle: after ``unregister()`` a publish stores no
    copy for that subscriber (the others still get theirs), and the copies stored before
    are still delivered. Subscribing again works, on the same queue."""
    iii = make_app()
    got: dict[str, list[Any]] = {"a": [], "b": []}
    first_running, release = anyio.Event(), anyio.Event()

    async def a(data: Any) -> None:
        if data == 1:
            first_running.set()
            await release.wait()
        got["a"].append(data)

    iii.register_function("a", a)
    iii.register_function("b", got["b"].append)
    one_at_a_time = {"topic": "t", "queue_config": {"concurrency": 1}}
    handle = iii.register_trigger({"type": "queue", "function_id": "a", "config": one_at_a_time})
    iii.register_trigger({"type": "queue", "function_id": "b", "config": {"topic": "t"}})
    assert (handle.type, handle.function_id, handle.config) == ("queue", "a", one_at_a_time)
    async with iii.running():
        # Message 2's copy for "a" waits in its queue behind message 1's, which runs.
        for n in (1, 2):
            await iii.trigger_async("enqueue", {"topic": "t", "data": n})
        with anyio.fail_after(5):
            await first_running.wait()
        handle.unregister()
        handle.unregister()  # twice: harmless
        await iii.trigger_async("enqueue", {"topic": "t", "data": 3})
        release.set()
        await drain(iii)
        assert (got["a"], sorted(got["b"])) == ([1, 2], [1, 2, 3])
        listed = await iii.trigger_async("engine::queue::list_topics", {})
        assert listed[0] == {"name": "t", "broker_type": "builtin", "subscriber_count": 1}
        again = iii.register_trigger(
            {"type": "durable:subscriber", "function_id": "a", "config": {"topic": "t"}}
        )
        await iii.trigger_async("enqueue", {"topic": "t", "data": 4})
        await drain(iii)
        again.unregister()
    assert (got["a"], sorted(got["b"])) == ([1, 2, 4], [1, 2, 3, 4])
    assert iii.triggers == [{"type": "queue", "function_id": "b", "config": {"topic": "t"}}]


async def test_a_subscription_registered_twice_stays_until_both_are_unregistered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    iii = make_app()
    got: list[Any] = []
    iii.register_function("worker", got.append)
    trigger = {"type": "queue", "function_id": "worker", "config": {"topic": "jobs"}}
    first, second = iii.register_trigger(trigger), iii.register_trigger(trigger)
    async with iii.running():
        first.unregister()
        await iii.trigger_async("enqueue", {"topic": "jobs", "data": 1})
        await drain(iii)
        second.unregister()
        with caplog.at_level(logging.WARNING, logger="iii_embedded.topics"):
            await iii.trigger_async("enqueue", {"topic": "jobs", "data": 2})
        await drain(iii)
    assert got == [1]
    assert "message published to topic 'jobs' dropped" in caplog.text


def test_a_subscription_unregistered_from_another_thread_stops_its_copies() -> None:
    iii = make_app()
    got: list[Any] = []
    iii.register_function("worker", got.append)
    handle = iii.register_trigger(
        {"type": "queue", "function_id": "worker", "config": {"topic": "jobs"}}
    )
    iii.start()
    try:
        iii.trigger("enqueue", {"topic": "jobs", "data": 1})
        drain_blocking(iii)
        handle.unregister()
        iii.trigger("enqueue", {"topic": "jobs", "data": 2})
        drain_blocking(iii)
    finally:
        iii.shutdown()
    assert got == [1]
