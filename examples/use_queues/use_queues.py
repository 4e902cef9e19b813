"""iii's "Use Queues" guide, end to end, on iii-embedded.

`orders::create` enqueues `orders::process-order` on the FIFO `payment` queue (grouped by
`transaction_id`), which enqueues `notifications::send` on `default`; a payment with a
`transaction_id` goes through `payments::process`; a fire-and-forget email uses Void.
Everything iii-sdk style: register_worker, dict requests, TriggerAction.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

from iii_embedded import Logger, TriggerAction, register_worker

os.environ.setdefault("III_CONFIG", str(Path(__file__).with_name("iii-config.yaml")))
iii = register_worker(os.environ.get("III_URL", "ws://localhost:49134"))

done = threading.Event()
log: list[str] = []


def create_order(data: dict[str, Any]) -> dict[str, Any]:
    order = {"id": str(uuid.uuid4()), "transaction_id": f"txn-{uuid.uuid4().hex[:6]}", **data}
    iii.trigger(
        {
            "function_id": "orders::process-order",
            "payload": order,
            "action": TriggerAction.Enqueue(queue="payment"),
        }
    )
    Logger().info("Order enqueued", {"orderId": order["id"]})
    return {"orderId": order["id"]}


def process_order(order: dict[str, Any]) -> dict[str, Any]:
    log.append(f"process-order {order['id']}")
    iii.trigger(
        {
            "function_id": "notifications::send",
            "payload": {"orderId": order["id"], "type": "payment-confirmed"},
            "action": TriggerAction.Enqueue(queue="default"),
        }
    )
    return {"processed": True}


def send_notification(data: dict[str, Any]) -> None:
    log.append(f"notification {data['type']} {data['orderId']}")


def process_payment(payment: dict[str, Any]) -> dict[str, Any]:
    log.append(f"payment {payment['transaction_id']} {payment['amount']} {payment['currency']}")
    return {"ok": True}


def send_email(data: dict[str, Any]) -> None:
    log.append(f"email to {data['to']}: {data['subject']}")
    done.set()


iii.register_function({"id": "orders::create"}, create_order)
iii.register_function({"id": "orders::process-order"}, process_order)
iii.register_function({"id": "notifications::send"}, send_notification)
iii.register_function({"id": "payments::process"}, process_payment)
iii.register_function({"id": "notifications::send-email"}, send_email)


def main() -> list[str]:
    """Run the guide's calls; return what the functions did, once it is all done."""
    result = iii.trigger(
        {
            "function_id": "orders::create",
            "payload": {"items": ["item-1", "item-2"], "total": 99.99},
        }
    )
    print("Order created", result["orderId"])
    iii.trigger(
        {
            "function_id": "payments::process",
            "payload": {"transaction_id": "txn-abc-123", "amount": 49.99, "currency": "USD"},
            "action": TriggerAction.Enqueue(queue="payment"),
        }
    )
    iii.trigger(
        {
            "function_id": "notifications::send-email",
            "payload": {"to": "user@example.com", "subject": "Hello"},
            "action": TriggerAction.Void(),
        }
    )
    done.wait(10)
    while sum(s.ready + s.running + s.delayed for s in iii.stats().values()):
        done.wait(0.01)
    return sorted(log)


if __name__ == "__main__":
    for line in main():
        print(line)
    iii.shutdown()
