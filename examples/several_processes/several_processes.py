"""Several processes sharing one file store: the app runs in three processes at once.

A web server with several worker processes, or a few copies of a worker script, run the
same app on one file store. Each process serves the queues; a job is claimed with a lease,
so exactly one process runs each one, and any process can enqueue, wait for a run, or
read a result, whichever process ran it.

Run directly, it starts two worker processes (the `multiprocessing` "spawn" method: each
imports this module and runs `worker`), enqueues a batch of 24 thumbnail jobs from the
main process, whose engine serves the queue too, waits for every run and prints which
process ran how many. Then it stops the workers gracefully. The store is in `$STORE_DIR`
if set (see `iii-config.yaml`), else in a scratch directory removed at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from iii_embedded import III

CONFIG = Path(__file__).with_name("iii-config.yaml")


def make_app() -> III:
    """The app, as every process builds it: the same config, the same functions."""
    iii = III.from_config(CONFIG)

    @iii.function("images::thumbnail")
    def thumbnail(image: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.1)  # stands in for the resizing
        return {"image": image["name"], "pid": os.getpid()}

    return iii


def worker(ready: Event, stop: Event) -> None:
    """One worker process: serve the app until the main process says stop."""
    with make_app():  # start() ... shutdown(): a graceful stop, running jobs finish
        ready.set()
        stop.wait()


def main() -> Counter[int]:
    """Start two workers beside this process, run a batch across the three, and return
    how many runs each process did (by pid). The store is in ``$STORE_DIR``, else in a
    scratch directory removed at the end."""
    if os.environ.get("STORE_DIR"):
        return run_batch()
    with tempfile.TemporaryDirectory(prefix="iii-several-") as scratch:
        os.environ["STORE_DIR"] = scratch
        try:
            return run_batch()
        finally:
            del os.environ["STORE_DIR"]


def run_batch() -> Counter[int]:
    """:func:`main` on the store in ``$STORE_DIR``."""
    spawn = multiprocessing.get_context("spawn")  # children inherit $STORE_DIR
    stop = spawn.Event()
    workers = []
    for _ in range(2):
        ready = spawn.Event()
        process = spawn.Process(target=worker, args=(ready, stop))
        process.start()
        workers.append((process, ready))
    try:
        for process, ready in workers:
            if not ready.wait(60):
                raise RuntimeError(f"worker {process.pid} did not start")
        with make_app() as iii:
            images = [{"name": f"photo-{n:02}.jpg"} for n in range(24)]
            batch = iii.batch_trigger_and_wait("images::thumbnail", images, queue="thumbnails")
    finally:
        stop.set()
        for process, _ in workers:
            process.join(60)
    failed = [run for run in batch.runs if not run.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed: {failed[0].error}")
    by_process = Counter(output["pid"] for output in batch.outputs)
    print(f"{len(batch.runs)} thumbnails made by {len(by_process)} processes")
    for pid, count in sorted(by_process.items()):
        who = "main" if pid == os.getpid() else "worker"
        print(f"  {who} process {pid}: {count} runs")
    return by_process


if __name__ == "__main__":
    main()
    sys.exit(0)
