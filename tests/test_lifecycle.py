"""Lifecycles (running, start/shutdown, run) and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
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

import anyio
import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    QueueConfig,
    StoreConfig,
    StoreError,
    TriggerAction,
)
from iii_embedded._stores._memory import MemoryStore
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import DrainTimeout, VirtualClock, drain

pytestmark = pytest.mark.anyio


async def test_shutdown_waits_for_running_jobs_within_the_grace_period() -> None:
    store = MemoryStore()
    iii = III(clock=VirtualClock(), store=store, shutdown_grace_ms=5_000)
    started = anyio.Event()
    finished: list[int] = []

    @iii.function("work")
    async def work(n: int) -> None:
        started.set()
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        finished.append(n)

    async with iii.running():
        receipt = await iii.trigger_async("work", 1, action=TriggerAction.Enqueue(queue="default"))
        await started.wait()
    assert finished == [1]
    job = await store.get(receipt["messageReceiptId"])
    assert job is not None and job.state == "completed"


async def test_jobs_still_running_after_the_grace_period_go_back_without_spending_an_attempt() -> (
    None
):
    store = MemoryStore()
    iii = III(clock=VirtualClock(), store=store, shutdown_grace_ms=50)
    started = anyio.Event()
    cancelled: list[bool] = []

    @iii.function("stuck")
    async def stuck(_: Any) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(True)

    async with iii.running():
        receipt = await iii.trigger_async(
            "stuck", {}, action=TriggerAction.Enqueue(queue="default")
        )
        await started.wait()
        queued = await iii.trigger_async("stuck", {}, action=TriggerAction.Enqueue(queue="default"))
    assert cancelled == [True]
    job = await store.get(receipt["messageReceiptId"])
    assert job is not None and (job.state, job.attempts) == ("queued", 0)
    other = await store.get(queued["messageReceiptId"])
    assert other is not None and other.state in ("queued",)


@pytest.mark.parametrize("wait", ["trigger_and_wait", "runs.wait"])
async def test_a_wait_on_the_engines_own_loop_at_shutdown_gets_engine_stopped(
    store_config: StoreConfig, wait: str
) -> None:
    """A task of the program itself (not the engine's) waiting for a run when the engine
    stops: until 2026-12-03 it waited for ever in memory, and got the file store's
    StoreClosedError ("not open") on a file store, where a thread got ``engine_stopped``."""
    iii = III(Config(store=store_config), clock=VirtualClock(), shutdown_grace_ms=0)
    began = anyio.Event()

    @iii.function("forever")
    async def forever(_: Any) -> None:
        began.set()
        await anyio.sleep_forever()

    answers: list[BaseException | str] = []

    async def waiter() -> None:
        try:
            if wait == "trigger_and_wait":
                result = await iii.trigger_and_wait_async("forever", None)
            else:
                receipt = await iii.trigger_async(
                    "forever", None, action=TriggerAction.Enqueue(queue="default")
                )
                result = await iii.runs.wait_async(receipt)
            answers.append(result.status)
        except Exception as exc:
            answers.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, iii.running():
            tg.start_soon(waiter)
            await began.wait()
    [error] = answers
    assert isinstance(error, InvocationError) and error.code == "engine_stopped"


async def test_the_app_can_run_again_after_a_shutdown() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)
    iii.register_function("id", lambda x: x)
    for n in range(2):
        async with iii.running():
            assert await iii.trigger_async("id", n) == n
    with pytest.raises(RuntimeError, match="not running"):
        await iii.trigger_async("id", 3)


async def test_running_twice_at_once_is_refused() -> None:
    iii = III(clock=VirtualClock())
    async with iii.running():
        with pytest.raises(RuntimeError, match="already running"):
            async with iii.running():
                pass


async def test_a_queue_drains_with_many_jobs_and_stats_count_them() -> None:
    iii = III(
        Config(queues={"bulk": QueueConfig(name="bulk", concurrency=3)}),
        clock=VirtualClock(),
        shutdown_grace_ms=0,
    )
    iii.register_function("noop", lambda _: None)
    async with iii.running():
        for n in range(50):
            await iii.trigger_async("noop", n, action=TriggerAction.Enqueue(queue="bulk"))
        await drain(iii)
        stats = await iii.queue_stats_async("bulk")
    assert (stats.completed, stats.ready, stats.running, stats.failed) == (50, 0, 0, 0)


def test_run_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    ready = tmp_path / "ready"
    script.write_text(
        textwrap.dedent(
            f"""
            import logging, pathlib
            from iii_embedded import III
            logging.basicConfig(level=logging.INFO)
            iii = III(shutdown_grace_ms=1000)

            async def mark(_):
                pathlib.Path({str(ready)!r}).write_text("ok")

            iii.register_function("mark", mark)
            iii.lifecycle_hooks.append(lambda app, tg: app.trigger_async("mark", None))
            iii.run()
            print("stopped cleanly")
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for _ in range(200):
            if ready.exists() or proc.poll() is not None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.05)
        assert ready.exists(), proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped cleanly" in out
    assert "received SIGTERM, shutting down" in err


