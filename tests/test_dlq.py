"""The dead-letter queue (SPEC §4): what is kept, redrive, discard, and iii's function ids."""

from __future__ import annotations

from typing import Any

import pytest

from iii_embedded import III, Config, InvocationError, QueueConfig, StoreConfig, TriggerAction
from iii_embedded.testing import VirtualClock, dead_jobs, drain

pytestmark = pytest.mark.anyio


def make_app(clock: VirtualClock) -> tuple[III, dict[str, bool]]:
    iii = III(
        Config(
            queues={
                "payment": QueueConfig(
                    name="payment",
                    type="fifo",
                    message_group_field="account",
                    max_retries=2,
                    backoff_ms=100,
                ),
                # One at a time: its sync handler runs in threads, and the tests list
                # its dead jobs in failure order, which must then be enqueue order.
                "email": QueueConfig(name="email", max_retries=1, concurrency=1),
            }
        ),
        clock=clock,
        shutdown_grace_ms=0,
    )
    fixed = {"on": False}
    done: list[Any] = []

    @iii.function("pay")
    async def pay(data: dict[str, Any]) -> dict[str, Any]:
        if data.get("bad") and not fixed["on"]:
            raise ValueError(f"cannot pay {data['n']}")
        done.append(data["n"])
        return {"paid": data["n"]}

    iii.register_function("send", lambda data: (_ for _ in ()).throw(OSError("smtp down")))
    iii.done = done  # type: ignore[attr-defined]
    return iii, fixed


async def put(iii: III, fid: str, payload: Any, queue: str) -> str:
    r = await iii.trigger_async(fid, payload, action=TriggerAction.Enqueue(queue=queue))
    return str(r["messageReceiptId"])


async def test_redrive_one_some_and_all_resets_attempts() -> None:
    clock = VirtualClock()
    iii, fixed = make_app(clock)
    async with iii.running():
        ids = [
            await put(iii, "pay", {"account": f"a{n}", "n": n, "bad": True}, "payment")
            for n in range(4)
        ]
        await drain(iii)
        assert sorted(d.id for d in await dead_jobs(iii, "payment")) == sorted(ids)
        assert {d.attempts for d in await dead_jobs(iii, "payment")} == {2}
        fixed["on"] = True
        assert await iii.dlq_redrive_async("payment", [ids[0]]) == [ids[0]]
        assert sorted(await iii.dlq_redrive_async("payment", [*ids[1:3], "unknown"])) == sorted(
            ids[1:3]
        )
        await drain(iii)
        assert [d.id for d in await dead_jobs(iii, "payment")] == [ids[3]]
        assert await iii.dlq_redrive_async("payment") == [ids[3]]
        await drain(iii)
        assert await dead_jobs(iii, "payment") == []
    assert sorted(iii.done) == [0, 1, 2, 3]  # type: ignore[attr-defined]


async def test_redriven_attempts_start_again_from_one() -> None:
    clock = VirtualClock()
    iii, _ = make_app(clock)
    async with iii.running():
        job_id = await put(iii, "send", {"to": "x"}, "email")
        await drain(iii)
        assert [d.attempts for d in await dead_jobs(iii, "email")] == [1]
        await iii.dlq_redrive_async("email")
        await drain(iii)
        assert [(d.id, d.attempts) for d in await dead_jobs(iii, "email")] == [(job_id, 1)]


async def test_a_redriven_job_joins_the_tail_of_its_fifo_group() -> None:
    clock = VirtualClock()
    iii, fixed = make_app(clock)
    async with iii.running():
        await put(iii, "pay", {"account": "A", "n": 1, "bad": True}, "payment")
        await drain(iii)
        fixed["on"] = True
        await put(iii, "pay", {"account": "A", "n": 2}, "payment")
        await drain(iii)
        await iii.dlq_redrive_async("payment")
        await put(iii, "pay", {"account": "A", "n": 3}, "payment")
        await drain(iii)
    assert iii.done == [2, 1, 3]  # type: ignore[attr-defined]


async def test_discard_deletes_dead_jobs() -> None:
    clock = VirtualClock()
    iii, _ = make_app(clock)
    async with iii.running():
        ids = [await put(iii, "send", {"n": n}, "email") for n in range(3)]
        await drain(iii)
        assert await iii.dlq_discard_async("email", [ids[1]]) == [ids[1]]
        assert [d.id for d in await dead_jobs(iii, "email")] == [ids[0], ids[2]]
        assert sorted(await iii.dlq_discard_async("email")) == sorted([ids[0], ids[2]])
        assert await dead_jobs(iii, "email") == []
        assert (await iii.queue_stats_async("email")).dead == 0


async def test_dlq_operations_reject_unknown_queues() -> None:
    iii, _ = make_app(VirtualClock())
    async with iii.running():
        with pytest.raises(ValueError, match="Queue 'nope' not found"):
            await iii.dlq_redrive_async("nope")


