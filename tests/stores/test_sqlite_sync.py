"""``synchronous: full``: which commits the file store syncs to disk. Everything that
acknowledges something (an enqueue, an outcome) commits at FULL; a claim alone or a lease
renewal commits at NORMAL, since losing one with the machine only lets its job run
again."""

from __future__ import annotations

from pathlib import Path

import pytest

from iii_embedded._stores import Outcome, Renewal
from iii_embedded._stores._sqlite import SQLiteStore

from .helpers import T0, new_job

pytestmark = pytest.mark.anyio

OWNER = "host:1:abc"


class CommitModes:
    """Records the ``synchronous`` mode each COMMIT ran under (a SQLite trace callback)."""

    def __init__(self, initial: str) -> None:
        self.mode = initial
        self.commits: list[str] = []

    def __call__(self, sql: str) -> None:
        text = sql.strip().upper()
        if text.startswith("PRAGMA SYNCHRONOUS"):
            self.mode = text.rsplit("=", 1)[1].strip()
        elif text == "COMMIT":
            self.commits.append(self.mode)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_only_acknowledging_commits_are_synced(tmp_path: Path, synchronous: str) -> None:
    store = SQLiteStore(tmp_path, synchronous=synchronous)  # type: ignore[arg-type]
    await store.open()
    try:
        first = await store.claim("q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0)
        assert first == []  # registers this owner: a durable write
        assert store._conn is not None
        modes = CommitModes(synchronous.upper())
        store._conn.set_trace_callback(modes)
        await store.enqueue([new_job("a"), new_job("b")])
        claimed = await store.claim(
            "q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30
        )
        assert await store.renew(OWNER, ["a", "b"], T0 + 60) == Renewal()
        done = [
            Outcome(job_id=j.id, kind="completed", owner=OWNER, attempt=1, at=T0, output="1")
            for j in claimed
        ]
        assert (
            await store.exchange(
                done, "q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30
            )
            == []
        )
        store._conn.set_trace_callback(None)
        jobs = {j.id: (j.state, j.attempts, j.lease_until) for j in await store.list_jobs()}
    finally:
        await store.aclose()
    assert [j.id for j in claimed] == ["a", "b"]
    assert jobs == {"a": ("completed", 1, None), "b": ("completed", 1, None)}
    if synchronous == "full":
        # enqueue, claim, renew, exchange (outcomes + claim)
        assert modes.commits == ["FULL", "NORMAL", "NORMAL", "FULL"]
    else:
        assert modes.commits == ["NORMAL"] * 4
