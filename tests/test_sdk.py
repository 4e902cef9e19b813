"""The iii-sdk face (SPEC §2.2): register_worker, register_function, Logger,
current_invocation, InvocationError, and iii's seed snippets with only the import changed."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from iii_embedded import (
    III,
    InitOptions,
    InvocationError,
    Logger,
    Trigger,
    TriggerAction,
    TriggerActionEnqueue,
    TriggerActionVoid,
    current_invocation,
    register_worker,
)
from iii_embedded._app import HOOK_EVENTS
from iii_embedded.testing import drain_blocking

CONFIG = """\
workers:
  - name: iii-queue
    config:
      queue_configs:
        payment: {max_retries: 10, concurrency: 2, type: fifo, message_group_field: transaction_id}
        email: {max_retries: 5, concurrency: 3}
"""


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "iii-config.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("III_CONFIG", raising=False)
    app = register_worker(os.environ.get("III_URL", "ws://localhost:49134"))
    yield app
    app.shutdown()


def test_register_worker_reads_the_config_in_the_working_directory(worker: III) -> None:
    assert set(worker.config.queues) == {"default", "payment", "email"}
    assert worker.is_running


def test_register_worker_prefers_iii_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere.yaml"
    other.write_text("queue_configs:\n  ledger: {type: fifo, message_group_field: account_id}\n")
    monkeypatch.setenv("III_CONFIG", str(other))
    app = register_worker()
    try:
        assert "ledger" in app.config.queues
    finally:
        app.shutdown()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_register_function_both_forms_and_sync_trigger_from_top_level(worker: III) -> None:
    ref = worker.register_function("math::add", lambda d: d["a"] + d["b"])
    ref2 = worker.register_function({"id": "math::neg", "description": "negate"}, lambda d: -d)
    assert (ref.id, ref2.id) == ("math::add", "math::neg")
    assert worker.trigger({"function_id": "math::add", "payload": {"a": 2, "b": 3}}) == 5
    assert worker.trigger({"function_id": "math::neg", "payload": 4}) == -4
    with pytest.raises(ValueError, match="already registered"):
        worker.register_function({"id": "math::add"}, lambda d: d)


def test_logger_records_carry_the_invocation(worker: III, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iii_embedded.user")
    done: list[Any] = []

    def process(order: dict[str, Any]) -> dict[str, bool]:
        Logger().info("Processing payment", {"orderId": order["transaction_id"]})
        inv = current_invocation()
        done.append(inv)
        return {"processed": True}

    worker.register_function({"id": "orders::process"}, process)
    receipt = worker.trigger(
        {
            "function_id": "orders::process",
            "payload": {"transaction_id": "t-1"},
            "action": TriggerAction.Enqueue(queue="payment"),
        }
    )
    wait_until(lambda: done)
    inv = done[0]
    assert inv is not None
    assert (inv.function_id, inv.receipt_id, inv.queue, inv.attempt, inv.group) == (
        "orders::process",
        receipt["messageReceiptId"],
        "payment",
        1,
        "t-1",
    )
    record = next(r for r in caplog.records if r.getMessage().startswith("Processing payment"))
    assert record.function_id == "orders::process"  # type: ignore[attr-defined]
    assert record.receipt_id == receipt["messageReceiptId"]  # type: ignore[attr-defined]
    assert record.attempt == 1  # type: ignore[attr-defined]
    assert record.iii["data"] == {"orderId": "t-1"}  # type: ignore[attr-defined]


def test_invocation_error_str_and_cause(worker: III) -> None:
    def fail(_: Any) -> None:
        raise ZeroDivisionError("division by zero")

    worker.register_function("fail", fail)
    with pytest.raises(InvocationError) as caught:
        worker.trigger({"function_id": "fail", "payload": None})
    assert str(caught.value) == "invocation_failed: ZeroDivisionError: division by zero"
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_current_invocation_is_none_outside_handlers() -> None:
    assert current_invocation() is None
    assert "job_dead_lettered" in HOOK_EVENTS


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _killed(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """A failed check's message: the output of ``proc``, killed first (it may serve for
    ever)."""
    proc.kill()
    return proc.communicate(timeout=10)


def run_until_signal(
    tmp_path: Path, script_text: str, ready: Path, sig: int, *, served: Path | None = None
) -> tuple[int, str, str]:
    """Run a worker script, wait until it wrote ``ready``, send it ``sig``; its exit
    status, stdout and stderr. ``served``: first wait for this file, which the script
    writes once it has served a call after its main thread ended."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(script_text))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=30)
        assert ready.exists() and proc.poll() is None, _killed(proc)
        if served is not None:
            # Its content, not only the file: write_text creates the file before it writes,
            # and an empty file seen in between failed the check (then the message's
            # communicate() waited for a process that serves until signalled).
            wait_until(lambda: _text(served) or proc.poll() is not None, timeout=30)
            assert _text(served) == "served after the script ended", _killed(proc)
            assert proc.poll() is None, "the process exited although the worker should serve"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("store", ["in_memory", "file_based"])
