"""Each example under examples/ runs and shows its documented outcome."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

from iii_embedded.testing import VirtualClock, drain, drain_blocking

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(relative: str) -> ModuleType:
    path = EXAMPLES / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.anyio
async def test_ledger_applies_each_accounts_transactions_in_order() -> None:
    ledger = load("ledger/ledger.py")
    clock = VirtualClock()
    iii, db = ledger.build(clock)
    async with iii.running():
        for account, kind, amount in [
            ("acct_A", "deposit", 100.0),
            ("acct_B", "deposit", 20.0),
            ("acct_A", "withdraw", 70.0),
            ("acct_B", "withdraw", 5.0),
            ("acct_A", "withdraw", 30.0),
        ]:
            response = await iii.trigger_async(
                "transactions::submit",
                {"body": {"account_id": account, "type": kind, "amount": amount}},
            )
            assert response["status_code"] == 202
        await drain(iii)
        stats = await iii.queue_stats_async("ledger")
    a = [(kind, amount) for acct, kind, amount in db.applied if acct == "acct_A"]
    assert a == [("deposit", 100.0), ("withdraw", 70.0), ("withdraw", 30.0)]
    assert db.query("SELECT balance FROM accounts WHERE id = %s", ("acct_A",)) == 0.0
    assert db.query("SELECT balance FROM accounts WHERE id = %s", ("acct_B",)) == 15.0
    assert stats.failed == 0  # the deposit is always applied before the withdrawal


@pytest.mark.anyio
async def test_ledger_retries_an_unfunded_withdrawal_in_place() -> None:
    ledger = load("ledger/ledger.py")
    clock = VirtualClock()
    iii, db = ledger.build(clock)
    async with iii.running():
        for kind, amount in [("withdraw", 40.0), ("deposit", 1.0)]:
            await iii.trigger_async(
                "transactions::submit",
                {"body": {"account_id": "acct_A", "type": kind, "amount": amount}},
            )
        await drain(iii, max_advance_s=1.4)  # attempts at 0, 0.5 s: insufficient funds
        assert db.applied == []
        db.execute("UPDATE accounts SET balance = %s WHERE id = %s", (40.0, "acct_A"))
        await drain(iii)
        stats = await iii.queue_stats_async("ledger")
    assert db.applied == [("acct_A", "withdraw", 40.0), ("acct_A", "deposit", 1.0)]
    assert (stats.failed, stats.dead) == (2, 0)  # 0 s and 0.5 s fail; the 1.5 s try succeeds


@pytest.mark.anyio
async def test_bulk_email_keeps_at_most_three_in_flight_and_retries() -> None:
    bulk = load("bulk_email/bulk_email.py")
    provider = bulk.SmtpProvider(flaky="user3@example.com")
    clock = VirtualClock()
    iii = bulk.build(provider, clock)
    recipients = [{"email": f"user{n}@example.com"} for n in range(12)]
    async with iii.running():
        result = await iii.trigger_async(
            "campaigns::launch",
            {"recipients": recipients, "subject": "Spring sale", "body": "..."},
        )
        await drain(iii)
        stats = await iii.queue_stats_async("bulk-email")
    assert result == {"enqueued": 12}
    assert sorted(provider.sent) == sorted(r["email"] for r in recipients)
    assert provider.peak == 3
    assert (stats.completed, stats.retried) == (12, 1)


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"content-type": "application/json"}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.anyio
async def test_http_pipeline_answers_201_and_the_payment_receives_the_order() -> None:
    pipeline = load("http_pipeline/pipeline.py")
    iii, seen = pipeline.build(port=0)
    async with iii.running():
        assert iii.http_server is not None
        status, body = await anyio.to_thread.run_sync(
            post, iii.http_server.port, "/orders", {"total": 42.5, "email": "ada@example.com"}
        )
        await drain(iii)
    assert status == 201
    order_id = body["orderId"]
    assert seen["payments"] == [{"orderId": order_id, "amount": 42.5, "currency": "USD"}]
    assert seen["emails"] == [{"email": "ada@example.com", "orderId": order_id}]
    assert seen["analytics"] == [{"event": "order_created", "orderId": order_id}]


def test_topic_migration_delivers_old_and_new_style() -> None:
    migration = load("topic_migration/topic_migration.py")
    iii, received = migration.build()
    with iii:
        migration.publish_old_and_new(iii, {"id": "o-9", "total": 3})
        drain_blocking(iii)
    assert received == [("orders::process-payment", {"id": "o-9", "total": 3})] * 2


def run_example(relative: str, env: dict[str, str] | None = None) -> list[str]:
    """Run an example script directly, as a user would (with ``env`` added to the
    environment); return its output lines."""
    script = EXAMPLES / relative
    proc = subprocess.run(
        [sys.executable, script.name],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout.splitlines()


def test_use_queues_runs_the_guides_calls_end_to_end() -> None:
    lines = run_example("use_queues/use_queues.py")
    assert lines[0].startswith("Order created ")
    order_id = lines[0].split()[-1]
    assert f"process-order {order_id}" in lines
    assert f"notification payment-confirmed {order_id}" in lines
    assert "payment txn-abc-123 49.99 USD" in lines
    assert "email to user@example.com: Hello" in lines


def test_ledger_runs_directly_and_prints_its_outcome() -> None:
    lines = run_example("ledger/ledger.py")
    assert "acct_A: deposit 100.00, withdraw 70.00, withdraw 30.00 -> balance 0.00" in lines
    assert "acct_B: deposit 20.00, withdraw 5.00 -> balance 15.00" in lines
    assert "  2 attempts failed (Insufficient funds); applied meanwhile: 0" in lines
    assert "acct_B: withdraw 40.00, deposit 1.00 -> balance 1.00" in lines
    assert "queue ledger completed=7 failed=2 retried=2 dead=0" in lines
    assert lines[-1] == "ledger consistent"


def test_bulk_email_runs_directly_and_prints_its_outcome() -> None:
    lines = run_example("bulk_email/bulk_email.py")
    assert lines[0] == "campaign launched: 12 emails enqueued on bulk-email"
    assert "sent 12 of 12, at most 3 in flight" in lines
    assert "queue bulk-email completed=12 retried=1 dead=0" in lines
    assert lines[-1] == "campaign complete"


def test_topic_migration_runs_directly_and_prints_its_outcome() -> None:
    lines = run_example("topic_migration/topic_migration.py")
    assert lines == [
        "old: topic 'order.created' -> queue topic::order.created::orders::process-payment"
        " completed=1",
        "new: named queue payment completed=1",
        "orders::process-payment received {'id': 'o-9', 'total': 3}",
        "orders::process-payment received {'id': 'o-9', 'total': 3}",
        "both styles delivered",
    ]


def test_several_processes_share_one_store_and_run_each_job_once(tmp_path: Path) -> None:
    lines = run_example("several_processes/several_processes.py", {"STORE_DIR": str(tmp_path)})
    counts = [int(line.split(": ")[1].split()[0]) for line in lines[1:]]
    # How the jobs spread depends on timing; that more than one process ran some does not
    # (each job takes 0.1 s, and the workers are up before the batch is enqueued).
    assert lines[0] == f"24 thumbnails made by {len(counts)} processes"
    assert len(counts) >= 2 and sum(counts) == 24
    assert sum(line.startswith("  main process ") for line in lines) == 1
    with contextlib.closing(sqlite3.connect(tmp_path / "iii-queue.db")) as db:
        rows = db.execute("SELECT state, attempts, count(*) FROM jobs GROUP BY 1, 2").fetchall()
    assert rows == [("completed", 1, 24)]  # each job ran once, in one process
