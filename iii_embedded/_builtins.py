"""The engine's own functions, callable through ``trigger`` with iii's ids and shapes.

``iii::queue::redrive {queue}`` → ``{queue, redriven}``;
``iii::queue::redrive_message {queue, message_id}`` → ``{queue, message_id, redriven: 0|1}``;
``iii::queue::discard_message {queue, message_id}`` → same shape (iii reuses it);
``engine::queue::dlq_messages {queue, offset=0, limit=50}`` → list of messages;
``engine::queue::dlq_topics {}`` → ``[{topic, broker_type, message_count}]``;
``engine::queue::list_topics {}`` → ``[{name, broker_type, subscriber_count}]``;
``engine::queue::topic_stats {queue}`` → ``{depth, consumer_count, dlq_depth, config}``.
Each accepts ``queue`` or iii's alias ``topic``. As in iii, a payload without its queue (or
its ``message_id``) fails with ``deserialization_error`` naming the field, an empty one with
``queue_not_set`` (``Queue name is required``) or ``message_id_not_set``.

As iii's engine does, the two listings name the publish/subscribe topics (broker type
``builtin``; a topic's subscribers are its subscribed functions, its dead messages theirs)
and then the named queues (broker type ``function_queue``; a queue's subscriber count is
its ``concurrency``), each listed even when its dead-letter queue is empty. The internal
queues that serve topic subscriptions (``topic::<topic>::<function>``) are not listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import InvocationError

if TYPE_CHECKING:
    from ._app import III

__all__ = ["register_builtins", "BROKER_TYPE", "FUNCTION_QUEUE"]

BROKER_TYPE = "builtin"
FUNCTION_QUEUE = "function_queue"


def _unreadable(function_id: str, why: str) -> InvocationError:
    """A payload the function cannot read, as iii's engine reports one."""
    return InvocationError(
        "deserialization_error", f"Failed to deserialize input for {function_id}: {why}"
    )


def _text(data: Any, function_id: str, field: str, alias: str | None = None) -> str:
    """The string ``field`` (or its ``alias``) of a payload; missing, it is a
    ``deserialization_error`` naming the field, as in iii."""
    value = None
    if isinstance(data, Mapping):
        value = data.get(field, data.get(alias) if alias else None)
    if value is None:
        raise _unreadable(function_id, f"missing field `{field}`")
    if not isinstance(value, str):
        raise _unreadable(function_id, f"`{field}` must be a string, got {value!r}")
    return value


def _queue_of(data: Any, function_id: str, field: str = "queue") -> str:
    """The queue a DLQ function is called for. iii names it ``queue`` (alias ``topic``) in
    the redrive and discard functions, ``topic`` (alias ``queue``) in the others."""
    name = _text(data, function_id, field, "topic" if field == "queue" else "queue")
    if not name:
        raise InvocationError("queue_not_set", "Queue name is required")
    return name


def _message_id(data: Any, function_id: str) -> str:
    message_id = _text(data, function_id, "message_id")
    if not message_id:
        raise InvocationError("message_id_not_set", "Message ID is required")
    return message_id


def _count(data: Any, function_id: str, field: str, default: int) -> int:
    """A paging value of ``data``: absent or null gives ``default``; anything but a
    non-negative integer is refused, naming the field."""
    value = data.get(field) if isinstance(data, Mapping) else None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _unreadable(function_id, f"'{field}' must be a non-negative integer, got {value!r}")
    return value


