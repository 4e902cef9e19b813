"""The app the two-process test runs in each of two children (not collected by pytest).

argv: STORE_DIR SIDE_FILE NAME. Runs the ``ledger`` FIFO queue and the ``std`` standard
queue on the shared file store, recording ``start KEY NAME T`` and ``end KEY NAME T``
(``time.time()``) around each job, until every job in the store is finished (its exit
condition reads the shared store's statistics).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from iii_embedded import III, Config, QueueConfig, StoreConfig

store_dir, side_file, name = sys.argv[1:4]
fd = os.open(side_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
config = Config(
    queues={
        "ledger": QueueConfig(
            name="ledger", type="fifo", message_group_field="g", concurrency=4, poll_interval_ms=20
        ),
        "std": QueueConfig(name="std", concurrency=4, poll_interval_ms=20),
    },
    store=StoreConfig(store_method="file_based", file_path=store_dir),
)
app = III(config, shutdown_grace_ms=1000)


@app.function("work")
async def work(job: dict[str, Any]) -> None:
    os.write(fd, f"start {job['k']} {name} {time.time():.6f}\n".encode())
    await anyio.sleep(job["sleep"])
    os.write(fd, f"end {job['k']} {name} {time.time():.6f}\n".encode())


async def main() -> None:
    # Ready once imported, and started only on "go": both processes then start claiming
    # together (a process that started first could otherwise drain the store alone while
    # the other is still importing, on a loaded machine).
    Path(side_file + f".{name}.ready").write_text("ready")
    while not Path(side_file + ".go").exists():
        await anyio.sleep(0.005)
    async with app.running():
        while True:
            stats = await app.stats_async()
            if all(s.ready + s.delayed + s.running == 0 for s in stats.values()):
                return
            await anyio.sleep(0.05)


anyio.run(main)
