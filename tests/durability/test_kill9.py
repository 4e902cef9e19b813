"""kill -9 at random moments, restart, and nothing acknowledged is lost (SPEC §5, §9).

A child process runs an app on a file store that enqueues a planned set of jobs and runs
them (FIFO groups and a standard queue; some jobs always fail). The parent kills it with
SIGKILL at random moments — during enqueue, claim, run and ack — at least 50 times,
restarting it each time, then lets a last run finish. Seeded: set ``III_KILL_SEED`` to
replay a run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import anyio
import pytest

from iii_embedded._stores._sqlite import SQLiteStore

APP = Path(__file__).with_name("crash_app.py")
KILLS = 50
GROUPS = 5


def make_plan(rng: random.Random) -> list[dict[str, object]]:
    plan: list[dict[str, object]] = []
    for n in range(100):
        fifo = n % 3 != 2
        plan.append(
            {
                "k": f"j{n:03d}",
                "q": "ledger" if fifo else "std",
                "g": f"g{rng.randrange(GROUPS)}" if fifo else None,
                "sleep": rng.choice([0, 0, 0.002, 0.01, 0.03]),
                "fail": rng.random() < 0.08,
            }
        )
    return plan


def start(
    store: Path, side: Path, plan_file: Path, mode: str, handler: str, producer: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            str(APP),
            str(store),
            str(side),
            str(plan_file),
            mode,
            handler,
            producer,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("handler", "producer"),
    [("async", "loop"), ("sync", "loop"), ("async", "loop-writer"), ("async", "thread")],
)
def test_nothing_acknowledged_is_lost_across_kill_9(
    tmp_path: Path, handler: str, producer: str
) -> None:
    seed = int(os.environ.get("III_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    plan = make_plan(rng)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    store, side = tmp_path / "store", tmp_path / "events.log"
    side.touch()

    for _ in range(KILLS):
        proc = start(store, side, plan_file, "crash", handler, producer)
        # Random kill moments: early ones land in start-up, recovery and enqueue; later
        # ones while jobs are claimed, run and acknowledged.
        deadline = time.monotonic() + rng.uniform(0.15, 0.6)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, f"seed {seed}: app exited early: {proc.stderr.read()!r}"  # type: ignore[union-attr]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
    final = start(store, side, plan_file, "final", handler, producer)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, f"seed {seed}: {err.decode()[-2000:]}"

    events = side.read_text().splitlines()
    acked = {e.split()[1] for e in events if e.startswith("ack ")}
    ended = [e.split()[1] for e in events if e.startswith("end ")]
    by_key = {j["k"]: j for j in plan}
    failing = {k for k, j in by_key.items() if j["fail"]}
    assert acked == set(by_key), f"seed {seed}"

    # Every acknowledged job that can succeed completed at least once.
    assert set(ended) == set(by_key) - failing, f"seed {seed}"

    # FIFO: first completions within a group follow enqueue order.
    first_end: list[str] = list(dict.fromkeys(ended))
    for group in {j["g"] for j in plan if j["g"]}:
        expected = [j["k"] for j in plan if j["g"] == group and not j["fail"]]
        actual = [k for k in first_end if by_key[k]["g"] == group]
        assert actual == expected, f"seed {seed}: group {group}"

    # No two jobs of a group ran at once inside one process.
    running: dict[tuple[str, str], set[str]] = defaultdict(set)
    for event in events:
        parts = event.split()
        if parts[0] not in ("start", "end", "fail"):
            continue
        key, pid = parts[1], parts[2]
        group = by_key[key]["g"]
        if group is None:
            continue
        slot = running[(pid, str(group))]
        if parts[0] == "start":
            assert not (slot - {key}), f"seed {seed}: {key} overlapped {slot} in {pid}"
            slot.add(key)
        else:
            slot.discard(key)

    # The dead-letter queues hold exactly the jobs that always fail.
    async def dead_keys() -> set[str]:
        s = SQLiteStore(store)
        await s.open()
        try:
            dead = [j for q in ("ledger", "std") for j in await s.list_dead(q, limit=10_000)]
            leftovers = await s.list_jobs(state="queued") + await s.list_jobs(state="running")
            assert leftovers == [], f"seed {seed}: {leftovers}"
            return {json.loads(j.payload)["k"] for j in dead}
        finally:
            await s.aclose()

    assert anyio.run(dead_keys) == failing, f"seed {seed}"
    assert sum(e.startswith("start ") for e in events) >= len(by_key) - len(failing)
