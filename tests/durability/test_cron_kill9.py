"""A process killed with kill -9 in the middle of a cron fire does not hold back the
schedule of the processes sharing its store (SPEC §5, §7): its fire stays marked running
with a lease of 30 s, but its process is gone, so the next fire runs at once elsewhere."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import III, Config, StoreConfig
from iii_embedded._stores._sqlite import DB_FILENAME
from iii_embedded.testing import VirtualClock

APP = Path(__file__).with_name("cron_app.py")


@pytest.mark.slow
def test_a_fire_whose_process_was_killed_does_not_hold_back_the_next(tmp_path: Path) -> None:
    store_dir, marker = tmp_path / "store", tmp_path / "running"
    child = subprocess.Popen(
        [sys.executable, str(APP), str(store_dir), str(marker)], stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() or not marker.read_text():  # the child's fire has begun
            assert child.poll() is None, child.stderr.read() if child.stderr else b""
            assert time.monotonic() < deadline, "the child's cron job never fired"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()  # type: ignore[union-attr]
    with sqlite3.connect(store_dir / DB_FILENAME) as conn:
        scheduled, owner, running, lease_until = conn.execute(
            "SELECT scheduled, owner, running, lease_until FROM cron_fires "
            "WHERE job_id = 'cron::beat'"
        ).fetchone()
    assert running == 1 and f":{child.pid}:" in owner  # the dead process still holds it
    assert lease_until > scheduled + 20  # and its lease has most of its 30 s left

    async def next_fire() -> list[str]:
        clock = VirtualClock(start=scheduled + 0.5)  # before the lease runs out
        config = Config(store=StoreConfig(store_method="file_based", file_path=str(store_dir)))
        iii = III(config, clock=clock, shutdown_grace_ms=0)
        fired: list[str] = []
        done = anyio.Event()

        @iii.function("beat", cron="* * * * * *")
        async def beat(payload: dict[str, Any]) -> None:
            fired.append(payload["scheduled_time"])
            done.set()

        async with iii.running():
            clock.advance(1)
            with anyio.fail_after(5):
                await done.wait()
        return fired

    fired = anyio.run(next_fire)
    assert len(fired) == 1