async def test_iii_function_ids_work_through_trigger_with_iii_shapes() -> None:
    clock = VirtualClock()
    iii, _fixed = make_app(clock)
    async with iii.running():
        ids = [await put(iii, "send", {"n": n}, "email") for n in range(3)]
        await drain(iii)

        listed = await iii.trigger_async("engine::queue::dlq_messages", {"queue": "email"})
        assert [m["id"] for m in listed] == ids
        first = listed[0]
        assert first["payload"] == {"n": 0}
        assert first["retries"] == 1
        assert first["error"] == "OSError: smtp down"
        assert first["failed_at"] == int(clock.now() * 1000)
        assert first["size_bytes"] == len(b'{"n": 0}')
        page = await iii.trigger_async(
            "engine::queue::dlq_messages", {"topic": "email", "offset": 1, "limit": 1}
        )
        assert [m["id"] for m in page] == [ids[1]]

        dlq_topics = await iii.trigger_async("engine::queue::dlq_topics", {})
        assert sorted(dlq_topics, key=lambda t: t["topic"]) == [
            {"topic": name, "broker_type": "function_queue", "message_count": count}
            for name, count in (("default", 0), ("email", 3), ("payment", 0))
        ]
        topics = await iii.trigger_async("engine::queue::list_topics", {})
        assert sorted(topics, key=lambda t: t["name"]) == [
            {"name": name, "broker_type": "function_queue", "subscriber_count": q.concurrency}
            for name, q in sorted(iii.config.queues.items())
        ]
        stats = await iii.trigger_async("engine::queue::topic_stats", {"topic": "email"})
        assert (stats["depth"], stats["dlq_depth"]) == (0, 3)
        assert stats["config"]["max_retries"] == 1

        assert await iii.trigger_async(
            "iii::queue::discard_message", {"topic": "email", "message_id": ids[0]}
        ) == {"queue": "email", "message_id": ids[0], "redriven": 1}
        assert await iii.trigger_async(
            "iii::queue::redrive_message", {"queue": "email", "message_id": "missing"}
        ) == {"queue": "email", "message_id": "missing", "redriven": 0}
        assert await iii.trigger_async(
            "iii::queue::redrive_message", {"queue": "email", "message_id": ids[1]}
        ) == {"queue": "email", "message_id": ids[1], "redriven": 1}
        assert await iii.trigger_async("iii::queue::redrive", {"topic": "email"}) == {
            "queue": "email",
            "redriven": 1,
        }
        await drain(iii)
        assert sorted(d.id for d in await dead_jobs(iii, "email")) == sorted(ids[1:])


async def test_dlq_functions_without_their_queue_or_message_id_fail_with_iiis_codes() -> None:
    """As iii's engine answers: a payload that lacks the field (or is not an object) is a
    ``deserialization_error`` naming it; an empty queue or message id is ``queue_not_set``
    or ``message_id_not_set``."""
    iii, _fixed = make_app(VirtualClock())

    async def failure(function_id: str, payload: Any) -> tuple[str, str]:
        with pytest.raises(InvocationError) as error:
            await iii.trigger_async(function_id, payload)
        return error.value.code, error.value.message

    async with iii.running():
        for function_id, field in (
            ("iii::queue::redrive", "queue"),
            ("iii::queue::redrive_message", "queue"),
            ("iii::queue::discard_message", "queue"),
            ("engine::queue::dlq_messages", "topic"),
            ("engine::queue::topic_stats", "topic"),
        ):
            for payload in ({}, None, ["email"]):
                assert await failure(function_id, payload) == (
                    "deserialization_error",
                    f"Failed to deserialize input for {function_id}: missing field `{field}`",
                )
            assert await failure(function_id, {"queue": ""}) == (
                "queue_not_set",
                "Queue name is required",
            )
        for function_id in ("iii::queue::redrive_message", "iii::queue::discard_message"):
            assert await failure(function_id, {"queue": "email"}) == (
                "deserialization_error",
                f"Failed to deserialize input for {function_id}: missing field `message_id`",
            )
            assert await failure(function_id, {"topic": "email", "message_id": ""}) == (
                "message_id_not_set",
                "Message ID is required",
            )


async def test_dlq_messages_takes_its_paging_values_as_given_and_names_a_bad_one() -> None:
    iii, _fixed = make_app(VirtualClock())
    async with iii.running():
        ids = [await put(iii, "send", {"n": n}, "email") for n in range(2)]
        await drain(iii)
        none = await iii.trigger_async(
            "engine::queue::dlq_messages", {"queue": "email", "limit": 0}
        )
        paged = await iii.trigger_async(
            "engine::queue::dlq_messages", {"queue": "email", "offset": 1, "limit": None}
        )
        with pytest.raises(
            InvocationError, match="'offset' must be a non-negative integer, got 'x'"
        ):
            await iii.trigger_async(
                "engine::queue::dlq_messages", {"queue": "email", "offset": "x"}
            )
        with pytest.raises(InvocationError, match="'limit' must be a non-negative integer, got -1"):
            await iii.trigger_async("engine::queue::dlq_messages", {"queue": "email", "limit": -1})
    assert none == []
    assert [m["id"] for m in paged] == ids[1:]


async def test_a_first_failure_at_time_zero_is_kept_as_the_first_failure(
    store_config: StoreConfig,
) -> None:
    # A virtual clock may start at 0: a failure at 0.0 is a failure time like any other.
    clock = VirtualClock(0.0)
    iii = III(
        Config(
            queues={"q": QueueConfig(name="q", max_retries=3, backoff_ms=1000)},
            store=store_config,
        ),
        clock=clock,
        shutdown_grace_ms=0,
    )
    iii.register_function("send", lambda data: (_ for _ in ()).throw(OSError("smtp down")))
    async with iii.running():
        await put(iii, "send", {"to": "x"}, "q")
        await drain(iii)
        [dead] = await dead_jobs(iii, "q")
    assert (dead.attempts, dead.first_failed_at, dead.last_failed_at) == (3, 0.0, 3.0)
