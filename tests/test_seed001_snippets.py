"""The Python snippets of iii's "Use Queues" how-to (../shared/seeds/001) run on iii-embedded
with only their import line changed (SPEC §2.2).

That seed is page text without code fences: its TypeScript, Python and Rust examples are
run together and their indentation is gone. Each Python snippet is therefore found between
two short anchors taken from it, read from the seed at test time (not copied), and the body
of each ``def`` gets its indentation back (up to its ``return``). Each scenario runs in its
own process, with stand-ins for the functions the how-to leaves to other workers, and
checks what those functions received.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"

# (first characters, last characters) of each Python snippet in the seed.
ANCHORS = {
    "create_order": ("import os\nimport uuid\nfrom iii import", '"orders::create"}, create_order)'),
    "process_order": (
        "import os\nfrom iii import Logger, register_worker",
        '"orders::process-order"}, process_order)',
    ),
    "chained": ("def process_order(order):\n# ...charge", 'return {"processed": True}'),
    "fifo": (
        "# The 'transaction_id' field in the data is used for FIFO ordering\niii.trigger(",
        '"action": TriggerAction.Enqueue(queue="payment"),\n})',
    ),
    "void": (
        "from iii import TriggerAction\n# Fire-and-forget",
        '"action": TriggerAction.Void(),\n})',
    ),
    "call": ('result = iii.trigger({\n"function_id": "orders::create"', 'result["orderId"])'),
    "reference": (
        "import os\nfrom iii import TriggerAction, register_worker",
        '"action": TriggerAction.Void(),\n})',
    ),
    "old_topic": (
        "# Old: enqueue via trigger with topic",
        '"config": {"topic": "order.created"},\n})',
    ),
    "new_named": (
        "# New: enqueue directly to the target function via a named queue\niii.trigger(",
        "# No trigger registration needed",
    ),
    # "triggerVoid: before and after": the call without an action, then the one with Void.
    "void_migration": (
        'iii.trigger({\n"function_id": "send-notification",\n"payload": data,\n})',
        '"action": TriggerAction.Void(),\n})',
    ),
}

STANDARD_PAYMENT = "{max_retries: 10, concurrency: 2, type: standard}"
# The seed's own configuration (step 1), in iii's older spelling as the seed writes it.
FIFO_PAYMENT = "{max_retries: 10, concurrency: 2, type: fifo, message_group_field: transaction_id}"
CONFIG = """\
modules:
  - class: modules::queue::QueueModule
    config:
      queue_configs:
        default: {max_retries: 5, concurrency: 5, type: standard}
        payment: %s
      adapter:
        class: modules::queue::BuiltinQueueAdapter
        config: {store_method: file_based, file_path: ./data/queue_store}
"""

PRELUDE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
from iii_embedded import TriggerAction
from iii_embedded import register_worker as _engine
iii = _engine()
def _record(name):
    def handler(data):
        print("RAN", name, json.dumps(data, sort_keys=True), flush=True)
        return {"ok": True}
    return handler
"""

WAIT = """
from iii_embedded.testing import drain as _drain
iii.runtime.portal.call(_drain, iii)  # queues idle and no Void call in flight
iii.shutdown()
"""


def seed_text() -> str:
    files = sorted(SEEDS.glob("001_*"))
    if not files:
        pytest.skip("the seed documents (../shared/seeds) are not beside this checkout")
    return files[0].read_text()


def _indent_bodies(code: str) -> str:
    lines, in_def = [], False
    for line in code.splitlines():
        if in_def:
            lines.append("    " + line)
            in_def = not line.startswith("return")
        else:
            lines.append(line)
            in_def = line.startswith("def ") and line.rstrip().endswith(":")
    return "\n".join(lines) + "\n"


def snippet(name: str) -> str:
    """The seed's snippet ``name``, runnable, with ``from iii`` made ``from iii_embedded``."""
    text = seed_text()
    start, end = ANCHORS[name]
    i = text.index(start)
    code = text[i : text.index(end, i) + len(end)]
    # Two snippets of one language can touch: "})iii.trigger(" is two statements.
    code = re.sub(r"\}\)(?=[A-Za-z_#])", "})\n", code)
    return _indent_bodies(code).replace("from iii import", "from iii_embedded import")


def run(tmp_path: Path, payment: str, code: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "iii-config.yaml"
    config.write_text(CONFIG % payment)
    script = tmp_path / "scenario.py"
    script.write_text(PRELUDE + code)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"III_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
    )