async def test_an_error_raised_inside_running_comes_out_as_itself() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)
    with pytest.raises(KeyError, match="user mistake"):
        async with iii.running():
            raise KeyError("user mistake")
    assert not iii.is_running


async def test_a_store_that_cannot_open_raises_store_error_at_start(tmp_path: Path) -> None:
    from iii_embedded import StoreConfig, StoreError

    (tmp_path / "store").write_text("a file where the store directory should be")
    iii = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(tmp_path / "store")))
    )
    with pytest.raises(StoreError) as caught:
        async with iii.running():
            pass
    assert str(tmp_path / "store") in str(caught.value)


def test_a_signal_during_start_up_still_shuts_down_gracefully(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import logging, os, signal
            from iii_embedded import III
            logging.basicConfig(level=logging.INFO)
            iii = III(shutdown_grace_ms=1000)
            # The signal arrives while the engine is still starting (in a lifecycle hook).
            iii.lifecycle_hooks.append(lambda app, tg: os.kill(os.getpid(), signal.SIGTERM))
            iii.run()
            print("stopped cleanly")
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stopped cleanly" in proc.stdout
    assert "received SIGTERM, shutting down" in proc.stderr


def test_run_outside_the_main_thread_says_to_use_start() -> None:
    iii = III(shutdown_grace_ms=0)
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            iii.run()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    [error] = errors
    assert "main thread" in str(error) and "iii.start()" in str(error)
    assert not iii.is_running


def test_run_inside_async_code_says_to_use_running() -> None:
    """``iii.run()`` in an async main (or a notebook) cannot start a second event loop in
    the thread: the error says what to use there, not anyio's "Already running asyncio"."""
    iii = III(shutdown_grace_ms=0)

    async def main() -> str:
        with pytest.raises(RuntimeError) as caught:
            iii.run()
        return str(caught.value)

    message = asyncio.run(main())
    assert message == (
        "iii.run() runs its own event loop, and this thread already runs one: in async "
        "code use `async with iii.running():`, or `await iii.serve_forever()` to serve "
        "until SIGINT/SIGTERM"
    )
    assert not iii.is_running


class _HeldClaims(SQLiteStore):
    """A file store whose exchanges, once ``hold`` is set, return only when ``gate`` is
    set: a claim already made in the store, still on its way to the runner."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.hold = False
        self.gate = anyio.Event()
        self.claimed = anyio.Event()

    async def exchange(self, outcomes: Any, queue: str, **kw: Any) -> Any:
        jobs = await super().exchange(outcomes, queue, **kw)
        if self.hold and jobs:
            self.claimed.set()
            await self.gate.wait()
        return jobs


async def test_a_claim_in_flight_at_shutdown_hands_its_jobs_back_unspent(tmp_path: Path) -> None:
    store = _HeldClaims(tmp_path / "store")
    iii = III(Config(queues={"work": QueueConfig(name="work")}), store=store, shutdown_grace_ms=0)
    iii.register_function("job", lambda _: None)

    async def open_gate_once_stopping() -> None:
        rt = iii.runtime
        with anyio.fail_after(10):
            while not rt.stopping:
                await anyio.sleep(0)
        store.gate.set()

    async with anyio.create_task_group() as tg, iii.running():
        store.hold = True
        receipt = await iii.trigger_async("job", 1, action=TriggerAction.Enqueue(queue="work"))
        with anyio.fail_after(10):
            await store.claimed.wait()  # claimed in the store, not yet given to a worker
        tg.start_soon(open_gate_once_stopping)
        # running() has ended: its shutdown waited for the claim, and handed the job back.

    reopened = SQLiteStore(tmp_path / "store")
    await reopened.open()
    try:
        job = await reopened.get(receipt["messageReceiptId"])
    finally:
        await reopened.aclose()
    assert job is not None
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)


class _PruneAcrossTheStop(MemoryStore):
    """A store whose first prune, once armed, is still running when the shutdown closes
    the store, and then fails as a closed store's calls do."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.pruning = anyio.Event()
        self.closing = anyio.Event()
        self.failed = anyio.Event()

    async def prune(self, finished_before: float) -> int:
        if not self.armed:
            return await super().prune(finished_before)
        self.armed = False
        self.pruning.set()
        await self.closing.wait()
        self.failed.set()
        raise StoreError("the store is not open")

    async def aclose(self) -> None:
        self.closing.set()
        with anyio.fail_after(10):
            await self.failed.wait()  # the pass has failed, while the engine stops
        await anyio.wait_all_tasks_blocked()  # and has handled its error
        await super().aclose()


async def test_a_maintenance_pass_cut_short_by_shutdown_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="iii_embedded")
    clock = VirtualClock()
    store = _PruneAcrossTheStop()
    iii = III(clock=clock, store=store, shutdown_grace_ms=0)
    async with iii.running():
        store.armed = True
        await anyio.wait_all_tasks_blocked()  # the maintenance task sleeps to its pass
        clock.advance(iii.runtime.lease_s)  # the next maintenance pass is due
        with anyio.fail_after(10):
            await store.pruning.wait()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "store maintenance stopped with the store" in caplog.text


