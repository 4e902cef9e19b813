"""The HTTP-to-queue pipeline of iii's "Use Named Queues" guide.

`POST /orders` answers 201 at once; the payment (FIFO `payment`), the confirmation email
(`email`) and analytics (Void) happen behind it. With the config's `iii-http` worker the
engine serves the route itself on port 3111 (override with `$PIPELINE_PORT`, 0 = any).

    python pipeline.py
    curl -XPOST localhost:3111/orders -d '{"total": 5, "email": "a@b.c"}'
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import attrs

from iii_embedded import III, HttpConfig, Logger, TriggerAction


def build(port: int | None = None) -> tuple[III, dict[str, list[Any]]]:
    iii = III.from_config(Path(__file__).with_name("iii-config.yaml"), shutdown_grace_ms=500)
    if port is not None:
        iii.config = attrs.evolve(iii.config, http=HttpConfig(host="127.0.0.1", port=port))
    seen: dict[str, list[Any]] = {"payments": [], "emails": [], "analytics": []}

    def create_order(req: dict[str, Any]) -> dict[str, Any]:
        logger = Logger()
        order = {"id": str(uuid.uuid4()), **(req.get("body") or {})}
        iii.trigger(
            {
                "function_id": "orders::process-payment",
                "payload": {"orderId": order["id"], "amount": order["total"], "currency": "USD"},
                "action": TriggerAction.Enqueue(queue="payment"),
            }
        )
        iii.trigger(
            {
                "function_id": "emails::confirmation",
                "payload": {"email": order["email"], "orderId": order["id"]},
                "action": TriggerAction.Enqueue(queue="email"),
            }
        )
        iii.trigger(
            {
                "function_id": "analytics::track",
                "payload": {"event": "order_created", "orderId": order["id"]},
                "action": TriggerAction.Void(),
            }
        )
        logger.info("Order created", {"orderId": order["id"]})
        return {"status_code": 201, "body": {"orderId": order["id"]}}

    fn = iii.register_function("orders::create", create_order)
    iii.register_trigger(
        {
            "type": "http",
            "function_id": fn.id,
            "config": {"api_path": "/orders", "http_method": "POST"},
        }
    )
    iii.register_function("orders::process-payment", seen["payments"].append)
    iii.register_function("emails::confirmation", seen["emails"].append)
    iii.register_function("analytics::track", seen["analytics"].append)
    return iii, seen


if __name__ == "__main__":
    import os

    app, _ = build(int(os.environ.get("PIPELINE_PORT", "3111")))
    app.run()