def ran(stdout: str) -> list[tuple[str, object]]:
    """What the stand-ins received, in order."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("RAN "):
            _, name, data = line.split(" ", 2)
            out.append((name, json.loads(data)))
    return out


def test_every_anchor_finds_its_snippet_once() -> None:
    text = seed_text()
    for name, (start, _) in ANCHORS.items():
        assert text.count(start) == 1, name
        compile(snippet(name), name, "exec")  # indentation restored: valid Python


def test_create_order_enqueues_and_process_order_receives_the_order(tmp_path: Path) -> None:
    code = snippet("create_order") + snippet("process_order") + snippet("call") + WAIT
    done = run(tmp_path, STANDARD_PAYMENT, code)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [line for line in done.stdout.splitlines() if line.startswith("Order created ")]
    assert len(printed) == 1
    order_id = printed[0].split()[-1]
    assert len(order_id) == 36  # the uuid4 create_order gave the order
    logs = [line for line in done.stdout.splitlines() if line.startswith("LOG ")]
    assert logs[0].startswith("LOG Order enqueued")
    assert any(line.startswith("LOG Processing payment") for line in logs)


def test_with_the_seeds_fifo_payment_queue_an_order_without_a_group_is_refused(
    tmp_path: Path,
) -> None:
    # The seed's step 1 makes `payment` a FIFO queue grouped by transaction_id, and its
    # create_order enqueues orders without one: iii refuses such an enqueue, and so do we.
    code = snippet("create_order") + snippet("process_order") + snippet("call") + WAIT
    done = run(tmp_path, FIFO_PAYMENT, code)
    assert done.returncode != 0
    assert (
        "FIFO queue 'payment' requires field 'transaction_id' in data, but it was not found"
        in done.stderr
    )
    assert "Order created" not in done.stdout


def test_a_handler_enqueues_the_next_step(tmp_path: Path) -> None:
    code = (
        'iii.register_function({"id": "notifications::send"}, _record("notifications::send"))\n'
        + snippet("chained")
        + 'iii.register_function({"id": "orders::process-order"}, process_order)\n'
        + 'iii.trigger({"function_id": "orders::process-order", "payload": {"id": "o-1"},'
        + ' "action": TriggerAction.Enqueue(queue="payment")})\n'
        + WAIT
    )
    done = run(tmp_path, STANDARD_PAYMENT, code)
    assert done.returncode == 0, done.stderr
    assert ran(done.stdout) == [
        ("notifications::send", {"orderId": "o-1", "type": "payment-confirmed"})
    ]


def test_a_payment_enqueued_on_the_fifo_queue_is_processed(tmp_path: Path) -> None:
    code = (
        'iii.register_function({"id": "payments::process"}, _record("payments::process"))\n'
        + snippet("fifo")
        + WAIT
    )
    done = run(tmp_path, FIFO_PAYMENT, code)
    assert done.returncode == 0, done.stderr
    assert ran(done.stdout) == [
        (
            "payments::process",
            {"amount": 49.99, "currency": "USD", "transaction_id": "txn-abc-123"},
        )
    ]


def test_void_sends_the_email_without_waiting(tmp_path: Path) -> None:
    code = (
        "iii.register_function({'id': 'notifications::send-email'},"
        " _record('notifications::send-email'))\n" + snippet("void") + WAIT
    )
    done = run(tmp_path, STANDARD_PAYMENT, code)
    assert done.returncode == 0, done.stderr
    assert ran(done.stdout) == [
        ("notifications::send-email", {"subject": "Hello", "to": "user@example.com"})
    ]


def test_the_quick_reference_calls_enqueues_and_fires(tmp_path: Path) -> None:
    code = (
        "order_data = {'id': 'o-2', 'transaction_id': 't-2'}\n"
        "data = {'message': 'hi'}\n"
        + "".join(
            f"iii.register_function({{'id': '{f}'}}, _record('{f}'))\n"
            for f in ("get-order", "process-order", "send-notification")
        )
        + snippet("reference")
        + "print('RESULT', json.dumps(result))\n"
        + WAIT
    )
    done = run(tmp_path, STANDARD_PAYMENT, code)
    assert done.returncode == 0, done.stderr
    assert sorted(ran(done.stdout), key=lambda r: r[0]) == [
        ("get-order", {"id": "123"}),
        ("process-order", {"id": "o-2", "transaction_id": "t-2"}),
        ("send-notification", {"message": "hi"}),
    ]
    assert 'RESULT {"ok": true}' in done.stdout


def test_the_old_topic_api_and_its_named_queue_replacement_both_run(tmp_path: Path) -> None:
    code = (
        "order = {'id': 'o-3', 'transaction_id': 't-3'}\n"
        "iii.register_function({'id': 'orders::process-payment'},"
        " _record('orders::process-payment'))\n"
        + snippet("old_topic")
        # A publish once the queue trigger exists reaches the subscriber.
        + 'iii.trigger({"function_id": "enqueue", "payload": {"topic": "order.created",'
        + ' "data": {"via": "topic"}}})\n'
        + snippet("new_named")
        + "\n"
        + WAIT
    )
    done = run(tmp_path, STANDARD_PAYMENT, code)
    assert done.returncode == 0, done.stderr
    assert sorted(ran(done.stdout), key=lambda r: json.dumps(r)) == sorted(
        [
            ("orders::process-payment", {"via": "topic"}),
            ("orders::process-payment", {"id": "o-3", "transaction_id": "t-3"}),
        ],
        key=lambda r: json.dumps(r),
    )


def test_the_old_and_new_fire_and_forget_forms_both_reach_the_function(tmp_path: Path) -> None:
    code = (
        "data = {'n': 1}\n"
        "iii.register_function({'id': 'send-notification'}, _record('send-notification'))\n"
        + snippet("void_migration")
        + WAIT
    )
    done = run(tmp_path, STANDARD_PAYMENT, code)
    assert done.returncode == 0, done.stderr
    assert ran(done.stdout) == [("send-notification", {"n": 1})] * 2
