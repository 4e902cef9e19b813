"""Where the time goes in the file-store end-to-end scenario (pyinstrument).

    python -m benchmarks.profile_e2e                      # file store, synchronous=full, async
    python -m benchmarks.profile_e2e --store file-normal --handler sync
    python -m benchmarks.profile_e2e --timeline           # one cycle, step by step

Runs ``iii_bench.end_to_end`` once with two statistical profilers: one on the event-loop
thread (producers, dispatcher, workers, handlers) and one inside the SQLite store's writer
thread (the store is not changed: its thread body is wrapped from here). It also counts
the writer's batches (requests and jobs per transaction), the claims, and the loop's
iterations. It prints a summary by category and writes the full call trees to
``benchmarks/results/profile-<store>-<handler>.txt``.

``--timeline`` (no profilers) also timestamps each hand-over of requests to the writer,
each transaction's start and end, and each delivery of results on the loop, and prints
the median time of each step of one cycle: the loop producing, the writer waking, the
transaction, the loop waking. Transactions the event loop commits itself
(``commit_on_loop``) are counted with the writer's and timed as cycles of their own: the
loop producing, then the transaction on the loop. Their CPU time is the loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyinstrument import Profiler
from pyinstrument.frame import Frame

from iii_embedded._stores import _sqlite
from iii_embedded._stores._sqlite import SQLiteStore

from . import iii_bench
from .scenarios import FILE_STORES

RESULTS = Path(__file__).with_name("results")
INTERVAL_S = 0.0005

# (category, test on (function, file)) — the first that matches a frame takes its self time.
CATEGORIES: list[tuple[str, Callable[[str, str], bool]]] = [
    ("SQLite statements (C, in sqlite3)", lambda f, p: f.startswith(("Connection.", "Cursor."))),
    ("waiting: event loop in epoll", lambda f, p: "poll" in f and p == "<built-in>"),
    ("waiting: writer thread for requests", lambda f, p: f in ("SimpleQueue.get",)),
    ("JSON encode/decode", lambda f, p: "/json/" in p or f in ("encode_json", "decode_json")),
    (
        "thread hand-offs (call_soon_threadsafe, queue put, wake-up fd)",
        lambda f, p: (
            f in ("SimpleQueue.put", "socket.send")
            or "call_soon_threadsafe" in f
            or "_write_to_self" in f
        ),
    ),
    ("store Python (iii_embedded/_stores)", lambda f, p: "iii_embedded/_stores" in p),
    ("runtime Python (iii_embedded)", lambda f, p: "iii_embedded/" in p),
    ("attrs-generated methods", lambda f, p: "attrs generated" in p or p.startswith("<attrs")),
    ("anyio (events, task groups, cancel scopes)", lambda f, p: "/anyio/" in p),
    ("asyncio (loop, futures, tasks)", lambda f, p: "/asyncio/" in p),
    ("the benchmark's producers and handler", lambda f, p: "/benchmarks/" in p),
]


def _categorise(
    root: Frame | None,
) -> tuple[dict[str, float], defaultdict[str, float], float]:
    by_category: dict[str, float] = defaultdict(float)
    by_function: defaultdict[str, float] = defaultdict(float)
    if root is None:
        return by_category, by_function, 0.0

    def walk(frame: Frame, parent: str) -> None:
        if frame.is_synthetic:
            return
        own = float(frame.total_self_time)
        function, path = frame.function, frame.file_path or ""
        if own > 0:
            category = next((name for name, test in CATEGORIES if test(function, path)), "other")
            by_category[category] += own
            where = path.rsplit("/", 2)[-1] if "/" in path else path
            by_function[f"{function} ({where}) ← {parent}"] += own
        for child in frame.children:
            walk(child, function)

    walk(root, "")
    return by_category, by_function, root.time


# Loop-side entry points: the inclusive time under each (outermost occurrence).
ENTRY_POINTS = {
    "produce": "producers: trigger_async → validate, build, store.enqueue, await commit",
    "_dispatch": "dispatcher: settle outcomes + claim (exchange), hand jobs to workers",
    "_worker": "workers: take a job, run the handler, record the outcome",
    "_deliver": "writer results delivered on the loop (futures resolved)",
}


def _entry_points(root: Frame | None) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)

    def walk(frame: Frame) -> None:
        if frame.function in ENTRY_POINTS:
            found[frame.function] += frame.time
            return
        for child in frame.children:
            walk(child)

    if root is not None:
        walk(root)
    return found


def _summary(title: str, root: Frame | None, wall: float) -> list[str]:
    by_category, by_function, total = _categorise(root)
    lines = [f"{title}: {total:.2f} s sampled of {wall:.2f} s wall"]
    entries = _entry_points(root)
    if entries:
        lines.append("  by entry point (inclusive):")
        for name, seconds in sorted(entries.items(), key=lambda kv: -kv[1]):
            share = 100 * seconds / max(total, 1e-9)
            lines.append(f"  {seconds:7.3f} s  {share:5.1f}%  {ENTRY_POINTS[name]}")
        lines.append("  by category (self time):")
    for name, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {seconds:7.3f} s  {100 * seconds / max(total, 1e-9):5.1f}%  {name}")
    lines.append("  top self time:")
    for name, seconds in sorted(by_function.items(), key=lambda kv: -kv[1])[:14]:
        lines.append(f"  {seconds:7.3f} s  {100 * seconds / max(total, 1e-9):5.1f}%  {name}")
    return lines


def _timeline(events: list[tuple[float, str]]) -> str:
    """Median and mean duration of each step of the cycles that went hand-over → transaction start
    → transaction end → delivery → next hand-over, in that order."""
    steps: dict[str, list[float]] = {"produce": [], "wake writer": [], "tx": [], "wake loop": []}
    kinds = [kind for _, kind in events]
    cycles = 0
    on_loop: dict[str, list[float]] = {"produce": [], "tx": []}
    for i in range(len(events) - 4):
        # The loop delivers the results ("D") before its transaction's timing ends.
        if kinds[i : i + 5] == ["H", "L+", "D", "L-", "H"]:
            t = [at for at, _ in events[i : i + 5]]
            on_loop["tx"].append(t[3] - t[1])
            on_loop["produce"].append(t[4] - t[3])
    lines = []
    if on_loop["tx"]:
        lines.append(
            f"cycles committed on the loop (median of {len(on_loop['tx']):,}): loop produces "
            f"{statistics.median(on_loop['produce']) * 1e6:.0f} µs, transaction (fsync "
            f"included) {statistics.median(on_loop['tx']) * 1e6:.0f} µs"
        )
    for i in range(len(events) - 4):
        if kinds[i : i + 5] != ["H", "W+", "W-", "D", "H"]:
            continue
        t = [at for at, _ in events[i : i + 5]]
        steps["wake writer"].append(t[1] - t[0])
        steps["tx"].append(t[2] - t[1])
        steps["wake loop"].append(t[3] - t[2])
        steps["produce"].append(t[4] - t[3])
        cycles += 1
    if not cycles:
        return "\n".join(lines) or "timeline: no complete cycle recorded"
    for label, average in (("median", statistics.median), ("mean", statistics.fmean)):
        at = {name: average(values) * 1e6 for name, values in steps.items()}
        lines.append(
            f"cycle ({label} of {cycles:,}): loop produces {at['produce']:.0f} µs, writer "
            f"wakes {at['wake writer']:.0f} µs, transaction (fsync included) {at['tx']:.0f} "
            f"µs, loop wakes {at['wake loop']:.0f} µs; sum {sum(at.values()):.0f} µs"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_e2e")
    parser.add_argument(
        "--store",
        default="file-full",
        choices=FILE_STORES,
    )
    parser.add_argument("--handler", default="async", choices=["async", "sync"])
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument(
        "--counters-only",
        action="store_true",
        help="no profilers (they slow Python down 2-3x): only the batch and loop counters",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="with the counters, the median time of each step of a writer cycle",
    )
    args = parser.parse_args(argv)
    args.counters_only = args.counters_only or args.timeline
    events: list[tuple[float, str]] = []  # (perf_counter, "H" | "W+" | "W-" | "D")

    stats: dict[str, Any] = {
        "batches": 0,
        "requests": 0,
        "sql_s": 0.0,
        "exchanges": 0,
        "claimed": 0,
        "settled": 0,
        "enqueue_calls": 0,
        "loop_turns": 0,
    }
    writer_profiles: list[Profiler] = []
    batch_sizes: Counter[int] = Counter()
    claim_sizes: Counter[int] = Counter()

    serve = SQLiteStore._serve
    run_batch = SQLiteStore._run_batch
    exchange = SQLiteStore.exchange
    enqueue = SQLiteStore.enqueue
    run_once = asyncio.BaseEventLoop._run_once  # type: ignore[attr-defined]

    def profiled_serve(self: SQLiteStore) -> None:
        if args.counters_only:
            cpu = time.thread_time()
            serve(self)
            stats["writer_cpu_s"] = stats.get("writer_cpu_s", 0.0) + time.thread_time() - cpu
            return
        profiler = Profiler(interval=INTERVAL_S, async_mode="disabled")
        profiler.start()
        try:
            serve(self)
        finally:
            profiler.stop()
            writer_profiles.append(profiler)

    def counted_batch(self: SQLiteStore, conn: Any, batch: list[Any]) -> Any:
        start = time.perf_counter()
        if args.timeline:
            events.append((start, "W+"))
        try:
            return run_batch(self, conn, batch)
        finally:
            count_batch(batch, start, "W-")

    def count_batch(batch: list[Any], start: float, kind: str) -> None:
        end = time.perf_counter()
        if args.timeline:
            events.append((end, kind))
        stats["sql_s"] += end - start
        stats["batches"] += 1
        stats["requests"] += len(batch)
        batch_sizes[len(batch)] += 1

    commit_here = SQLiteStore._commit_here

    def counted_commit_here(self: SQLiteStore, batch: list[Any]) -> bool:
        start = time.perf_counter()
        if args.timeline:
            events.append((start, "L+"))
        done = commit_here(self, batch)
        if done:
            count_batch(batch, start, "L-")
        elif args.timeline:
            events.pop()  # not committed here: the writer's transaction is counted
        return done

    async def counted_exchange(self: SQLiteStore, outcomes: Any, *a: Any, **k: Any) -> Any:
        jobs = await exchange(self, outcomes, *a, **k)
        stats["exchanges"] += 1
        stats["settled"] += len(outcomes)
        stats["claimed"] += len(jobs)
        claim_sizes[len(jobs)] += 1
        return jobs

    def counted_enqueue(self: SQLiteStore, jobs: Any) -> Any:
        # A plain function, as the store's own is: no coroutine frame of its own to count.
        stats["enqueue_calls"] += 1
        return enqueue(self, jobs)

    def counted_turn(self: Any) -> None:
        stats["loop_turns"] += 1
        run_once(self)

    hand_over = SQLiteStore._hand_over
    deliver = _sqlite._deliver

    def timed_hand_over(self: SQLiteStore) -> None:
        if self._outbox:
            events.append((time.perf_counter(), "H"))
        hand_over(self)

    def timed_deliver(results: Any) -> None:
        events.append((time.perf_counter(), "D"))
        deliver(results)

    if args.timeline:
        SQLiteStore._hand_over = timed_hand_over  # type: ignore[method-assign]
        _sqlite._deliver = timed_deliver
    SQLiteStore._serve = profiled_serve  # type: ignore[method-assign]
    SQLiteStore._run_batch = counted_batch  # type: ignore[method-assign]
    SQLiteStore._commit_here = counted_commit_here  # type: ignore[method-assign]
    SQLiteStore.exchange = counted_exchange  # type: ignore[method-assign]
    SQLiteStore.enqueue = counted_enqueue  # type: ignore[method-assign]
    asyncio.BaseEventLoop._run_once = counted_turn  # type: ignore[attr-defined]

    loop_profiler = Profiler(interval=INTERVAL_S, async_mode="disabled")
    start = time.perf_counter()
    if not args.counters_only:
        loop_profiler.start()
    loop_cpu = time.thread_time()
    result = iii_bench.end_to_end(args.store, args.n, handler=args.handler)
    loop_cpu = time.thread_time() - loop_cpu
    wall = time.perf_counter() - start
    if args.counters_only:
        n = args.n
        print(
            f"CPU per job: event-loop thread {loop_cpu / n * 1e6:.1f} µs, writer thread "
            f"{stats.get('writer_cpu_s', 0.0) / n * 1e6:.1f} µs; wall per job "
            f"{wall / n * 1e6:.1f} µs"
        )
        print(
            f"{result['rate']:,.0f} jobs/s; writer: {stats['batches']:,} transactions, "
            f"{stats['requests'] / max(1, stats['batches']):.1f} requests and "
            f"{args.n / max(1, stats['batches']):.1f} jobs each, busy {stats['sql_s']:.2f} s "
            f"of {wall:.2f} s ({100 * stats['sql_s'] / wall:.0f}%); "
            f"{stats['exchanges']:,} exchanges claiming "
            f"{stats['claimed'] / max(1, stats['exchanges']):.1f}; "
            f"{stats['loop_turns']:,} loop iterations"
        )
        if args.timeline:
            print(_timeline(events))
        return 0
    loop_profiler.stop()

    n = args.n
    lines = [
        f"iii_bench.end_to_end(store={args.store!r}, n={n}, handler={args.handler!r}, "
        f"16 producers, concurrency 10) under two profilers ({INTERVAL_S * 1000:g} ms interval):",
        f"  {result['rate']:,.0f} jobs/s while profiled",
        f"  writer: {stats['batches']:,} transactions for {stats['requests']:,} requests "
        f"({stats['requests'] / max(1, stats['batches']):.1f} per transaction, "
        f"{n / max(1, stats['batches']):.1f} jobs per transaction), "
        f"{stats['sql_s']:.2f} s inside them ({stats['sql_s'] / n * 1e6:.1f} µs per job)",
        f"  requests: {stats['enqueue_calls']:,} enqueues, {stats['exchanges']:,} exchanges "
        f"(settle + claim) claiming {stats['claimed'] / max(1, stats['exchanges']):.1f} jobs "
        f"and settling {stats['settled'] / max(1, stats['exchanges']):.1f} each",
        "  claim sizes (jobs: exchanges): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(claim_sizes.items())),
        f"  event loop: {stats['loop_turns']:,} iterations ({stats['loop_turns'] / n:.1f} per job)",
        "",
    ]
    lines += _summary(
        "event-loop thread",
        loop_profiler.last_session.root_frame() if loop_profiler.last_session else None,
        wall,
    )
    lines.append("")
    for profiler in writer_profiles:
        session = profiler.last_session
        lines += _summary("SQLite writer thread", session.root_frame() if session else None, wall)
    summary = "\n".join(lines)
    print(summary)

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"profile-{args.store}-{args.handler}.txt"
    trees = [summary, "", "=" * 100, "event-loop thread", "=" * 100]
    trees.append(loop_profiler.output_text(unicode=True, color=False, show_all=False))
    for profiler in writer_profiles:
        trees += ["=" * 100, "SQLite writer thread", "=" * 100]
        trees.append(profiler.output_text(unicode=True, color=False, show_all=False))
    path.write_text("\n".join(trees))
    print(f"\ncall trees: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
