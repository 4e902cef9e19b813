"""The app the kill -9 test runs in a child process (not collected by pytest).

argv: STORE_DIR SIDE_FILE PLAN_FILE MODE HANDLER PRODUCER, where MODE is ``crash`` (run until
killed) or ``final`` (exit once every planned job is enqueued and all queues are idle),
HANDLER is ``async`` or ``sync`` (the handler runs in the queue's threads), and PRODUCER
is ``loop`` (``trigger_async`` on the engine's loop, which commits on the loop when it is
idle), ``loop-writer`` (the same with ``commit_on_loop: false``: every commit on the
store's writer thread) or ``thread`` (the blocking ``trigger`` from a worker thread, which
commits in that thread when the writer is idle). Every event
is appended to SIDE_FILE with one ``write`` on an O_APPEND descriptor, which survives the
process being killed: ``ack K`` once the enqueue of job K returned (the job is durable),
``start K PID ATTEMPT`` and ``end K PID`` (or ``fail K PID``) around each handler run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from iii_embedded import (
    III,
    Config,
    NonRetryableError,
    QueueConfig,
    StoreConfig,
    TriggerAction,
    current_invocation,
)

store_dir, side_file, plan_file, mode, handler, producer = sys.argv[1:7]
plan: list[dict[str, Any]] = json.loads(Path(plan_file).read_text())
fd = os.open(side_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def record(line: str) -> None:
    os.write(fd, (line + "\n").encode())


acked = {
    line.split()[1] for line in Path(side_file).read_text().splitlines() if line.startswith("ack ")
}

# Every kill counts an attempt for each job this process had started (and, once in a row,
# for prefetched jobs whose start it could not tell: docs/design.md, "What an attempt
# costs"); with 50 kills, a job at the head of its queue could be claimed at every one.
# The test is about acknowledged jobs not being lost, so attempts are never the limit here
# (failing jobs raise NonRetryableError).
MAX_ATTEMPTS = 1000

config = Config(
    queues={
        "ledger": QueueConfig(
            name="ledger",
            type="fifo",
            message_group_field="g",
            concurrency=4,
            max_retries=MAX_ATTEMPTS,
            backoff_ms=1,
        ),
        "std": QueueConfig(name="std", concurrency=4, max_retries=MAX_ATTEMPTS, backoff_ms=1),
    },
    store=StoreConfig(
        store_method="file_based",
        file_path=store_dir,
        commit_on_loop=producer != "loop-writer",
    ),
)
app = III(config, shutdown_grace_ms=0)


def begin(job: dict[str, Any]) -> None:
    invocation = current_invocation()
    assert invocation is not None
    record(f"start {job['k']} {os.getpid()} {invocation.attempt}")


def finish(job: dict[str, Any]) -> str:
    if job["fail"]:
        record(f"fail {job['k']} {os.getpid()}")
        raise NonRetryableError(f"job {job['k']} always fails")
    record(f"end {job['k']} {os.getpid()}")
    return str(job["k"])


async def work_async(job: dict[str, Any]) -> str:
    begin(job)
    await anyio.sleep(job["sleep"])
    return finish(job)


def work_sync(job: dict[str, Any]) -> str:
    begin(job)
    time.sleep(job["sleep"])  # the handler's work: this app is killed, not a test waiting
    return finish(job)


app.register_function("work", work_async if handler == "async" else work_sync)


async def main() -> None:
    async with app.running():
        for job in plan:
            if job["k"] in acked:
                continue
            action = TriggerAction.Enqueue(queue=job["q"], idempotency_key=job["k"])
            if producer == "thread":  # the blocking trigger, which may commit in its thread
                await anyio.to_thread.run_sync(partial(app.trigger, "work", job, action=action))
            else:
                await app.trigger_async("work", job, action=action)
            record(f"ack {job['k']}")
        if mode != "final":
            await anyio.sleep_forever()
        while True:
            stats = await app.stats_async()
            if all(s.ready + s.delayed + s.running == 0 for s in stats.values()):
                return
            await anyio.sleep(0.02)


anyio.run(main)