def test_a_worker_script_keeps_serving_until_sigterm(
    tmp_path: Path, store: str, sig: signal.Signals
) -> None:
    """On a file store too: its shutdown then runs after the interpreter began to shut
    down (the script has ended), when Python's default executor is gone; until
    2026-12-03 it failed there and the process never exited."""
    if store == "file_based":
        (tmp_path / "iii-config.yaml").write_text(
            "adapter:\n  config:\n    store_method: file_based\n    file_path: ./data\n"
        )
    ready, served = tmp_path / "ready", tmp_path / "served"
    code, _, err = run_until_signal(
        tmp_path,
        f"""
        import pathlib, threading
        from iii_embedded import register_worker

        iii = register_worker("ws://localhost:49134")

        def process_order(order):
            return {{"processed": True}}

        def after_the_script():  # a call served once the main thread has finished
            threading.main_thread().join()
            result = iii.trigger({{"function_id": "orders::process-order", "payload": {{}}}})
            if result == {{"processed": True}}:
                pathlib.Path({str(served)!r}).write_text("served after the script ended")

        iii.register_function({{"id": "orders::process-order"}}, process_order)
        result = iii.trigger({{"function_id": "orders::process-order", "payload": {{}}}})
        assert result == {{"processed": True}}
        threading.Thread(target=after_the_script, daemon=True).start()
        pathlib.Path({str(ready)!r}).write_text("ok")
        # the script ends here; the worker keeps serving like the iii SDK's does
    """,
        ready,
        sig,
        served=served,
    )
    assert code == 0, err
    assert "Traceback" not in err
    assert (tmp_path / "data").is_dir() is (store == "file_based")


def test_sigterm_ends_a_worker_script_that_is_still_running(tmp_path: Path) -> None:
    """The usual keep-alive loop after ``register_worker``: SIGTERM shuts the engine down
    and ends the script, with the status of a process SIGTERM ended (as iii's SDK does);
    until 2026-12-03 the engine stopped and the loop went on for ever."""
    ready = tmp_path / "ready"
    code, _, err = run_until_signal(
        tmp_path,
        f"""
        import pathlib, time
        from iii_embedded import register_worker

        iii = register_worker("ws://localhost:49134")
        iii.register_function({{"id": "ping"}}, lambda data: "pong")
        assert iii.trigger({{"function_id": "ping", "payload": {{}}}}) == "pong"
        pathlib.Path({str(ready)!r}).write_text("ok")
        while True:
            time.sleep(0.05)
    """,
        ready,
        signal.SIGTERM,
    )
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err


def test_a_programs_own_sigterm_handler_is_called_after_the_engine_stops(
    tmp_path: Path,
) -> None:
    ready = tmp_path / "ready"
    code, out, err = run_until_signal(
        tmp_path,
        f"""
        import pathlib, signal, time
        from iii_embedded import register_worker

        running = True

        def finish_current_item(signum, frame):
            global running
            running = False

        signal.signal(signal.SIGTERM, finish_current_item)
        iii = register_worker()
        iii.register_function({{"id": "ping"}}, lambda data: "pong")
        pathlib.Path({str(ready)!r}).write_text("ok")
        while running:
            time.sleep(0.05)
        print("own handler ran; engine running:", iii.is_running)
    """,
        ready,
        signal.SIGTERM,
    )
    assert (code, out.strip()) == (0, "own handler ran; engine running: False"), err


