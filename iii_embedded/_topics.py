"""Topic queues: iii's older publish/subscribe API, still valid.

Publishing: ``trigger({"function_id": "enqueue", "payload": {"topic": t, "data": d}})`` or
``trigger({"function_id": "iii::durable::publish", "payload": {"topic": t, "data": d}})``.
Subscribing: ``register_trigger({"type": "queue" | "durable:subscriber", "function_id": f,
"config": {"topic": t, "queue_config": {...}}})``.

Each (topic, function) subscription is served by its own internal named queue,
``topic::<topic>::<function_id>``, configured from the subscription's ``queue_config`` (the
same keys as ``queue_configs``, or iii's camelCase ``maxRetries`` and ``backoffDelayMs``):
every subscribed function gets its own copy of each message with its own retries and
dead-letter queue, and subscribing the same function twice makes the subscriptions compete
on one queue. A publish stores one job per subscribed
function, all in one transaction. A message published to a topic nobody subscribes to is
dropped with a warning (see docs/design.md). An unregistered subscription
(``Trigger.unregister``) gets no copy of later messages; its queue still delivers the
copies stored in it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._actions import EnqueueAction
from ._config import QueueConfig
from ._errors import InvocationError
from ._runtime import new_jobs
from ._stores import NewJob
from ._triggers import Binding, register_trigger_type

if TYPE_CHECKING:
    from ._app import III

__all__ = ["install_topics", "topic_queue_name"]

log = logging.getLogger("iii_embedded.topics")

_QUEUE_KEYS = {field.name for field in attrs.fields(QueueConfig)} - {"name"}
"""The keys of a subscription's ``queue_config``: those of ``queue_configs``."""

_III_QUEUE_KEYS = {"maxRetries": "max_retries", "backoffDelayMs": "backoff_ms"}
"""iii's engine reads a subscription's ``queue_config`` in camelCase: these are its names
for ours (``type`` and ``concurrency`` are spelled alike)."""

_IGNORED_QUEUE_KEYS = frozenset({"visibilityTimeout", "delaySeconds", "backoffType", "maxPriority"})
"""Keys of iii's ``queue_config`` that its builtin adapter ignores (they configure its
RabbitMQ and Redis adapters): ignored here too, with a warning."""


