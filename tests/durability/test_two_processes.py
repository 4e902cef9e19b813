"""Two processes share one file store (SPEC §5): every job completes once, FIFO groups
never overlap in time across processes, and both processes do work."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import anyio
import pytest

from iii_embedded._stores import NewJob
from iii_embedded._stores._sqlite import SQLiteStore

APP = Path(__file__).with_name("shared_app.py")


async def fill(store_dir: Path, jobs: list[dict[str, object]]) -> None:
    store = SQLiteStore(store_dir)
    await store.open()
    try:
        now = time.time()
        await store.enqueue(
            [
                NewJob(
                    id=str(j["k"]),
                    queue=str(j["q"]),
                    function_id="work",
                    payload=json.dumps(j),
                    group=json.dumps(j["g"]) if j["g"] is not None else None,
                    created_at=now,
                    available_at=now,
                    max_attempts=3,
                )
                for j in jobs
            ]
        )
    finally:
        await store.aclose()


def wait_for(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            assert p.poll() is None, p.stderr.read() if p.stderr else b""
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_share_one_store(tmp_path: Path) -> None:
    rng = random.Random(7)
    jobs: list[dict[str, object]] = []
    for n in range(1000):
        fifo = n % 2 == 0
        jobs.append(
            {
                "k": f"j{n:04d}",
                "q": "ledger" if fifo else "std",
                "g": f"g{rng.randrange(20)}" if fifo else None,
                "sleep": rng.choice([0, 0, 0.001, 0.003]),
            }
        )
    store, side = tmp_path / "store", tmp_path / "events.log"
    anyio.run(fill, store, jobs)
    procs = [
        subprocess.Popen(
            [sys.executable, str(APP), str(store), str(side), name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name in ("A", "B")
    ]
    try:
        for name in ("A", "B"):
            wait_for(Path(f"{side}.{name}.ready"), procs)
        Path(f"{side}.go").write_text("go")
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    events = [line.split() for line in side.read_text().splitlines()]
    starts = Counter(e[1] for e in events if e[0] == "start")
    ends = Counter(e[1] for e in events if e[0] == "end")
    keys = {str(j["k"]) for j in jobs}
    assert set(starts) == keys and set(ends) == keys
    assert max(starts.values()) == 1 and max(ends.values()) == 1  # each job ran once
    workers = Counter(e[2] for e in events if e[0] == "end")
    assert workers["A"] > 0 and workers["B"] > 0, workers

    # Per group: runs never overlap in time, and follow enqueue order.
    spans: dict[str, tuple[float, float]] = {}
    for e in events:
        start, end = spans.get(e[1], (0.0, 0.0))
        spans[e[1]] = (float(e[3]), end) if e[0] == "start" else (start, float(e[3]))
    by_group: dict[str, list[str]] = defaultdict(list)
    for j in jobs:
        if j["g"] is not None:
            by_group[str(j["g"])].append(str(j["k"]))
    for group, keys_in_order in by_group.items():
        ordered = [spans[k] for k in keys_in_order]
        for (_, end_first), (start_next, _) in itertools.pairwise(ordered):
            assert end_first <= start_next, f"group {group}: overlapping or out of order runs"
