"""iii-embedded scenarios, through the public API: enqueue, end to end, sync call, idle
latency, and throughput with a deep backlog.

Stores: ``memory`` (in-memory), ``file-normal`` and ``file-full`` (the SQLite file store
with ``synchronous: normal`` or ``full``), and ``file-normal-pinned`` and
``file-full-pinned`` (the same with ``pin_cpu: auto``), and ``file-normal-writer`` and
``file-full-writer`` (the same with ``commit_on_loop: false``: every transaction on the
writer thread). Queues are standard with
concurrency 10 unless said otherwise; handlers are no-ops that only count.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

import anyio

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction

from ._util import in_threads, latency_summary, scratch, shares

StoreKind = Literal[
    "memory",
    "file-normal",
    "file-full",
    "file-normal-pinned",
    "file-full-pinned",
    "file-normal-writer",
    "file-full-writer",
]
QUEUE = "q"
ENQUEUE = TriggerAction.Enqueue(queue=QUEUE)


def _store_config(store: StoreKind, directory: Path | None = None) -> StoreConfig:
    if store == "memory":
        return StoreConfig()
    return StoreConfig(
        store_method="file_based",
        file_path=str(directory or scratch("iii")),
        synchronous="full" if store.startswith("file-full") else "normal",
        pin_cpu="auto" if store.endswith("-pinned") else None,
        commit_on_loop=not store.endswith("-writer"),
    )


def _app(
    store: StoreKind,
    *,
    fifo: bool = False,
    concurrency: int = 10,
    directory: Path | None = None,
) -> III:
    queue = (
        QueueConfig(name=QUEUE, type="fifo", message_group_field="g", concurrency=concurrency)
        if fifo
        else QueueConfig(name=QUEUE, concurrency=concurrency)
    )
    config = Config(queues={QUEUE: queue}, store=_store_config(store, directory))
    return III(config, shutdown_grace_ms=0)


def _stop_consuming(app: III) -> None:
    """Measure producing alone: the queue's workers take no jobs (graceful shutdown's first
    step, which the runtime exposes on its queue runners)."""
    app.runtime.runners[QUEUE].stop_claiming()


# --- enqueue ---------------------------------------------------------------------------


def enqueue(store: StoreKind, n: int, producers: int) -> dict[str, Any]:
    """``n`` tiny jobs enqueued by ``producers`` concurrent tasks, each awaiting its
    enqueue (for the file store: until the job is committed) before the next. With one
    producer, also the tail of the time one enqueue takes (p99, p99.9, max): a commit
    that also checkpoints the WAL shows there."""
    app = _app(store)
    app.register_function("noop", lambda _: None)
    result: dict[str, Any] = {}
    took: list[float] = []

    async def produce(first: int, count: int) -> None:
        trigger = app.trigger_async
        if producers == 1:
            clock = time.perf_counter
            for i in range(first, first + count):
                t = clock()
                await trigger("noop", {"n": i}, action=ENQUEUE)
                took.append(clock() - t)
            return
        for i in range(first, first + count):
            await trigger("noop", {"n": i}, action=ENQUEUE)

    async def main() -> None:
        async with app.running():
            _stop_consuming(app)
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                first = 0
                for count in shares(n, producers):
                    tg.start_soon(produce, first, count)
                    first += count
            result["rate"] = n / (time.perf_counter() - start)

    anyio.run(main)
    if took:
        took.sort()
        result["p99_ms"] = took[int(len(took) * 0.99)] * 1000
        result["p999_ms"] = took[int(len(took) * 0.999)] * 1000
        result["max_ms"] = took[-1] * 1000
    return result


def enqueue_threads(store: StoreKind, n: int, producers: int) -> dict[str, Any]:
    """``n`` tiny jobs enqueued with the blocking ``trigger`` by ``producers`` threads while
    the engine runs on a background thread (``start()``): how a synchronous program, or
    one written against iii's SDK (``register_worker``), enqueues. Huey's producers are
    threads too."""
    app = _app(store)
    app.register_function("noop", lambda _: None)

    def produce(first: int, count: int) -> None:
        trigger = app.trigger
        for i in range(first, first + count):
            trigger("noop", {"n": i}, action=ENQUEUE)

    with app:
        portal = app.runtime.portal
        assert portal is not None
        portal.call(_stop_consuming, app)
        wall = in_threads(produce, n, producers)
    return {"rate": n / wall}


def enqueue_batch(store: StoreKind, n: int, per_call: int = 100) -> dict[str, Any]:
    """``n`` tiny jobs enqueued ``per_call`` at a time with ``batch_trigger_async`` (one
    transaction per call) by one producer: what an app that can batch its enqueues gets,
    against the raw batched-insert limit."""
    app = _app(store)
    app.register_function("noop", lambda _: None)
    result: dict[str, Any] = {}
    batches = [
        [{"n": i} for i in range(first, min(first + per_call, n))]
        for first in range(0, n, per_call)
    ]

    async def main() -> None:
        async with app.running():
            _stop_consuming(app)
            start = time.perf_counter()
            for payloads in batches:
                await app.batch_trigger_async("noop", payloads, queue=QUEUE)
            result["rate"] = n / (time.perf_counter() - start)

    anyio.run(main)
    return result


# --- end to end ------------------------------------------------------------------------


def end_to_end(
    store: StoreKind,
    n: int,
    handler: Literal["async", "sync"] = "async",
    producers: int = 16,
    fifo_groups: int = 0,
    concurrency: int = 10,
) -> dict[str, Any]:
    """``producers`` tasks enqueue ``n`` no-op jobs while the queue runs them; the time is
    from the first enqueue until the handler of the last job ran."""
    app = _app(store, fifo=fifo_groups > 0, concurrency=concurrency)
    result: dict[str, Any] = {}
    done = asyncio.Event()
    count = 0
    lock = threading.Lock()
    loop: asyncio.AbstractEventLoop | None = None

    async def async_noop(_: Any) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    def sync_noop(_: Any) -> None:  # runs in the queue's worker threads
        nonlocal count
        with lock:
            count += 1
            last = count == n
        if last:
            assert loop is not None
            loop.call_soon_threadsafe(done.set)

    app.register_function("noop", async_noop if handler == "async" else sync_noop)

    async def produce(first: int, count: int) -> None:
        trigger = app.trigger_async
        for i in range(first, first + count):
            payload = {"g": i % fifo_groups, "n": i} if fifo_groups else {"n": i}
            await trigger("noop", payload, action=ENQUEUE)

    async def main() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        async with app.running():
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                first = 0
                for share in shares(n, producers):
                    tg.start_soon(produce, first, share)
                    first += share
            await done.wait()
            result["rate"] = n / (time.perf_counter() - start)

    anyio.run(main)
    return result


# --- sync call -------------------------------------------------------------------------


def sync_call(m: int, rounds: int = 5) -> dict[str, Any]:
    """``await iii.trigger_async("noop", x)`` (a synchronous call of a no-op async function)
    against a bare ``await noop(x)``; alternating rounds so drift hits both alike."""
    app = III(shutdown_grace_ms=0)

    async def noop(x: Any) -> Any:
        return x

    app.register_function("noop", noop)
    bare = call = 0.0
    per_round = max(1, m // rounds)

    async def main() -> None:
        nonlocal bare, call
        async with app.running():
            trigger = app.trigger_async
            for i in range(1000):  # warm up
                await trigger("noop", i)
            for _ in range(rounds):
                start = time.perf_counter()
                for i in range(per_round):
                    await noop(i)
                bare += time.perf_counter() - start
                start = time.perf_counter()
                for i in range(per_round):
                    await trigger("noop", i)
                call += time.perf_counter() - start

    anyio.run(main)
    calls = per_round * rounds
    return {
        "us": call / calls * 1e6,
        "bare_us": bare / calls * 1e6,
        "overhead_us": (call - bare) / calls * 1e6,
    }


# --- idle latency ----------------------------------------------------------------------


def latency(store: StoreKind, samples: int, gap_s: float = 0.002) -> dict[str, Any]:
    """Enqueue → handler start on an idle runtime, one job at a time, ``gap_s`` apart."""
    app = _app(store)
    started = 0.0
    ran = asyncio.Event()

    async def mark(_: Any) -> None:
        nonlocal started
        started = time.perf_counter()
        ran.set()

    app.register_function("mark", mark)
    gaps: list[float] = []

    async def main() -> None:
        async with app.running():
            for i in range(samples + 10):
                await anyio.sleep(gap_s)
                ran.clear()
                sent = time.perf_counter()
                await app.trigger_async("mark", {"n": i}, action=ENQUEUE)
                await ran.wait()
                if i >= 10:  # the first few warm the store and the workers up
                    gaps.append(started - sent)

    anyio.run(main)
    return latency_summary(gaps)


# --- depth -----------------------------------------------------------------------------


def _fresh_store(directory: Path) -> None:
    """Let the runtime create its schema in ``directory``."""
    app = _app("file-normal", directory=directory)

    async def main() -> None:
        async with app.running():
            pass

    anyio.run(main)


def _random_ids(count: int, seed: int) -> list[str]:
    bits = random.Random(seed).getrandbits
    out = []
    for _ in range(count):
        h = f"{bits(128):032x}"
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{(int(h[16], 16) & 3 | 8):x}{h[17:20]}-{h[20:]}")
    return out


def _raw_prefill(directory: Path, pending: int) -> None:
    """Bulk-insert ``pending`` ready jobs straight into the store's ``jobs`` table: indexes
    dropped, rows inserted with ``executemany``, the store's own indexes rebuilt from their
    stored SQL — one transaction, a few seconds for a million rows. Raises
    ``sqlite3.Error`` (and changes nothing) if the table does not look as expected."""
    path = next(directory.glob("*.db"))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size = -200000")
        conn.execute("BEGIN IMMEDIATE")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' "
            "AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        now = time.time() - 1
        ids = _random_ids(pending, seed=pending)
        conn.executemany(
            "INSERT INTO jobs (id, queue, function_id, payload, state, created_at, "
            "available_at, max_attempts) VALUES (?, ?, 'noop', ?, 'queued', ?, ?, 3)",
            ((ids[i], QUEUE, json.dumps({"n": i}), now, now) for i in range(pending)),
        )
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("COMMIT")
        # A store that filled up over time was checkpointed as it went.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def _api_prefill(directory: Path, pending: int) -> None:
    """The slower public way: ``batch_trigger_async`` in batches of 20,000."""
    app = _app("file-normal", directory=directory)
    app.register_function("noop", lambda _: None)

    async def main() -> None:
        async with app.running():
            _stop_consuming(app)
            for first in range(0, pending, 20_000):
                count = min(20_000, pending - first)
                payloads = [{"n": i} for i in range(first, first + count)]
                await app.batch_trigger_async("noop", payloads, queue=QUEUE)

    anyio.run(main)


def depth_prefill(pending: int) -> dict[str, Any]:
    """Make a file store (``synchronous: normal``) with ``pending`` ready jobs; runs once,
    and every measured run then drains part of it in a fresh process."""
    directory = scratch("iii-depth", keep=True)
    start = time.perf_counter()
    _fresh_store(directory)
    try:
        _raw_prefill(directory, pending)
        method = "bulk executemany into the store's table, indexes rebuilt"
    except sqlite3.Error as exc:
        method = f"batch_trigger_async (bulk insert failed: {exc})"
        _api_prefill(directory, pending)
    return {
        "directory": str(directory),
        "prefill_s": time.perf_counter() - start,
        "prefill_method": method,
    }


def depth_drain(directory: str, drain_n: int, concurrency: int = 10) -> dict[str, Any]:
    """Start an app on a store full of pending jobs and run ``drain_n`` of them. The rate
    counts from the first handler call to the last; ``startup_ms`` is from entering
    ``running()`` to the first handler call (opening, recovery, first claim)."""
    app = _app("file-normal", concurrency=concurrency, directory=Path(directory))
    done = asyncio.Event()
    count = 0
    first = last = 0.0

    async def noop(_: Any) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == drain_n:
            last = time.perf_counter()
            done.set()

    app.register_function("noop", noop)
    result: dict[str, Any] = {}

    async def main() -> None:
        entered = time.perf_counter()
        async with app.running():
            await done.wait()
            _stop_consuming(app)
        result["rate"] = (drain_n - 1) / (last - first)
        result["startup_ms"] = (first - entered) * 1000

    anyio.run(main)
    return result