def test_register_worker_gives_trigger_handles_that_unregister_from_the_script(
    worker: III,
) -> None:
    """The worker's engine runs on its own thread; the script unregisters from its own."""
    got: list[Any] = []
    worker.register_function("on-order", got.append)
    handle = worker.register_trigger(
        {"type": "queue", "function_id": "on-order", "config": {"topic": "orders"}}
    )
    assert isinstance(handle, Trigger)
    worker.trigger({"function_id": "enqueue", "payload": {"topic": "orders", "data": 1}})
    drain_blocking(worker)
    handle.unregister()
    worker.trigger({"function_id": "enqueue", "payload": {"topic": "orders", "data": 2}})
    drain_blocking(worker)
    assert got == [1]


def test_init_options_invocation_timeout_ms_is_the_default_timeout_of_sync_triggers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """iii's ``register_worker(address, InitOptions(...))``: every field of iii's is
    accepted; ``invocation_timeout_ms`` bounds a synchronous call that gives no
    ``timeout_ms`` (a call's own still wins)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("III_CONFIG", raising=False)
    options = InitOptions(
        worker_name="orders-worker",
        worker_description="Processes orders",
        enable_metrics_reporting=False,
        invocation_timeout_ms=50,
        reconnection_config=None,
        otel={"enabled": False},
        headers={"authorization": "Bearer x"},
        telemetry=None,
    )
    app = register_worker("ws://localhost:49134", options)
    release = threading.Event()
    try:
        app.register_function("stuck", lambda _: release.wait(10))
        app.register_function("echo", lambda data: data)
        with pytest.raises(InvocationError) as timed_out:
            app.trigger({"function_id": "stuck", "payload": {}})
        assert timed_out.value.code == "TIMEOUT"
        assert str(timed_out.value) == "TIMEOUT: Function 'stuck' did not return within 50 ms"
        assert app.trigger({"function_id": "echo", "payload": 7, "timeout_ms": 5000}) == 7
    finally:
        release.set()
        app.shutdown()


def test_iii_action_classes_are_ours_under_iii_names(worker: III) -> None:
    assert TriggerActionEnqueue is type(TriggerAction.Enqueue(queue="email"))
    assert TriggerActionVoid is type(TriggerAction.Void())
    got: list[Any] = []
    worker.register_function("record", got.append)
    receipt = worker.trigger(
        {"function_id": "record", "payload": 1, "action": TriggerActionEnqueue(queue="email")}
    )
    assert set(receipt) == {"messageReceiptId"}
    assert (
        worker.trigger({"function_id": "record", "payload": 2, "action": TriggerActionVoid()})
        is None
    )
    drain_blocking(worker)
    assert sorted(got) == [1, 2]


def test_register_worker_calls_in_one_process_share_one_engine(worker: III) -> None:
    other = register_worker("ws://127.0.0.1:49134")
    assert other is worker
    other.register_function("shared::fn", lambda d: d * 2)
    assert worker.trigger({"function_id": "shared::fn", "payload": 21}) == 42


def test_a_worker_script_that_crashes_exits_instead_of_serving(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(
        textwrap.dedent("""
        from iii_embedded import register_worker
        iii = register_worker()
        raise RuntimeError("the script has a bug")
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert "RuntimeError: the script has a bug" in proc.stderr


def test_a_generator_handler_is_refused_when_registered() -> None:
    iii = III()

    async def events(_: object) -> Any:
        yield 1

    def numbers(_: object) -> Any:
        yield 1

    with pytest.raises(ValueError, match=r"'events' is an async generator function.*return"):
        iii.register_function("events", events)
    with pytest.raises(ValueError, match=r"'numbers' is a generator function"):
        iii.function("numbers")(numbers)
    assert "events" not in iii.registry and "numbers" not in iii.registry
