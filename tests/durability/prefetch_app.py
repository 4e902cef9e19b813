"""The app the prefetch kill -9 test runs in a child process (not collected by pytest).

argv: STORE_DIR SIDE_FILE MODE [sync]. One queue with ``concurrency: 1``, ``prefetch: 4`` and
``max_retries: 1``. In ``crash`` mode it enqueues j0..j4 (``ack K`` once each is durable);
j0 returns at once and j1 blocks, so j1 runs from the prefetch buffer while j2..j4 wait
there, never started, until the parent kills the process. In ``final`` mode every handler
returns at once and the app exits once the queue is drained. Each handler start appends
``start K PID ATTEMPT`` to SIDE_FILE (one ``write`` on an O_APPEND descriptor). With
``sync`` the handler is a sync function: the prefetched jobs then wait in the queue's line
for the thread of the running one (``QueueRunner._chain``).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import anyio

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction, current_invocation
from iii_embedded.testing import drain

store_dir, side_file, mode = sys.argv[1:4]
sync_handler = sys.argv[4:5] == ["sync"]
fd = os.open(side_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

config = Config(
    queues={"work": QueueConfig(name="work", concurrency=1, prefetch=4, max_retries=1)},
    store=StoreConfig(store_method="file_based", file_path=store_dir),
)
app = III(config, shutdown_grace_ms=0)


def record_start(payload: dict[str, Any]) -> bool:
    """Append this start to SIDE_FILE; whether this handler must then never return."""
    invocation = current_invocation()
    assert invocation is not None
    os.write(fd, f"start {payload['k']} {os.getpid()} {invocation.attempt}\n".encode())
    return mode == "crash" and payload["k"] == "j1"


async def job(payload: dict[str, Any]) -> None:
    if record_start(payload):
        await anyio.sleep_forever()


def sync_job(payload: dict[str, Any]) -> None:  # runs in the queue's threads
    if record_start(payload):
        threading.Event().wait()


app.register_function("job", sync_job if sync_handler else job)


async def main() -> None:
    async with app.running():
        if mode == "crash":
            for n in range(5):
                await app.trigger_async(
                    "job", {"k": f"j{n}"}, action=TriggerAction.Enqueue(queue="work")
                )
                os.write(fd, f"ack j{n}\n".encode())
            await anyio.sleep_forever()
        await drain(app)


anyio.run(main)