def _queue_options(function_id: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A subscription's ``queue_config`` in our key names, iii's camelCase ones translated."""
    result: dict[str, Any] = {}
    ignored = sorted(key for key in options if key in _IGNORED_QUEUE_KEYS)
    for key, value in options.items():
        if key in _IGNORED_QUEUE_KEYS:
            continue
        name = _III_QUEUE_KEYS.get(key, key)
        if name in result:
            iii_name = next(k for k, ours in _III_QUEUE_KEYS.items() if ours == name)
            raise ValueError(
                f"queue trigger of {function_id!r}: queue_config gives both "
                f"'{iii_name}' and '{name}', iii's name and ours for one key"
            )
        result[name] = value
    unknown = set(result) - _QUEUE_KEYS
    if unknown:
        raise ValueError(
            f"queue trigger of {function_id!r}: unknown queue_config key(s) "
            f"{sorted(unknown)} (allowed: {', '.join(sorted(_QUEUE_KEYS))})"
        )
    if ignored:
        log.warning(
            "queue trigger of %r ignores queue_config key(s) %s: they configure iii's "
            "other queue adapters",
            function_id,
            ignored,
        )
    return result


def topic_queue_name(topic: str, function_id: str) -> str:
    """The internal queue that delivers ``topic`` to ``function_id``."""
    return f"topic::{topic}::{function_id}"


def _subscribe(app: III, trigger: Mapping[str, Any]) -> Binding:
    function_id = trigger.get("function_id")
    config = trigger.get("config") or {}
    topic = config.get("topic") if isinstance(config, Mapping) else None
    if not isinstance(function_id, str) or not function_id:
        raise ValueError("a queue trigger needs a 'function_id'")
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"the queue trigger of {function_id!r} needs config.topic")
    given = config.get("queue_config") or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"queue trigger of {function_id!r}: queue_config must be a mapping")
    options = _queue_options(function_id, given)
    name = topic_queue_name(topic, function_id)
    taken = app.topic_queues.get(name)
    if taken is not None and taken != (topic, function_id):
        # "topic::a::b::c" is topic "a" for "b::c" and topic "a::b" for "c": one queue
        # would carry both subscriptions' messages to one of the functions.
        raise ValueError(
            f"queue trigger of {function_id!r} on topic {topic!r}: its queue {name!r} is "
            f"already that of {taken[1]!r} on topic {taken[0]!r} (their '::' separators "
            "meet): rename the topic or the function"
        )
    try:
        queue = QueueConfig(name=name, **dict(options))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"queue trigger of {function_id!r}: queue_config: {exc}") from None
    binding = Binding(key=("topic", name), undo=lambda: _unsubscribe(app, name))
    subscribers = app.topics.setdefault(topic, [])
    if name in subscribers:
        # The same function subscribed again (or again after an unregister): it competes
        # on the same queue, whose configuration is the first subscription's. Another one
        # given now is refused rather than ignored.
        if options and app.config.queues.get(name) != queue:
            why = (
                "its queue keeps the messages stored for it, with"
                if name in app.unsubscribed
                else "it is subscribed already, with"
            )
            raise ValueError(
                f"queue trigger of {function_id!r} on topic {topic!r}: {why} another "
                "queue_config; a subscription's queue has one configuration"
            )
        app.unsubscribed.discard(name)
        return binding
    app.add_queue(queue)
    subscribers.append(name)
    app.topic_queues[name] = (topic, function_id)
    return binding


def _unsubscribe(app: III, name: str) -> None:
    """Stop storing copies of the topic's messages for the subscriber queue ``name``.
    The queue stays, and delivers the copies stored already (see docs/design.md)."""
    app.unsubscribed.add(name)


async def publish(app: III, data: Any, function_id: str = "iii::durable::publish") -> None:
    """Store one copy of a message for each function subscribed to its topic.

    As iii's engine does, a payload without its ``topic`` or ``data`` fails with
    ``deserialization_error`` naming the field (called by ``function_id``), an empty
    topic with ``topic_not_set``."""
    topic = data.get("topic", data.get("queue")) if isinstance(data, Mapping) else None
    missing = "topic" if topic is None else "data" if "data" not in data else None
    if missing:
        raise InvocationError(
            "deserialization_error",
            f"Failed to deserialize input for {function_id}: missing field `{missing}`",
        )
    if not isinstance(topic, str):
        raise InvocationError(
            "deserialization_error",
            f"Failed to deserialize input for {function_id}: `topic` must be a string, "
            f"got {topic!r}",
        )
    if not topic:
        raise InvocationError("topic_not_set", "Topic is not set")
    queues = [q for q in app.topics.get(topic, ()) if q not in app.unsubscribed]
    if not queues:
        log.warning(
            "message published to topic %r dropped: no function subscribes to it "
            "(register a 'queue' trigger first)",
            topic,
        )
        return
    rt = app.runtime
    message = data.get("data")
    jobs: list[NewJob] = []
    now = rt.clock.now()
    for name in queues:
        function_id = app.topic_queues[name][1]  # not parsed from the name: either may hold "::"
        # Not through ``build_jobs``: a subscriber whose function is not registered (yet)
        # gets its copy all the same, held until it is, as any job for an unknown
        # function; it must not cost the other subscribers theirs.
        jobs += new_jobs(
            rt.config.queues[name],
            function_id,
            [message],
            EnqueueAction(queue=name),
            now,
            batch=False,
        )
    # Woken before the jobs are stored (so no enqueue in between claims ahead of them,
    # see docs/design.md, "Claims at enqueue") and after.
    for name in queues:
        rt.runners[name].wake()
    await rt.store.enqueue(jobs)
    for name in queues:
        rt.runners[name].wake()


def install_topics(app: III) -> None:
    """Register the publish functions and the ``queue``/``durable:subscriber`` triggers."""

    async def enqueue(data: Any) -> None:
        await publish(app, data, "enqueue")

    async def durable_publish(data: Any) -> None:
        await publish(app, data, "iii::durable::publish")

    app._register_internal("enqueue", enqueue)
    app._register_internal("iii::durable::publish", durable_publish)
    register_trigger_type("queue", _subscribe)
    register_trigger_type("durable:subscriber", _subscribe)
