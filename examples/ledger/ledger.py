"""The FIFO financial ledger of iii's "Use Named Queues" guide.

Transactions of one account are applied strictly in order; different accounts proceed
independently. A withdrawal that finds too little money raises "Insufficient funds" and is
retried in place (500 ms, 1 s, 2 s, ...), so the next transaction of that account cannot
overtake it. A small SQLite database stands in for the guide's `db`.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from iii_embedded import III, TriggerAction


class Database:
    """The guide's `db`: `execute` and `query` with %s placeholders, thread-safe."""

    def __init__(self) -> None:
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self._conn.execute("CREATE TABLE accounts (id TEXT PRIMARY KEY, balance REAL)")
        self.applied: list[tuple[str, str, float]] = []

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.execute(sql.replace("%s", "?"), params)

    def query(self, sql: str, params: tuple[Any, ...]) -> float:
        with self._lock:
            row = self._conn.execute(sql.replace("%s", "?"), params).fetchone()
        return float(row[0]) if row else 0.0


def build(clock: Any = None) -> tuple[III, Database]:
    iii = III.from_config(
        Path(__file__).with_name("iii-config.yaml"), clock=clock, shutdown_grace_ms=0
    )
    db = Database()
    for account in ("acct_A", "acct_B"):
        db.execute("INSERT INTO accounts VALUES (%s, %s)", (account, 0.0))

    def submit_transaction(req: dict[str, Any]) -> dict[str, Any]:
        account_id = req["body"]["account_id"]
        receipt = iii.trigger(
            {
                "function_id": "ledger::apply",
                "payload": {
                    "account_id": account_id,
                    "type": req["body"]["type"],
                    "amount": req["body"]["amount"],
                },
                "action": TriggerAction.Enqueue(queue="ledger"),
            }
        )
        return {"status_code": 202, "body": {"receiptId": receipt["messageReceiptId"]}}

    def apply_transaction(txn: dict[str, Any]) -> dict[str, Any]:
        account_id = txn["account_id"]
        if txn["type"] == "deposit":
            db.execute(
                "UPDATE accounts SET balance = balance + %s WHERE id = %s",
                (txn["amount"], account_id),
            )
        elif txn["type"] == "withdraw":
            balance = db.query("SELECT balance FROM accounts WHERE id = %s", (account_id,))
            if balance < txn["amount"]:
                raise ValueError("Insufficient funds")
            db.execute(
                "UPDATE accounts SET balance = balance - %s WHERE id = %s",
                (txn["amount"], account_id),
            )
        db.applied.append((account_id, txn["type"], txn["amount"]))
        return {"applied": True}

    iii.register_function("transactions::submit", submit_transaction)
    iii.register_function("ledger::apply", apply_transaction)
    return iii, db
