"""Migrating from topic queues to named queues (iii's "Use Queues" guide).

Old: publish to a topic with the `enqueue` function and consume with a `queue` trigger.
New: enqueue straight to the function on a named queue. Both run side by side here.

Run directly, it publishes one order both ways and shows both deliveries (in memory).
"""

from __future__ import annotations

import sys
from typing import Any

from iii_embedded import III, Config, QueueConfig, TriggerAction
from iii_embedded.testing import drain_blocking


def build() -> tuple[III, list[tuple[str, Any]]]:
    iii = III(Config(queues={"payment": QueueConfig(name="payment")}), shutdown_grace_ms=0)
    received: list[tuple[str, Any]] = []

    def process_payment(order: dict[str, Any]) -> None:
        received.append(("orders::process-payment", order))

    iii.register_function("orders::process-payment", process_payment)
    # Old: register a queue trigger to consume the topic.
    iii.register_trigger(
        {
            "type": "queue",
            "function_id": "orders::process-payment",
            "config": {"topic": "order.created"},
        }
    )
    return iii, received


def publish_old_and_new(iii: III, order: dict[str, Any]) -> None:
    # Old: enqueue via trigger with a topic.
    iii.trigger({"function_id": "enqueue", "payload": {"topic": "order.created", "data": order}})
    # New: enqueue directly to the target function via a named queue.
    iii.trigger(
        {
            "function_id": "orders::process-payment",
            "payload": order,
            "action": TriggerAction.Enqueue(queue="payment"),
        }
    )


def main() -> int:
    iii, received = build()
    order = {"id": "o-9", "total": 3}
    with iii:  # start the engine in a background thread; shut it down at the end
        publish_old_and_new(iii, order)
        drain_blocking(iii)
        stats = iii.stats()
    old = stats["topic::order.created::orders::process-payment"]
    new = stats["payment"]
    print(f"old: topic 'order.created' -> queue {old.queue} completed={old.completed}")
    print(f"new: named queue {new.queue} completed={new.completed}")
    for function_id, payload in received:
        print(f"{function_id} received {payload}")
    ok = received == [("orders::process-payment", order)] * 2
    print("both styles delivered" if ok else "delivery INCOMPLETE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
