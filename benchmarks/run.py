"""Run every benchmark scenario and print one table (``make bench``).

    python -m benchmarks.run            # the full run (well under 10 minutes on 2 cores)
    python -m benchmarks.run --quick    # a smoke run with small N
    python -m benchmarks.run --only e2e # scenarios whose id contains "e2e"

Absolute figures drift between runs on shared machines; the ratios, measured in the same
run, are what to compare. Results also go to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

N = 20_000
SCENARIOS: list[tuple[str, str, str, dict[str, Any], int]] = [
    # (id, module, function, params, repeats) — "n" is scaled down by --quick.
    ("raw.insert_each.normal", "raw_sqlite", "insert", {"n": N, "per_commit": 1}, 3),
    (
        "raw.insert_each.full",
        "raw_sqlite",
        "insert",
        {"n": 2000, "per_commit": 1, "synchronous": "FULL"},
        3,
    ),
    ("raw.insert_100.normal", "raw_sqlite", "insert", {"n": N, "per_commit": 100}, 3),
    (
        "raw.executemany_1000.normal",
        "raw_sqlite",
        "insert",
        {"n": N, "per_commit": 1000, "many": True},
        3,
    ),
    ("raw.cycle_1.normal", "raw_sqlite", "cycle", {"n": N, "per_tx": 1}, 3),
    ("raw.cycle_1.full", "raw_sqlite", "cycle", {"n": 2000, "per_tx": 1, "synchronous": "FULL"}, 3),
    ("raw.cycle_100.normal", "raw_sqlite", "cycle", {"n": N, "per_tx": 100}, 3),
    (
        "raw.cycle_100.full",
        "raw_sqlite",
        "cycle",
        {"n": N, "per_tx": 100, "synchronous": "FULL"},
        3,
    ),
    (
        "iii.enqueue.memory.p1",
        "iii_bench",
        "enqueue",
        {"store": "memory", "n": N, "producers": 1},
        3,
    ),
    (
        "iii.enqueue.memory.p16",
        "iii_bench",
        "enqueue",
        {"store": "memory", "n": N, "producers": 16},
        3,
    ),
    (
        "iii.enqueue.file-normal.p1",
        "iii_bench",
        "enqueue",
        {"store": "file-normal", "n": 5000, "producers": 1},
        3,
    ),
    (
        "iii.enqueue.file-normal.p16",
        "iii_bench",
        "enqueue",
        {"store": "file-normal", "n": N, "producers": 16},
        3,
    ),
    (
        "iii.enqueue.file-full.p16",
        "iii_bench",
        "enqueue",
        {"store": "file-full", "n": N, "producers": 16},
        3,
    ),
    ("iii.e2e.memory.async", "iii_bench", "end_to_end", {"store": "memory", "n": N}, 3),
    (
        "iii.e2e.memory.sync",
        "iii_bench",
        "end_to_end",
        {"store": "memory", "n": N, "handler": "sync"},
        3,
    ),
    ("iii.e2e.file-normal.async", "iii_bench", "end_to_end", {"store": "file-normal", "n": N}, 3),
    (
        "iii.e2e.file-normal.sync",
        "iii_bench",
        "end_to_end",
        {"store": "file-normal", "n": N, "handler": "sync"},
        3,
    ),
    ("iii.e2e.file-full.async", "iii_bench", "end_to_end", {"store": "file-full", "n": N}, 3),
    (
        "iii.e2e.file-full.sync",
        "iii_bench",
        "end_to_end",
        {"store": "file-full", "n": N, "handler": "sync"},
        3,
    ),
    (
        "iii.e2e_fifo100.memory",
        "iii_bench",
        "end_to_end",
        {"store": "memory", "n": N, "fifo_groups": 100},
        3,
    ),
    (
        "iii.e2e_fifo100.file-normal",
        "iii_bench",
        "end_to_end",
        {"store": "file-normal", "n": N, "fifo_groups": 100},
        3,
    ),
    ("iii.sync_call", "iii_bench", "sync_call", {"m": 100_000}, 3),
    ("iii.latency.memory", "iii_bench", "latency", {"store": "memory", "samples": 500}, 1),
    (
        "iii.latency.file-normal",
        "iii_bench",
        "latency",
        {"store": "file-normal", "samples": 500},
        1,
    ),
    ("iii.depth.10k", "iii_bench", "depth", {"pending": 10_000, "drain_n": 10_000}, 1),
    ("iii.depth.1m", "iii_bench", "depth", {"pending": 1_000_000, "drain_n": 10_000}, 1),
    ("huey.enqueue", "peers", "huey_enqueue", {"n": 5000}, 3),
    ("huey.e2e.w1", "peers", "huey_end_to_end", {"n": 5000, "workers": 1}, 3),
    ("huey.e2e.w8", "peers", "huey_end_to_end", {"n": 5000, "workers": 8}, 3),
    ("huey.immediate", "peers", "huey_immediate", {"m": 20_000}, 3),
    ("persistq.enqueue", "peers", "persistqueue_enqueue", {"n": 5000}, 3),
    ("persistq.e2e.w4", "peers", "persistqueue_end_to_end", {"n": 3000, "workers": 4}, 3),
    ("litequeue.enqueue", "peers", "litequeue_enqueue", {"n": 5000}, 3),
    ("litequeue.e2e", "peers", "litequeue_end_to_end", {"n": 3000}, 3),
    ("dramatiq.e2e.t1", "peers", "dramatiq_end_to_end", {"n": N, "threads": 1}, 3),
    ("dramatiq.e2e.t8", "peers", "dramatiq_end_to_end", {"n": N, "threads": 8}, 3),
]

# (iii figure, reference figure, target, label): ratios printed under the table.
RATIOS: list[tuple[str, str, float | None, str]] = [
    ("iii.e2e.file-full.async", "huey.e2e.best", 10.0, "file e2e (full, async) / Huey-SQLite"),
    ("iii.e2e.file-full.sync", "huey.e2e.best", 10.0, "file e2e (full, sync) / Huey-SQLite"),
    ("iii.e2e.file-normal.async", "huey.e2e.best", 10.0, "file e2e (normal, async) / Huey-SQLite"),
    (
        "iii.e2e.file-normal.async",
        "raw.cycle_100.normal",
        0.25,
        "file e2e (normal) / raw cycle, 100 per tx",
    ),
    (
        "iii.e2e.file-full.async",
        "raw.cycle_100.full",
        0.25,
        "file e2e (full) / raw cycle, 100 per tx",
    ),
    (
        "iii.e2e.file-normal.async",
        "raw.cycle_1.normal",
        2.0,
        "file e2e (normal) / raw cycle, 1 per tx",
    ),
    ("iii.e2e.memory.async", "dramatiq.e2e.t8", 5.0, "memory e2e / Dramatiq StubBroker, 8 threads"),
    (
        "iii.enqueue.file-normal.p16",
        "raw.insert_100.normal",
        0.5,
        "durable enqueue, 16 producers / raw 100 rows per commit",
    ),
    ("iii.e2e.file-normal.async", "persistq.e2e.w4", None, "file e2e / persist-queue"),
    ("iii.e2e.file-normal.async", "litequeue.e2e", None, "file e2e / litequeue"),
    ("iii.enqueue.file-full.p16", "huey.enqueue", None, "durable enqueue (full) / Huey enqueue"),
    ("iii.depth.1m", "iii.depth.10k", 0.8, "1M pending / 10k pending (throughput)"),
]


def _value(result: dict[str, Any]) -> float:
    for key in ("rate", "overhead_us", "us", "p50_ms"):
        if key in result:
            return float(result[key])
    raise KeyError(result)


def run_one(module: str, function: str, params: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", module, function, json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module}.{function} failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def machine() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("iii-embedded", "anyio", "huey", "persist-queue", "litequeue", "dramatiq"):
        try:
            versions[package] = version(package)
        except Exception:
            versions[package] = "?"
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        **versions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small N, one repeat")
    parser.add_argument("--only", help="run the scenarios whose id contains this")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "latest.json"))
    args = parser.parse_args()
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    for sid, module, function, params, repeats in SCENARIOS:
        if args.only and args.only not in sid:
            continue
        params = dict(params)
        if args.quick:
            repeats = 1
            for key in ("n", "m", "samples", "pending", "drain_n"):
                if key in params:
                    params[key] = max(200, params[key] // 10)
        runs = [run_one(module, function, params) for _ in range(repeats)]
        values = [_value(r) for r in runs]
        median = statistics.median(values)
        best = runs[values.index(min(values, key=lambda v: abs(v - median)))]
        results[sid] = {**best, "median": median, "runs": values, "params": params}
        print(f"  {sid:32} {median:>12,.2f}  ({_unit(best)})", flush=True)
    if "huey.e2e.w1" in results and "huey.e2e.w8" in results:
        results["huey.e2e.best"] = {
            "median": max(results["huey.e2e.w1"]["median"], results["huey.e2e.w8"]["median"])
        }
    print(f"\n{'ratio':58} {'value':>8} {'target':>8}  met")
    for left, right, target, label in RATIOS:
        if left in results and right in results:
            ratio = results[left]["median"] / results[right]["median"]
            met = "-" if target is None else ("yes" if ratio >= target else "NO")
            shown = "-" if target is None else f"{target:g}x"
            print(f"{label:58} {ratio:>7.2f}x {shown:>8}  {met}")
            results[left].setdefault("ratios", {})[right] = ratio
    if "iii.sync_call" in results and "huey.immediate" in results:
        call = results["iii.sync_call"]
        ratio = results["huey.immediate"]["median"] / call["us"]
        print(
            f"{'sync call overhead over a bare await (us, target < 5)':58} "
            f"{call['overhead_us']:>8.2f} {'5us':>8}  {'yes' if call['overhead_us'] < 5 else 'NO'}"
        )
        print(
            f"{'Huey immediate call / iii sync call (target >= 2.5x)':58} {ratio:>7.2f}x "
            f"{'2.5x':>8}  {'yes' if ratio >= 2.5 else 'NO'}"
        )
    for sid in ("iii.latency.memory", "iii.latency.file-normal"):
        if sid in results:
            r = results[sid]
            print(
                f"{'idle latency p50/p99 ms, ' + sid.split('.')[-1] + ' (target p50 < 1)':58} "
                f"{r['p50_ms']:>5.3f}/{r['p99_ms']:.3f}  {'yes' if r['p50_ms'] < 1 else 'NO'}"
            )
    if "iii.depth.1m" in results:
        rss = results["iii.depth.1m"]["peak_rss_mb"]
        print(
            f"{'peak RSS with 1M pending, MB (target < 100)':58} {rss:>8.1f} {'100':>8}  "
            f"{'yes' if rss < 100 else 'NO'}"
        )
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


def _unit(result: dict[str, Any]) -> str:
    if "rate" in result:
        return "jobs/s"
    if "overhead_us" in result:
        return "us over a bare await"
    if "us" in result:
        return "us per call"
    return "ms p50"


if __name__ == "__main__":
    raise SystemExit(main())
