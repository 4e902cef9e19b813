"""The engine's own functions, callable through ``trigger`` with iii's ids and shapes.

``iii::queue::redrive {queue}`` → ``{queue, redriven}``;
``iii::queue::redrive_message {queue, message_id}`` → ``{queue, message_id, redriven: 0|1}``;
``iii::queue::discard_message {queue, message_id}`` → same shape (iii reuses it);
``engine::queue::dlq_messages {queue, offset=0, limit=50}`` → list of messages;
``engine::queue::dlq_topics {}`` → ``[{topic, broker_type, message_count}]`` (only non-empty);
``engine::queue::list_topics {}`` → ``[{name, broker_type, subscriber_count}]``;
``engine::queue::topic_stats {queue}`` → ``{depth, consumer_count, dlq_depth, config}``.
Each accepts ``queue`` or iii's alias ``topic``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ._app import III

__all__ = ["register_builtins", "BROKER_TYPE"]

BROKER_TYPE = "builtin"


def _queue_of(data: Any) -> str:
    if isinstance(data, Mapping):
        name = data.get("queue", data.get("topic"))
        if isinstance(name, str) and name:
            return name
    raise ValueError("Queue name is required")


def _message_id(data: Any) -> str:
    message_id = data.get("message_id") if isinstance(data, Mapping) else None
    if not isinstance(message_id, str) or not message_id:
        raise ValueError("Message ID is required")
    return message_id


def register_builtins(app: III) -> None:
    """Register the ``iii::queue::*`` and ``engine::queue::*`` functions on ``app``."""

    async def redrive(data: Any) -> dict[str, Any]:
        queue = _queue_of(data)
        moved = await app.dlq_redrive_async(queue)
        return {"queue": queue, "redriven": len(moved)}

    async def redrive_message(data: Any) -> dict[str, Any]:
        queue, message_id = _queue_of(data), _message_id(data)
        moved = await app.dlq_redrive_async(queue, [message_id])
        return {"queue": queue, "message_id": message_id, "redriven": len(moved)}

    async def discard_message(data: Any) -> dict[str, Any]:
        queue, message_id = _queue_of(data), _message_id(data)
        gone = await app.dlq_discard_async(queue, [message_id])
        return {"queue": queue, "message_id": message_id, "redriven": len(gone)}

    async def dlq_messages(data: Any) -> list[dict[str, Any]]:
        queue = _queue_of(data)
        offset = int(data.get("offset", 0) or 0)
        limit = int(data.get("limit", 50) or 50)
        jobs = await app.dlq_list_async(queue, offset=offset, limit=limit)
        return [j.to_iii() for j in jobs]

    async def dlq_topics(_data: Any) -> list[dict[str, Any]]:
        stats = await app.stats_async()
        return [
            {"topic": name, "broker_type": BROKER_TYPE, "message_count": s.dead}
            for name, s in stats.items()
            if s.dead > 0
        ]

    async def list_topics(_data: Any) -> list[dict[str, Any]]:
        return [
            {"name": name, "broker_type": BROKER_TYPE, "subscriber_count": 0}
            for name in app.config.queues
        ]

    async def topic_stats(data: Any) -> dict[str, Any]:
        queue = _queue_of(data)
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
