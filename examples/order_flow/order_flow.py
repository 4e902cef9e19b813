"""The seed order flow on a file-based store: `make demo` runs this.

`orders::create` answers at once, enqueues the payment on the FIFO `payment` queue (one
order's payments stay in order), the confirmation email on the standard `email` queue, and
fires `analytics::track` with Void. The payment gateway stand-in fails the first attempt of
one order to show a retry with backoff. Queues live in ./data/queue_store (SQLite, WAL):
run it twice and the store is simply reused.
"""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from iii_embedded import III, Logger, TriggerAction, current_invocation
from iii_embedded.testing import drain_blocking

HERE = Path(__file__).resolve().parent
ORDERS = [
    {"customer": "ada@example.com", "items": ["keyboard"], "total": 99.99},
    {"customer": "grace@example.com", "items": ["mouse", "pad"], "total": 35.50},
    {"customer": "linus@example.com", "items": ["monitor"], "total": 249.00},
]

iii = III.from_config(HERE / "iii-config.yaml", shutdown_grace_ms=2000)
log = Logger("order_flow")
lock = threading.Lock()
events: list[str] = []
flaky_orders: set[str] = set()
FLAKY_CUSTOMER = "grace@example.com"  # the gateway stand-in times out once for this one


def say(line: str) -> None:
    with lock:
        events.append(line)
        print(line, flush=True)


@iii.function("orders::create")
def create_order(order: dict[str, Any]) -> dict[str, Any]:
    order = {"orderId": str(uuid.uuid4())[:8], **order}
    say(f"order {order['orderId']} created for {order['customer']} ({order['total']:.2f} USD)")
    if order["customer"] == FLAKY_CUSTOMER:
        flaky_orders.add(order["orderId"])
    iii.trigger(
        {
            "function_id": "orders::process-payment",
            "payload": {"orderId": order["orderId"], "amount": order["total"], "currency": "USD"},
            "action": TriggerAction.Enqueue(queue="payment"),
        }
    )
    iii.trigger(
        {
            "function_id": "emails::confirmation",
            "payload": {"email": order["customer"], "orderId": order["orderId"]},
            "action": TriggerAction.Enqueue(queue="email"),
        }
    )
    iii.trigger(
        {
            "function_id": "analytics::track",
            "payload": {"event": "order_created", "orderId": order["orderId"]},
            "action": TriggerAction.Void(),
        }
    )
    return {"status_code": 201, "body": {"orderId": order["orderId"]}}


@iii.function("orders::process-payment")
def process_payment(payment: dict[str, Any]) -> dict[str, Any]:
    invocation = current_invocation()
    attempt = invocation.attempt if invocation else 1
    if payment["orderId"] in flaky_orders and attempt == 1:
        say(f"  payment for {payment['orderId']}: gateway timeout on attempt 1, will retry")
        raise TimeoutError("payment gateway timed out")
    say(
        f"  payment for {payment['orderId']}: charged {payment['amount']:.2f} "
        f"{payment['currency']} (attempt {attempt})"
    )
    return {"charged": payment["amount"]}


@iii.function("emails::confirmation")
async def send_confirmation(email: dict[str, Any]) -> dict[str, Any]:
    say(f"  email for {email['orderId']}: confirmation sent to {email['email']}")
    return {"sent": True}


@iii.function("analytics::track")
async def track(event: dict[str, Any]) -> None:
    say(f"  analytics: {event['event']} {event['orderId']}")


def main() -> int:
    print(f"store: {iii.config.store.file_path}\n")
    with iii:  # start the engine in a background thread; shut it down gracefully at the end
        for order in ORDERS:
            iii.trigger({"function_id": "orders::create", "payload": order})
        drain_blocking(iii)  # until every queue is idle and no Void call is in flight
        stats = iii.stats()
    print()
    for name in ("payment", "email"):
        s = stats[name]
        print(f"queue {name:8} completed={s.completed} retried={s.retried} dead={s.dead}")
    payments = sum("charged" in e for e in events)
    emails = sum("confirmation sent" in e for e in events)
    ok = payments == len(ORDERS) and emails == len(ORDERS)
    print("\norder flow complete" if ok else "\norder flow INCOMPLETE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
