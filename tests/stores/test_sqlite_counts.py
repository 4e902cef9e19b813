"""``counts()`` on the file store reads each state's partial index, never the whole table
(a table scan took ~650 ms for a million jobs, the ready index ~60 ms). It runs on a
connection of its own, so a slow count never holds up the writer thread (enqueues, claims,
acknowledgements)."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from iii_embedded._stores import QueueCounts
from iii_embedded._stores._sqlite import (
    _COUNT_BY_STATE,
    _COUNT_DELAYED,
    _OLDEST_QUEUED,
    DB_FILENAME,
    Conn,
    SQLiteStore,
)

from .helpers import T0, new_job

pytestmark = pytest.mark.anyio


async def test_a_slow_count_does_not_hold_up_enqueues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = threading.Event()
    release = threading.Event()
    real_count = SQLiteStore._count

    def slow_count(conn: Conn, now: float) -> dict[str, QueueCounts]:
        counting.set()
        release.wait(10)  # a long scan, until the test has enqueued meanwhile
        return real_count(conn, now)

    monkeypatch.setattr(SQLiteStore, "_count", staticmethod(slow_count))
    store = SQLiteStore(tmp_path)
    await store.open()
    counted: list[dict[str, QueueCounts]] = []
    try:
        async with anyio.create_task_group() as tg:

            async def count() -> None:
                counted.append(await store.counts(T0))

            tg.start_soon(count)
            assert await anyio.to_thread.run_sync(counting.wait, 10)
            try:
                with anyio.fail_after(5):
                    assert await store.enqueue([new_job("a"), new_job("b")]) == ["a", "b"]
            finally:
                release.set()
    finally:
        await store.aclose()
    # The count read the store once the scan began, after the enqueue had committed.
    assert counted == [{"q": QueueCounts(ready=2, oldest_ready_at=T0)}]


async def test_counts_of_a_closed_store_is_a_clear_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    await store.aclose()
    with pytest.raises(Exception, match="the store is not open"):
        await store.counts(T0)


@pytest.mark.parametrize(
    "sql", [*_COUNT_BY_STATE.values(), _COUNT_DELAYED, _OLDEST_QUEUED], ids=lambda s: s[:60]
)
async def test_every_count_reads_an_index_not_the_table(tmp_path: Path, sql: str) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    await store.aclose()
    params = ("q", 1.0)[: sql.count("?")]
    with closing(sqlite3.connect(tmp_path / DB_FILENAME)) as conn:
        plan = [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    reads = [step for step in plan if "jobs" in step]
    assert reads and all("USING" in step and "INDEX" in step for step in reads), plan
