"""The Python snippets of iii's "Use Named Queues" guide (../shared/seeds/003) run on
iii-embedded with only their import line changed (SPEC §2.2).

The snippets are read from the seed document at test time (not copied), the line
``from iii import`` becomes ``from iii_embedded import``, and each scenario runs in its own
process with small stand-ins for what the guide leaves out: the functions another worker
would register, the ledger's ``db`` and the ``requests`` library.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def snippets() -> list[str]:
    files = sorted(SEEDS.glob("003_*"))
    if not files:
        pytest.skip("the seed documents (../shared/seeds) are not beside this checkout")
    text = files[0].read_text()
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", text, flags=re.S)
    return [
        textwrap.dedent(b).replace("from iii import", "from iii_embedded import") for b in blocks
    ]


QUEUES = """\
queue_configs:
  payment: {max_retries: 10, concurrency: 2, type: fifo, message_group_field: %s}
  email: {max_retries: 5, concurrency: 10, type: standard, backoff_ms: 2000}
  ledger:
    {max_retries: 15, concurrency: 1, type: fifo, message_group_field: account_id, backoff_ms: 500}
  bulk-email: {max_retries: 5, concurrency: 3, type: standard, backoff_ms: 5000}
"""

PRELUDE = """
import sys, types, threading
from iii_embedded import TriggerAction
from iii_embedded import register_worker as _engine
_seen = []
def _record(name):
    def handler(data):
        _seen.append((name, data))
        return {"ok": True}
    return handler
"""

WAIT = """
from iii_embedded.testing import drain as _drain
iii.runtime.portal.call(_drain, iii)  # queues idle and no Void call in flight
"""


def run(tmp_path: Path, group_field: str, code: str) -> str:
    config = tmp_path / "iii-config.yaml"
    config.write_text(QUEUES % group_field)
    script = tmp_path / "scenario.py"
    script.write_text(code + "\niii.shutdown()\n")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"III_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_seed_has_the_six_python_snippets() -> None:
    blocks = snippets()
    assert len(blocks) == 6
    assert all(
        "from iii_embedded import" in b for b in (blocks[0], blocks[3], blocks[4], blocks[5])
    )


def test_enqueue_and_handle_the_result(tmp_path: Path) -> None:
    s = snippets()
    out = run(
        tmp_path,
        "orderId",
        PRELUDE
        + """
_engine().register_function("orders::process-payment", _record("payment"))
"""
        + s[0]
        + s[1]
        + WAIT
        + """
print("SEEN", _seen)
""",
    )
    lines = out.splitlines()
    assert re.fullmatch(r"[0-9a-f-]{36}", lines[0])
    assert re.fullmatch(r"Enqueued: [0-9a-f-]{36}", lines[1])
    assert "('payment', {'orderId': 'ord_789', 'amount': 149.99, 'currency': 'USD'})" in lines[2]


def test_a_rejected_enqueue_is_reported_by_the_guides_handler(tmp_path: Path) -> None:
    s = snippets()
    handler = s[1].replace('"orderId": "ord_789", ', "")  # drop the FIFO group field
    setup = 'iii = _engine()\niii.register_function("orders::process-payment", _record("p"))\n'
    out = run(tmp_path, "orderId", PRELUDE + setup + handler)
    assert out.strip() == (
        "Queue rejected job: enqueue_error: FIFO queue 'payment' requires field 'orderId' "
        "in data, but it was not found"
    )


def test_fifo_payment_with_transaction_id(tmp_path: Path) -> None:
    s = snippets()
    out = run(
        tmp_path,
        "transaction_id",
        PRELUDE
        + """
iii = _engine()
iii.register_function("payments::process", _record("payments"))
"""
        + s[2]
        + WAIT
        + "print(_seen)\n",
    )
    assert "'transaction_id': 'txn-abc-123'" in out


def test_http_to_queue_pipeline(tmp_path: Path) -> None:
    s = snippets()
    out = run(
        tmp_path,
        "orderId",
        PRELUDE
        + s[3]
        + """
iii.register_function("orders::process-payment", _record("payment"))
iii.register_function("emails::confirmation", _record("email"))
iii.register_function("analytics::track", _record("analytics"))
response = iii.trigger({"function_id": "orders::create",
                        "payload": {"body": {"total": 20.0, "email": "a@example.com"}}})
"""
        + WAIT
        + """
print(response["status_code"], sorted(name for name, _ in _seen))
""",
    )
    assert out.strip().splitlines()[-1] == "201 ['analytics', 'email', 'payment']"


def test_fifo_ledger(tmp_path: Path) -> None:
    s = snippets()
    out = run(
        tmp_path,
        "orderId",
        PRELUDE
        + """
class _Db:
    def __init__(self):
        self.balances, self.log = {"acct_A": 0.0}, []
    def execute(self, sql, params):
        amount, account = params
        sign = 1 if "+" in sql else -1
        self.balances[account] += sign * amount
        self.log.append((account, sign * amount))
    def query(self, sql, params):
        return self.balances[params[0]]
db = _Db()
"""
        + s[4]
        + """
for kind, amount in [("deposit", 100), ("withdraw", 60), ("withdraw", 40)]:
    r = iii.trigger({"function_id": "transactions::submit",
                     "payload": {"body": {"account_id": "acct_A", "type": kind, "amount": amount}}})
    assert r["status_code"] == 202
"""
        + WAIT
        + """
print(db.log, db.balances)
""",
    )
    assert out.strip() == "[('acct_A', 100), ('acct_A', -60), ('acct_A', -40)] {'acct_A': 0.0}"


def test_bulk_email(tmp_path: Path) -> None:
    s = snippets()
    out = run(
        tmp_path,
        "orderId",
        PRELUDE
        + """
_lock, _state = threading.Lock(), {"now": 0, "peak": 0, "sent": 0}
class _Response:
    def raise_for_status(self):
        pass
def _post(url, json):
    import time
    with _lock:
        _state["now"] += 1
        _state["peak"] = max(_state["peak"], _state["now"])
    time.sleep(0.01)
    with _lock:
        _state["now"] -= 1
        _state["sent"] += 1
    return _Response()
sys.modules["requests"] = types.SimpleNamespace(post=_post)
"""
        + s[5]
        + """
r = iii.trigger({"function_id": "campaigns::launch",
                 "payload": {"recipients": [{"email": f"u{n}@x.io"} for n in range(9)],
                             "subject": "Hi", "body": "..."}})
"""
        + WAIT
        + """
print(r, _state["sent"], _state["peak"])
""",
    )
    assert out.strip() == "{'enqueued': 9} 9 3"