def register_builtins(app: III) -> None:
    """Register the ``iii::queue::*`` and ``engine::queue::*`` functions on ``app``."""

    async def redrive(data: Any) -> dict[str, Any]:
        queue = _queue_of(data, "iii::queue::redrive")
        moved = await app.dlq_redrive_async(queue)
        return {"queue": queue, "redriven": len(moved)}

    async def redrive_message(data: Any) -> dict[str, Any]:
        function_id = "iii::queue::redrive_message"
        queue, message_id = _queue_of(data, function_id), _message_id(data, function_id)
        moved = await app.dlq_redrive_async(queue, [message_id])
        return {"queue": queue, "message_id": message_id, "redriven": len(moved)}

    async def discard_message(data: Any) -> dict[str, Any]:
        function_id = "iii::queue::discard_message"
        queue, message_id = _queue_of(data, function_id), _message_id(data, function_id)
        gone = await app.dlq_discard_async(queue, [message_id])
        return {"queue": queue, "message_id": message_id, "redriven": len(gone)}

    async def dlq_messages(data: Any) -> list[dict[str, Any]]:
        function_id = "engine::queue::dlq_messages"
        queue = _queue_of(data, function_id, "topic")
        offset = _count(data, function_id, "offset", 0)
        limit = _count(data, function_id, "limit", 50)
        queues = app.topics.get(queue)
        if not queues:
            jobs = await app.dlq_list_async(queue, offset=offset, limit=limit)
            return [j.to_iii() for j in jobs]
        # A topic: its subscribers' dead messages together, oldest failure first.
        found = [
            j.to_iii()
            for q in queues
            for j in await app.dlq_list_async(q, offset=0, limit=offset + limit)
        ]
        found.sort(key=lambda m: m["failed_at"])
        return found[offset : offset + limit]

    def subscribed(queues: list[str]) -> int:
        # An unregistered subscription's queue still counts in the topic's depth and DLQ
        # (its stored copies are delivered), not as a subscriber.
        return sum(q not in app.unsubscribed for q in queues)

    def serving_topics() -> set[str]:
        return {queue for queues in app.topics.values() for queue in queues}

    async def dlq_topics(_data: Any) -> list[dict[str, Any]]:
        stats = await app.stats_async()
        internal = serving_topics()
        listed = [
            {
                "topic": topic,
                "broker_type": BROKER_TYPE,
                "message_count": sum(stats[q].dead for q in queues if q in stats),
            }
            for topic, queues in app.topics.items()
        ]
        return listed + [
            {"topic": name, "broker_type": FUNCTION_QUEUE, "message_count": s.dead}
            for name, s in stats.items()
            if name not in internal
        ]

    async def list_topics(_data: Any) -> list[dict[str, Any]]:
        internal = serving_topics()
        listed = [
            {"name": topic, "broker_type": BROKER_TYPE, "subscriber_count": subscribed(queues)}
            for topic, queues in app.topics.items()
        ]
        return listed + [
            {"name": name, "broker_type": FUNCTION_QUEUE, "subscriber_count": q.concurrency}
            for name, q in app.config.queues.items()
            if name not in internal
        ]

    async def topic_stats(data: Any) -> dict[str, Any]:
        queue = _queue_of(data, "engine::queue::topic_stats", "topic")
        queues = app.topics.get(queue)
        if queues:  # a topic: its subscribers' queues together
            each = [await app.queue_stats_async(q) for q in queues]
            return {
                "depth": sum(s.ready + s.delayed + s.held for s in each),
                "consumer_count": subscribed(queues),
                "dlq_depth": sum(s.dead for s in each),
                "config": {},
            }
        stats = await app.queue_stats_async(queue)
        return {
            "depth": stats.ready + stats.delayed + stats.held,
            "consumer_count": stats.concurrency,
            "dlq_depth": stats.dead,
            "config": attrs.asdict(app.config.queues[queue]),
        }

    for function_id, handler in {
        "iii::queue::redrive": redrive,
        "iii::queue::redrive_message": redrive_message,
        "iii::queue::discard_message": discard_message,
        "engine::queue::dlq_messages": dlq_messages,
        "engine::queue::dlq_topics": dlq_topics,
        "engine::queue::list_topics": list_topics,
        "engine::queue::topic_stats": topic_stats,
    }.items():
        app._register_internal(function_id, handler)