class _SlowPrune(MemoryStore):
    """A store whose prunes take until released (a backlog of a million expired runs),
    and that counts lease renewals."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.prunes = 0
        self.renewals = 0

    async def prune(self, finished_before: float) -> int:
        self.prunes += 1
        await self.release.wait()
        return await super().prune(finished_before)

    async def renew(self, owner: str, job_ids: Any, lease_until: float) -> Any:
        self.renewals += 1
        return await super().renew(owner, job_ids, lease_until)


async def test_a_long_prune_does_not_hold_back_lease_renewals() -> None:
    clock = VirtualClock()
    store = _SlowPrune()
    iii = III(clock=clock, store=store, shutdown_grace_ms=0)
    began = anyio.Event()
    finish = anyio.Event()

    @iii.function("long")
    async def long(_: Any) -> None:
        began.set()
        await finish.wait()

    async with iii.running():
        await iii.trigger_async("long", {}, action=TriggerAction.Enqueue(queue="default"))
        await began.wait()
        for _ in range(3):  # three maintenance passes; the first one's prune still runs
            await anyio.wait_all_tasks_blocked()
            clock.advance(iii.runtime.lease_s / 3)
        await anyio.wait_all_tasks_blocked()
        assert (store.renewals, store.prunes) == (3, 1)
        store.release.set()
        finish.set()
        await drain(iii)


async def test_drain_gives_up_with_drain_timeout_naming_the_busy_queue() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=0)
    began = anyio.Event()

    async def stuck(_: Any) -> None:
        began.set()
        await anyio.sleep_forever()

    iii.register_function("stuck", stuck)
    async with iii.running():
        await iii.trigger_async("stuck", {}, action=TriggerAction.Enqueue(queue="default"))
        await began.wait()
        with pytest.raises(DrainTimeout) as caught:
            await drain(iii, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)  # what code catching that expects
    assert str(caught.value) == (
        "still busy after 0.2 s of wall time: 1 job(s) claimed and not settled in 'default'"
    )


async def test_shutdown_waits_for_void_calls_within_the_grace_period() -> None:
    iii = III(clock=VirtualClock(), shutdown_grace_ms=5_000)
    finished: list[str] = []

    @iii.function("track")
    async def track(event: str) -> None:
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        finished.append(event)

    async with iii.running():
        for event in ("a", "b", "c"):
            await iii.trigger_async("track", event, action=TriggerAction.Void())
    assert finished == ["a", "b", "c"]  # before 2026-12-03 they were cancelled at once


def test_shutdown_waits_for_sync_calls_from_other_threads_within_the_grace_period() -> None:
    """A call made before the stop is running work, as a Void is: a blocking call of an
    async handler got ``engine_stopped`` at once, however long the grace period, while
    one of a sync handler (which runs without the loop) was let finish."""
    iii = III(shutdown_grace_ms=30_000)
    started, finish = threading.Event(), anyio.Event()
    results: list[Any] = []

    @iii.function("work")
    async def work(n: int) -> int:
        started.set()
        await finish.wait()
        return n

    iii.start()
    rt = iii.runtime
    assert rt.loop is not None

    def call() -> None:
        try:
            results.append(iii.trigger("work", 7))
        except InvocationError as exc:
            results.append(exc.code)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(10)
    stopper = threading.Thread(target=iii.shutdown)
    stopper.start()
    while not rt.stopping:  # the grace period has begun
        threading.Event().wait(0.01)
    assert caller.is_alive()  # still waiting for its handler
    rt.loop.call_soon_threadsafe(finish.set)
    caller.join(10)
    stopper.join(10)
    assert results == [7]


@pytest.mark.parametrize("clock", [None, VirtualClock()], ids=["loop-less", "through-the-loop"])
def test_a_synchronous_call_that_shuts_the_engine_down_is_not_waited_for(
    clock: VirtualClock | None,
) -> None:
    """As a Void call's: the grace period waits for calls in flight, but not for the one
    that is stopping the engine, which waits for the stop (ten minutes here). Under a
    virtual clock the call goes through the loop and is counted (its caller then gets
    ``engine_stopped``: the loop that would hand it the result has ended); under the
    system clock it skips the loop, is not counted, and returns."""
    iii = III(clock=clock, shutdown_grace_ms=600_000)

    @iii.function("admin::stop")
    def stop(_: object) -> str:
        iii.shutdown()
        return "stopped"

    iii.start()
    try:
        answer = iii.trigger("admin::stop", None)
    except InvocationError as exc:
        answer = exc.code
    assert answer == ("stopped" if clock is None else "engine_stopped")
    assert not iii.is_running


def test_shutdown_from_the_engines_own_loop_is_refused_and_leaves_it_stoppable() -> None:
    iii = III(shutdown_grace_ms=0)
    refused: list[str] = []

    @iii.function("stop")
    async def stop(_: object) -> None:
        try:
            iii.shutdown()
        except RuntimeError as exc:
            refused.append(str(exc))

    iii.start()
    try:
        iii.trigger("stop", None)
        assert iii.is_running and iii.trigger("stop", None) is None
    finally:
        iii.shutdown()
    assert not iii.is_running
    assert len(refused) == 2 and "this is the engine's event-loop thread" in refused[0]


def test_a_second_shutdown_while_one_is_under_way_waits_for_it_and_callbacks_run_once() -> None:
    iii = III(shutdown_grace_ms=10_000)
    started, finish = threading.Event(), threading.Event()
    order: list[str] = []

    @iii.function("slow")
    def slow(_: object) -> None:
        started.set()
        finish.wait(10)
        order.append("job done")

    iii.on_shutdown(lambda: order.append("callback"))
    iii.start()
    iii.trigger("slow", None, action=TriggerAction.Enqueue())
    assert started.wait(10)
    first = threading.Thread(target=iii.shutdown)
    first.start()
    while iii._stopping is None:  # the first shutdown has begun (waiting for the job)
        threading.Event().wait(0.01)
    second = threading.Thread(target=lambda: (iii.shutdown(), order.append("second returned")))
    second.start()
    finish.set()
    first.join(10)
    second.join(10)
    assert order == ["job done", "callback", "second returned"]


def test_a_void_call_that_shuts_the_engine_down_is_not_waited_for() -> None:
    iii = III(shutdown_grace_ms=600_000)  # waiting for itself would take ten minutes
    stopped = threading.Event()

    @iii.function("admin::stop")
    def stop(_: object) -> None:
        iii.shutdown()
        stopped.set()

    iii.start()
    iii.trigger("admin::stop", None, action=TriggerAction.Void())
    assert stopped.wait(30)
    assert not iii.is_running


def test_a_store_error_during_the_grace_period_is_not_called_engine_stopped() -> None:
    from concurrent.futures import Future

    from iii_embedded._app import _blocking_result
    from iii_embedded._errors import StoreClosedError

    class Stopping:
        stopping = True

    failed: Future[None] = Future()
    failed.set_exception(StoreError("store.db: writing failed: database is locked"))
    with pytest.raises(StoreError, match="database is locked"):
        _blocking_result(Stopping(), failed)  # type: ignore[arg-type]
    closed: Future[None] = Future()
    closed.set_exception(StoreClosedError("store.db: the store is not open"))
    with pytest.raises(Exception, match="engine_stopped"):
        _blocking_result(Stopping(), closed)  # type: ignore[arg-type]


def _child_report(iii: III) -> str:
    """In a forked child of a process whose engine runs: what the child sees of it."""
    lines = [f"running: {iii.is_running}"]
    for name, call in [
        ("call", lambda: iii.trigger("whose", None, timeout_ms=2_000)),
        ("enqueue", lambda: iii.trigger("whose", None, action=TriggerAction.Enqueue())),
        ("shutdown", iii.shutdown),
    ]:
        try:
            call()
            lines.append(f"{name}: no error")
        except RuntimeError as exc:
            lines.append(f"{name}: {exc}")
    own = III(shutdown_grace_ms=0)  # a store of its own (see docs/design.md, "Forking")
    own.register_function("whose", lambda _: os.getpid())
    with own:
        lines.append(f"own engine: {own.trigger('whose', None) == os.getpid()}")
    return "\n".join(lines)


def _wait_for_child(pid: int, deadline_s: float) -> int:
    """The forked child's wait status; a child still running at the deadline (hung) is
    killed, and its status says so."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        threading.Event().wait(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_inherit_the_running_engine(tmp_path: Path) -> None:
    """The engine's threads do not survive a fork, but the child's app still said it
    was running: a call of an async handler, or an enqueue into the in-memory store,
    waited for ever on a loop no thread runs (its timeout_ms ignored), and an enqueue
    into a file store committed on the parent's SQLite connection, which SQLite forbids.
    ``shutdown()`` waited for ever too. The child now sees the engine as not running, with
    an error that says why, and may start one of its own."""
    config = Config(store=StoreConfig(store_method="file_based", file_path=str(tmp_path)))
    iii = III(config, shutdown_grace_ms=0)

    @iii.function("whose")
    async def whose(_: Any) -> int:
        return os.getpid()

    with iii:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, and never return into pytest
            status = 1
            try:
                os.close(read_end)
                os.write(write_end, _child_report(iii).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        status = _wait_for_child(pid, deadline_s=30)
        with os.fdopen(read_end) as pipe:
            report = pipe.read()
        assert iii.trigger("whose", None) == os.getpid()  # the parent's engine goes on
    assert os.waitstatus_to_exitcode(status) == 0, report
    # What to do, for a server that forks its workers after importing an app that
    # started its engine (gunicorn --preload): start it after the fork instead.
    forked = (
        "the iii-embedded engine runs in the process this one was forked from, not here: "
        "start it after the fork, in this process (iii.start(), or `async with "
        "iii.running():`), rather than before it in the parent (gunicorn --preload: in a "
        "post_fork hook, not at import); see docs/design.md, 'Forking'"
    )
    assert report.splitlines() == [
        "running: False",
        f"call: {forked}",
        f"enqueue: {forked}",
        "shutdown: no error",
        "own engine: True",
    ]


async def _stored_job(directory: Path, job_id: str) -> Any:
    """The job ``job_id`` as the file store in ``directory`` has it, after its app ended."""
    reopened = SQLiteStore(directory)
    await reopened.open()
    try:
        return await reopened.get(job_id)
    finally:
        await reopened.aclose()


_ENDS_WITHOUT_SHUTDOWN = """
import logging, os, sys, threading, time
import anyio
from iii_embedded import III, Config, StoreConfig, TriggerAction
logging.basicConfig(level=logging.INFO, format="%(message)s")
config = Config(store=StoreConfig(store_method="file_based", file_path=sys.argv[1]))
iii = III(config, shutdown_grace_ms=30_000)

def say(line):  # one write per line: print() from two threads can interleave them
    sys.stdout.flush()
    os.write(1, (line + "\\n").encode())
started = {"void-sync": threading.Event(), "void-async": threading.Event(),
           "job": threading.Event()}

def stopping():  # the handlers stay in flight until the engine begins to stop
    return runtime.stopping

@iii.function("void-sync")
def void_sync(_):
    started["void-sync"].set()
    while not stopping():
        time.sleep(0.005)
    say("void-sync finished")

async def wait_for_stop(name):
    started[name].set()
    while not stopping():
        await anyio.sleep(0.005)
    say(f"{name} finished")

@iii.function("void-async")
async def void_async(_):
    await wait_for_stop("void-async")

@iii.function("job")
async def job(_):
    await wait_for_stop("job")
iii.start()
runtime = iii.runtime
iii.trigger("void-sync", None, action=TriggerAction.Void())
iii.trigger("void-async", None, action=TriggerAction.Void())
receipt = iii.trigger("job", None, action=TriggerAction.Enqueue(queue="default"))
print(receipt["messageReceiptId"], flush=True)
for event in started.values():
    assert event.wait(30)
if sys.argv[2] == "shutdown":
    iii.shutdown()
print("script ends", flush=True)
"""


@pytest.mark.parametrize("ending", ["exit", "shutdown"])
async def test_a_program_that_ends_without_shutdown_stops_the_engine_gracefully(
    tmp_path: Path, ending: str
) -> None:
    """``start()`` runs the engine on a daemon thread, and a script that ended without
    ``shutdown()`` killed it mid-flight: its Void calls never finished and its running
    job stayed claimed until its lease ran out, to run again (with anyio 4.4, whose
    portal thread is not a daemon, the script hung at exit instead). At exit the engine now
    shuts down gracefully, as ``shutdown()`` would; after an explicit ``shutdown()``
    the exit hook does nothing."""
    script = tmp_path / "app.py"
    script.write_text(_ENDS_WITHOUT_SHUTDOWN)
    store = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, str(script), str(store), ending],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    receipt = lines[0]
    # At exit the handlers finish after the script's last line; with shutdown(), before.
    assert lines.index("script ends") == (1 if ending == "exit" else 4)
    assert sorted(line for line in lines if line.endswith("finished")) == [
        "job finished",
        "void-async finished",
        "void-sync finished",
    ]
    at_exit = "the program is ending while the engine still runs: shutting it down gracefully"
    assert (at_exit in proc.stderr) == (ending == "exit")

    job = await _stored_job(store, receipt)
    assert job is not None
    assert (job.state, job.attempts, job.lease_owner) == ("completed", 1, None)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_that_exits_leaves_the_parents_engine_alone(tmp_path: Path) -> None:
    """A forked child inherits the parent's exit hooks, the engine's among them: ending
    normally, it must neither wait for nor stop the engine, which runs in the parent."""
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from iii_embedded import III
            iii = III(shutdown_grace_ms=0)
            iii.register_function("whose", lambda _: os.getpid())
            iii.start()
            pid = os.fork()
            if pid == 0:
                sys.exit(7)  # a normal exit: the exit hooks run
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status))
            print("parent's engine", iii.trigger("whose", None) == os.getpid())
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["child 7", "parent's engine True"]
    assert "Traceback" not in proc.stderr


