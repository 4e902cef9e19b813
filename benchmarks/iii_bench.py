"""iii-embedded scenarios: enqueue, end to end, sync call, latency, depth."""

from __future__ import annotations

import json
import sqlite3
import statistics
import tempfile
import time
from typing import Any

import anyio

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore


def _store(kind: str) -> StoreConfig:
    if kind == "memory":
        return StoreConfig()
    return StoreConfig(
        store_method="file_based",
        file_path=tempfile.mkdtemp(prefix="bench-iii-"),
        synchronous="full" if kind == "file-full" else "normal",
    )


def _app(kind: str, *, fifo: bool = False, concurrency: int = 10) -> III:
    queue = (
        QueueConfig(name="q", type="fifo", message_group_field="g", concurrency=concurrency)
        if fifo
        else QueueConfig(name="q", concurrency=concurrency)
    )
    return III(Config(queues={"q": queue}, store=_store(kind)), shutdown_grace_ms=0)


def enqueue(store: str, n: int, producers: int) -> dict[str, Any]:
    """Durable enqueue of ``n`` tiny jobs from ``producers`` concurrent tasks."""
    app = _app(store)
    app.register_function("noop", lambda _: None)
    action = TriggerAction.Enqueue(queue="q")
    result: dict[str, Any] = {}

    async def main() -> None:
        async with app.running():
            # Stop the workers from competing: measure the enqueue path alone.
            for runner in app.runtime.runners.values():
                runner.stop_claiming()

            async def produce(count: int) -> None:
                for i in range(count):
                    await app.trigger_async("noop", i, action=action)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(producers):
                    tg.start_soon(produce, n // producers)
            result["rate"] = n / (time.perf_counter() - start)

    anyio.run(main)
    return result


def end_to_end(store: str, n: int, handler: str = "async", fifo_groups: int = 0) -> dict[str, Any]:
    """Enqueue ``n`` no-op jobs (16 producers) and wait until all ran."""
    app = _app(store, fifo=fifo_groups > 0)
    done = anyio.Event()
    count = 0

    def finish() -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async def async_noop(_: Any) -> None:
        finish()

    def sync_noop(_: Any) -> None:
        return None  # completions are counted by the job_succeeded hook, on the loop

    if handler == "async":
        app.register_function("noop", async_noop)
    else:
        app.register_function("noop", sync_noop)
        app.on("job_succeeded", lambda job, **_: finish())
    action = TriggerAction.Enqueue(queue="q")
    result: dict[str, Any] = {}

    async def main() -> None:
        async with app.running():

            async def produce(start_at: int, count: int) -> None:
                for i in range(start_at, start_at + count):
                    payload = {"g": i % fifo_groups, "i": i} if fifo_groups else i
                    await app.trigger_async("noop", payload, action=action)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                per = n // 16
                for p in range(16):
                    tg.start_soon(produce, p * per, per)
            await done.wait()
            result["rate"] = n / (time.perf_counter() - start)

    anyio.run(main)
    return result


def sync_call(m: int) -> dict[str, Any]:
    """Per-call cost of a synchronous trigger of a no-op async function, over a bare await."""
    app = III(shutdown_grace_ms=0)

    async def noop(x: Any) -> Any:
        return x

    app.register_function("noop", noop)
    result: dict[str, Any] = {}

    async def main() -> None:
        async with app.running():
            start = time.perf_counter()
            for i in range(m):
                await noop(i)
            bare = (time.perf_counter() - start) / m
            start = time.perf_counter()
            for i in range(m):
                await app.trigger_async("noop", i)
            call = (time.perf_counter() - start) / m
            result.update(us=call * 1e6, bare_us=bare * 1e6, overhead_us=(call - bare) * 1e6)

    anyio.run(main)
    return result


def latency(store: str, samples: int) -> dict[str, Any]:
    """Enqueue→handler-start on an idle runtime, one job at a time."""
    app = _app(store)
    started: list[float] = []
    event = anyio.Event()

    async def mark(_: Any) -> None:
        started.append(time.perf_counter())
        event.set()

    app.register_function("mark", mark)
    action = TriggerAction.Enqueue(queue="q")
    gaps: list[float] = []

    async def main() -> None:
        nonlocal event
        async with app.running():
            for _ in range(samples):
                await anyio.sleep(0.002)  # let the runtime go idle between samples
                event = anyio.Event()
                t0 = time.perf_counter()
                await app.trigger_async("mark", None, action=action)
                await event.wait()
                gaps.append(started[-1] - t0)

    anyio.run(main)
    gaps.sort()
    return {
        "p50_ms": statistics.median(gaps) * 1000,
        "p99_ms": gaps[int(len(gaps) * 0.99) - 1] * 1000,
    }


def depth(pending: int, drain_n: int) -> dict[str, Any]:
    """End-to-end throughput draining ``drain_n`` jobs with ``pending`` already waiting
    (file store, normal), and the peak RSS of the process."""
    directory = tempfile.mkdtemp(prefix="bench-depth-")

    async def create() -> None:
        store = SQLiteStore(directory)
        await store.open()
        await store.aclose()

    anyio.run(create)
    now = time.time()
    with sqlite3.connect(f"{directory}/{DB_FILENAME}", isolation_level=None) as conn:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        batch = 50_000
        for start in range(0, pending, batch):
            conn.executemany(
                "INSERT INTO jobs (id, queue, function_id, payload, state, created_at, "
                "available_at, max_attempts) VALUES (?, 'q', 'noop', ?, 'queued', ?, ?, 3)",
                (
                    (f"pre-{i}", json.dumps(i), now, now)
                    for i in range(start, min(pending, start + batch))
                ),
            )
        conn.execute("COMMIT")
        # A store that filled up over time has been checkpointed as it went; without this
        # the first commit of the measured drain would pay for checkpointing the prefill.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    app = III(
        Config(
            queues={"q": QueueConfig(name="q", concurrency=10)},
            store=StoreConfig(store_method="file_based", file_path=directory),
        ),
        shutdown_grace_ms=0,
    )
    done = anyio.Event()
    count = 0

    async def noop(_: Any) -> None:
        nonlocal count
        count += 1
        if count == drain_n:
            done.set()

    app.register_function("noop", noop)
    result: dict[str, Any] = {}

    async def main() -> None:
        start = time.perf_counter()
        async with app.running():
            await done.wait()
            result["rate"] = drain_n / (time.perf_counter() - start)
            for runner in app.runtime.runners.values():
                runner.stop_claiming()

    anyio.run(main)
    return result
