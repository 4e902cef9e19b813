"""kill -9 with prefetched jobs: the lost attempt of a job that ran counts, and a job that
was only prefetched (claimed, never started) gets its attempt back (docs/design.md, "What
an attempt costs"). With ``max_retries: 1`` the difference is the dead-letter queue."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore

APP = Path(__file__).with_name("prefetch_app.py")


def start(store: Path, side: Path, mode: str, handler: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(APP), str(store), str(side), mode, handler],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def j1_start_is_written(store: Path) -> bool:
    """Whether the store (read from outside, as another process would) has j1's start."""
    db = store / DB_FILENAME
    if not db.exists():
        return False
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        for payload, started_at in conn.execute(
            "SELECT payload, started_at FROM jobs WHERE state = 'running'"
        ):
            if json.loads(payload)["k"] == "j1":
                return started_at is not None
        return False
    except sqlite3.OperationalError:  # the schema is not created yet
        return False
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("handler", ["async", "sync"])
def test_a_crash_charges_the_jobs_that_ran_and_gives_prefetched_ones_their_attempt_back(
    tmp_path: Path, handler: str
) -> None:
    """With sync handlers the prefetched jobs wait in the queue's line for j1's thread."""
    store, side = tmp_path / "store", tmp_path / "events.log"
    side.touch()
    child = start(store, side, "crash", handler)
    try:
        # Wait (bounded) for the state to kill in: all five enqueued, j0 done, j1 running
        # from the prefetch buffer with its start written, j2..j4 still in the buffer.
        deadline = time.monotonic() + 30
        while (
            not ("ack j4" in side.read_text() and j1_start_is_written(store))
            and time.monotonic() < deadline
        ):
            assert child.poll() is None, child.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.01)
        assert "ack j4" in side.read_text() and j1_start_is_written(store), side.read_text()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()  # type: ignore[union-attr]
    assert [line.split()[1] for line in side.read_text().splitlines() if "start" in line] == [
        "j0",
        "j1",
    ]

    final = start(store, side, "final", handler)
    _, err = final.communicate(timeout=60)
    assert final.returncode == 0, err.decode()[-2000:]

    async def stored() -> dict[str, tuple[str, int, str | None]]:
        s = SQLiteStore(store)
        await s.open()
        try:
            return {
                json.loads(j.payload)["k"]: (
                    j.state,
                    j.attempts,
                    j.error.type if j.error and j.state == "dead" else None,
                )
                for j in await s.list_jobs()
            }
        finally:
            await s.aclose()

    assert anyio.run(stored) == {
        "j0": ("completed", 1, None),
        "j1": ("dead", 1, "LeaseExpired"),  # it ran: its lost attempt was its only one
        "j2": ("completed", 1, None),  # never started before the crash: attempt given back
        "j3": ("completed", 1, None),
        "j4": ("completed", 1, None),
    }
    final_starts = [
        line.split() for line in side.read_text().splitlines()[-3:] if line.startswith("start")
    ]
    assert [(k, attempt) for _, k, _, attempt in final_starts] == [
        ("j2", "1"),
        ("j3", "1"),
        ("j4", "1"),
    ]
