"""The FIFO financial ledger of iii's "Use Named Queues" guide.

Transactions of one account are applied strictly in order; different accounts proceed
independently. A withdrawal that finds too little money raises "Insufficient funds" and is
retried in place (500 ms, 1 s, 2 s, ...), so the next transaction of that account cannot
overtake it. A small SQLite database stands in for the guide's `db`.

Run directly, it applies two accounts' transactions, then shows an unfunded withdrawal
retried in place until a top-up lands (about 1.5 s). The queue is in memory.
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

from iii_embedded import III, TriggerAction
from iii_embedded.testing import drain_blocking


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


TRANSACTIONS = [
    ("acct_A", "deposit", 100.0),
    ("acct_B", "deposit", 20.0),
    ("acct_A", "withdraw", 70.0),
    ("acct_B", "withdraw", 5.0),
    ("acct_A", "withdraw", 30.0),
]


def submit(iii: III, account_id: str, kind: str, amount: float) -> None:
    iii.trigger(
        {
            "function_id": "transactions::submit",
            "payload": {"body": {"account_id": account_id, "type": kind, "amount": amount}},
        }
    )


def history(db: Database, account_id: str, since: int = 0) -> str:
    return ", ".join(
        f"{kind} {amount:.2f}" for acct, kind, amount in db.applied[since:] if acct == account_id
    )


def balance(db: Database, account_id: str) -> float:
    return db.query("SELECT balance FROM accounts WHERE id = %s", (account_id,))


def main() -> int:
    iii, db = build()
    with iii:  # start the engine in a background thread; shut it down at the end
        for txn in TRANSACTIONS:
            submit(iii, *txn)
        drain_blocking(iii)
        for account in ("acct_A", "acct_B"):
            print(f"{account}: {history(db, account)} -> balance {balance(db, account):.2f}")

        print(f"\nacct_B has {balance(db, 'acct_B'):.2f}: withdraw 40.00, then deposit 1.00")
        seen = len(db.applied)
        submit(iii, "acct_B", "withdraw", 40.0)
        submit(iii, "acct_B", "deposit", 1.0)
        deadline = time.monotonic() + 10
        while iii.stats()["ledger"].failed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # attempts at 0 s and 0.5 s; the next one is at 1.5 s
        failed = iii.stats()["ledger"].failed
        waiting = len(db.applied) - seen
        print(f"  {failed} attempts failed (Insufficient funds); applied meanwhile: {waiting}")
        db.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (25.0, "acct_B"))
        print("  a 25.00 top-up lands outside the queue")
        drain_blocking(iii)
        print(f"acct_B: {history(db, 'acct_B', seen)} -> balance {balance(db, 'acct_B'):.2f}")
        stats = iii.stats()["ledger"]
    print(
        f"\nqueue ledger completed={stats.completed} failed={stats.failed} "
        f"retried={stats.retried} dead={stats.dead}"
    )
    ok = balance(db, "acct_A") == 0.0 and balance(db, "acct_B") == 1.0 and stats.dead == 0
    print("ledger consistent" if ok else "ledger INCONSISTENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