async def test_a_shutdown_held_up_by_a_handler_that_ignores_cancellation_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An async handler that catches ``CancelledError`` and goes on cannot be killed: the
    shutdown waits for it. It waited without a word; it now names the handler and its job
    once the handlers it cancelled have had a few seconds (here 0.1) to stop."""
    from iii_embedded import _runtime

    monkeypatch.setattr(_runtime, "STOP_WAIT_S", 0.1, raising=False)
    warned = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("shutdown: still waiting for"):
                self.message = record.getMessage()
                warned.set()

    watch = Watch()
    logging.getLogger("iii_embedded").addHandler(watch)
    iii = III(shutdown_grace_ms=0)
    started = anyio.Event()
    ended: list[str] = []

    @iii.function("stubborn")
    async def stubborn(_: Any) -> None:
        started.set()
        for _ in range(10_000):  # bounded (seconds): a failing test ends
            if warned.is_set():
                ended.append("after the warning")
                return
            with contextlib.suppress(asyncio.CancelledError):  # the mistake
                await anyio.sleep(0.001)
        ended.append("never warned")

    try:
        async with iii.running():
            receipt = await iii.trigger_async(
                "stubborn", None, action=TriggerAction.Enqueue(queue="default")
            )
            await started.wait()
    finally:
        logging.getLogger("iii_embedded").removeHandler(watch)
    assert ended == ["after the warning"]
    assert watch.message == (
        f"shutdown: still waiting for 'stubborn' (job {receipt['messageReceiptId']}), "
        "cancelled 0.1 s ago and not stopped; an async handler must let CancelledError "
        "propagate"
    )


def test_with_start_runs_the_engine_for_the_block() -> None:
    """``start()`` returns the app, so ``with iii.start():`` entered an app already
    started and raised "already started"; the block now gets the engine that call
    started, and shuts it down at its end. Starting twice is still an error."""
    iii = III(shutdown_grace_ms=0)
    iii.register_function("double", lambda n: 2 * n)
    with iii.start(serve=False) as app:
        assert app is iii and iii.is_running
        assert iii.trigger("double", 21) == 42
        with pytest.raises(RuntimeError, match="already started"), iii:
            pass
        assert iii.is_running
    assert not iii.is_running
    with iii:  # and the plain form starts it again
        assert iii.trigger("double", 2) == 4
    assert not iii.is_running


_KILLED_BY_SIGTERM = """
import logging, os, pathlib, sys, threading
import anyio
from iii_embedded import III, Config, StoreConfig, TriggerAction
logging.basicConfig(level=logging.INFO, format="%(message)s")
store, started, release, grace_ms = sys.argv[1:5]
config = Config(store=StoreConfig(store_method="file_based", file_path=store))
iii = III(config, shutdown_grace_ms=int(grace_ms))

