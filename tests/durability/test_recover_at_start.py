"""A process that starts recovers the jobs of a process that is gone at once, without
waiting for their leases to expire (SPEC §5), and the lost attempt counts."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, QueueConfig, StoreConfig, current_invocation
from iii_embedded._stores import NewJob
from iii_embedded._stores._base import PROCESS_HOST
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore
from iii_embedded.testing import VirtualClock, drain

CHILD = """
import sys, anyio
from pathlib import Path
from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
store, marker = sys.argv[1], Path(sys.argv[2])
config = Config(queues={"work": QueueConfig(name="work")},
                store=StoreConfig(store_method="file_based", file_path=store))
iii = III(config)

@iii.function("job")
async def job(_):
    marker.write_text("started")
    await anyio.sleep_forever()

async def main():
    async with iii.running():
        await iii.trigger_async("job", 1, action=TriggerAction.Enqueue(queue="work"))
        await anyio.sleep_forever()

anyio.run(main)
"""


def app_recording_attempts(
    store_dir: Path, clock: VirtualClock
) -> tuple[III, list[int], anyio.Event]:
    """An app on the file store whose ``job`` records each attempt's number and sets the
    event once it has run."""
    config = Config(
        queues={"work": QueueConfig(name="work")},
        store=StoreConfig(store_method="file_based", file_path=str(store_dir)),
    )
    iii = III(config, clock=clock, shutdown_grace_ms=0)
    ran = anyio.Event()
    attempts: list[int] = []

    @iii.function("job")
    async def job(_: Any) -> None:
        invocation = current_invocation()
        assert invocation is not None
        attempts.append(invocation.attempt)
        ran.set()

    return iii, attempts, ran


async def leave_a_leased_job(
    store_dir: Path, job_id: str, owner: str, now: float, *, max_attempts: int, start: int | None
) -> None:
    """Store a job of queue ``work`` claimed by ``owner`` for an hour, as a process that
    stopped would leave it (``start=1``: its handler had started)."""
    store = SQLiteStore(store_dir)
    await store.open()
    try:
        await store.enqueue(
            [
                NewJob(
                    id=job_id,
                    queue="work",
                    function_id="job",
                    payload="1",
                    group=None,
                    created_at=now,
                    available_at=now,
                    max_attempts=max_attempts,
                    idempotency_key=None,
                )
            ]
        )
        [claimed] = await store.claim(
            "work", fifo=False, limit=1, now=now, owner=owner, lease_until=now + 3600, start=start
        )
    finally:
        await store.aclose()
    assert claimed.id == job_id


@pytest.mark.slow
def test_a_dead_processs_job_runs_again_at_start_before_its_lease_expires(
    tmp_path: Path,
) -> None:
    store, marker = tmp_path / "store", tmp_path / "started"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen(
        [sys.executable, str(script), str(store), str(marker)], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():  # the child's handler has started
            assert child.poll() is None, child.stderr.read() if child.stderr else b""
            assert time.monotonic() < deadline, "the child's job never started"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stderr is not None:
            child.stderr.close()
    with sqlite3.connect(store / DB_FILENAME) as conn:
        [(job_id, lease_until)] = conn.execute(
            "SELECT id, lease_until FROM jobs WHERE state = 'running'"
        ).fetchall()
    conn.close()

    # Time stands still from now on: the lease (30 s) cannot expire.
    clock = VirtualClock(start=time.time())
    iii, attempts, ran = app_recording_attempts(store, clock)

    async def main() -> Any:
        async with iii.running():
            with anyio.fail_after(10):  # real seconds, as a bound only
                await ran.wait()
                return await iii.runs.wait_async(job_id)

    run = anyio.run(main)
    assert clock.now() < lease_until
    assert attempts == [2]  # the attempt lost with the process counts
    assert (run.ok, run.status) == (True, "completed")


@pytest.mark.anyio
@pytest.mark.parametrize("namespace", ["this", "another"])
async def test_a_lease_under_this_processs_pid_but_no_runtime_of_it_is_recovered_at_start(
    tmp_path: Path, namespace: str
) -> None:
    # A container's app runs as PID 1, and so does it again after a restart: the jobs the
    # previous process left leased carry this process's pid, yet are gone with it.
    store_dir = tmp_path / "store"
    now = time.time()
    # In another PID namespace with this hostname (another container with host
    # networking, or this container before a restart) the pid may be a live process
    # this one cannot see: only the lease tells, so the job is not taken back at once.
    host = PROCESS_HOST if namespace == "this" else f"{socket.gethostname()}#1"
    previous = f"{host}:{os.getpid()}:previous"
    await leave_a_leased_job(store_dir, "left", previous, now, max_attempts=3, start=None)

    clock = VirtualClock(start=now)  # stands still: the hour-long lease cannot expire
    iii, attempts, _ = app_recording_attempts(store_dir, clock)

    async with iii.running():
        if namespace == "another":
            left = await iii.runs.get_async("left")
            assert left is not None and left.status == "running" and attempts == []
            clock.advance(3600)  # its lease runs out
        with anyio.fail_after(10):  # real seconds, as a bound only
            run = await iii.runs.wait_async("left")
    assert (run.ok, attempts) == (True, [2])


@pytest.mark.anyio
@pytest.mark.parametrize(("max_attempts", "expected"), [(1, "dead"), (3, "retried")])
async def test_an_attempt_lost_with_its_process_is_counted_logged_and_hooked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, max_attempts: int, expected: str
) -> None:
    # A process of this machine claimed the job, started it and died (kill -9: its
    # outcome never written). The process that recovers it is the one to report it.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store_dir = tmp_path / "store"
    now = time.time()
    owner = f"{PROCESS_HOST}:{gone.pid}:dead"
    await leave_a_leased_job(store_dir, "lost", owner, now, max_attempts=max_attempts, start=1)

    iii, attempts, _ = app_recording_attempts(store_dir, VirtualClock(start=now))
    events: list[tuple[str, str]] = []
    for event in ("job_failed", "job_retried", "job_dead_lettered", "job_succeeded"):
        iii.on(event, lambda job, event=event, **info: events.append((event, job.id)))
    caplog.set_level(logging.WARNING, logger="iii_embedded")
    async with iii.running():
        await drain(iii, timeout=10)
        stats = await iii.queue_stats_async("work")
    if expected == "dead":
        assert events == [("job_failed", "lost"), ("job_dead_lettered", "lost")]
        assert (stats.failed, stats.dead_lettered, stats.dead, attempts) == (1, 1, 1, [])
        assert any(
            "job lost of 'job' moved to the dead-letter queue" in r.getMessage()
            for r in caplog.records
        )
    else:
        assert events == [
            ("job_failed", "lost"),
            ("job_retried", "lost"),
            ("job_succeeded", "lost"),
        ]
        assert (stats.failed, stats.retried, attempts) == (1, 1, [2])
