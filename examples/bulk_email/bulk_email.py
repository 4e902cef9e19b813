"""Bulk email with concurrency 3 (iii's "Use Named Queues" guide).

`campaigns::launch` enqueues one `emails::send` per recipient on `bulk-email`; the queue's
`concurrency: 3` keeps at most three sends in flight, however many are queued. A local
SMTP stand-in records how many requests it had open at once and fails the first attempt
for one address, which is retried after the 5 s backoff.

Run directly, it sends a 12-recipient campaign (about 5 s, for that backoff). The queue is
in memory.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

from iii_embedded import III, TriggerAction
from iii_embedded.testing import drain_blocking


class SmtpProvider:
    """Stands in for `requests.post("https://smtp-provider.example/send")`."""

    def __init__(self, flaky: str | None = None) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.sent: list[str] = []
        self._flaky = flaky

    def send(self, email: dict[str, Any]) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.01)  # the provider's latency
            with self._lock:
                if email["to"] == self._flaky:
                    self._flaky = None
                    raise ConnectionError("smtp provider unavailable")
                self.sent.append(email["to"])
        finally:
            with self._lock:
                self.in_flight -= 1


def build(provider: SmtpProvider, clock: Any = None) -> III:
    iii = III.from_config(
        Path(__file__).with_name("iii-config.yaml"), clock=clock, shutdown_grace_ms=0
    )

    def launch_campaign(campaign: dict[str, Any]) -> dict[str, Any]:
        for recipient in campaign["recipients"]:
            iii.trigger(
                {
                    "function_id": "emails::send",
                    "payload": {
                        "to": recipient["email"],
                        "subject": campaign["subject"],
                        "body": campaign["body"],
                    },
                    "action": TriggerAction.Enqueue(queue="bulk-email"),
                }
            )
        return {"enqueued": len(campaign["recipients"])}

    def send_email(email: dict[str, Any]) -> dict[str, Any]:
        provider.send(email)
        return {"sent": True}

    iii.register_function("campaigns::launch", launch_campaign)
    iii.register_function("emails::send", send_email)
    return iii


FLAKY = "user3@example.com"


def main() -> int:
    provider = SmtpProvider(flaky=FLAKY)
    iii = build(provider)
    recipients = [{"email": f"user{n}@example.com"} for n in range(12)]
    with iii:  # start the engine in a background thread; shut it down at the end
        result = iii.trigger(
            {
                "function_id": "campaigns::launch",
                "payload": {"recipients": recipients, "subject": "Spring sale", "body": "..."},
            }
        )
        print(f"campaign launched: {result['enqueued']} emails enqueued on bulk-email")
        print(f"(the provider fails {FLAKY} once; it is retried after the 5 s backoff)")
        drain_blocking(iii)
        stats = iii.stats()["bulk-email"]
    print(f"sent {len(provider.sent)} of {len(recipients)}, at most {provider.peak} in flight")
    print(f"queue bulk-email completed={stats.completed} retried={stats.retried} dead={stats.dead}")
    ok = sorted(provider.sent) == sorted(r["email"] for r in recipients) and provider.peak <= 3
    print("campaign complete" if ok else "campaign INCOMPLETE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