@iii.function("job")
async def job(_):
    pathlib.Path(started).write_text("yes")
    while not os.path.exists(release):
        await anyio.sleep(0.005)
    print("job finished", flush=True)

iii.start()
receipt = iii.trigger("job", None, action=TriggerAction.Enqueue(queue="default"))
print(receipt["messageReceiptId"], flush=True)
threading.Event().wait()  # a server's main loop, which leaves SIGTERM's default action
"""


@pytest.mark.parametrize("outcome", ["finishes", "released"])
async def test_sigterm_to_a_program_that_started_the_engine_stops_it_gracefully(
    tmp_path: Path, outcome: str
) -> None:
    """A server that leaves SIGTERM's default action (``flask run``, Django's
    ``runserver``, a script) was killed on the spot with the engine ``start()`` started:
    no exit hook runs then, so a running job stayed leased to a dead process, to run
    again with an attempt spent once its lease ran out. The engine now stops gracefully
    first (a job finishing within the grace period finishes; one still running after it
    goes back unspent), and the process then ends by SIGTERM as it would have."""
    script = tmp_path / "app.py"
    script.write_text(_KILLED_BY_SIGTERM)
    store, started, release = tmp_path / "store", tmp_path / "started", tmp_path / "release"
    grace_ms = "30000" if outcome == "finishes" else "100"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store), str(started), str(release), grace_ms],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.01)
        assert started.exists()
        os.kill(proc.pid, signal.SIGTERM)
        if outcome == "finishes":
            release.write_text("go")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err
    receipt = out.splitlines()[0]
    job = await _stored_job(store, receipt)
    assert job is not None
    if outcome == "finishes":
        assert "job finished" in out
        assert (job.state, job.attempts, job.lease_owner) == ("completed", 1, None)
    else:
        assert "job finished" not in out
        assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None)
