"""The file store's schema: older stores are migrated in place with their jobs, two
processes opening a store at once migrate it once, and the queries use the indexes."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import sqlite_utils

from iii_embedded._stores import completed_outcome
from iii_embedded._stores._sqlite import (
    _INSERT_JOBS,
    _JOB_VALUES,
    _LIVE,
    DB_FILENAME,
    SCHEMA_VERSION,
    SQLiteStore,
    _migrate_to_1,
    _migrate_to_2,
)

from .helpers import new_job

pytestmark = pytest.mark.anyio

T0 = 1_000.0


def _version_1_store(directory: Path) -> None:
    """A store exactly as iii-embedded with schema version 1 left it, holding three jobs:
    two of FIFO group "a" and one of a standard queue."""
    directory.mkdir()
    conn = sqlite3.connect(directory / DB_FILENAME, isolation_level=None)
    db = sqlite_utils.Database(conn)
    db["meta"].create({"key": str, "value": str}, pk="key")  # type: ignore[union-attr]
    _migrate_to_1(db)
    conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', '1')")
    rows = [
        ("f1", "fifo", "fn", '{"g": "a", "n": 1}', '"a"', T0, T0, 3, None),
        ("f2", "fifo", "fn", '{"g": "a", "n": 2}', '"a"', T0, T0, 3, None),
        ("s1", "std", "fn", '{"n": 3}', None, T0, T0, 3, None),
    ]
    conn.execute(
        _INSERT_JOBS + ",".join([_JOB_VALUES] * len(rows)), [v for row in rows for v in row]
    )
    conn.execute(
        "INSERT INTO fifo_groups(queue, grp, head_seq) "
        "SELECT 'fifo', '\"a\"', MIN(seq) FROM jobs WHERE grp = '\"a\"'"
    )
    conn.close()


def _index_sql(directory: Path, name: str) -> str:
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    assert row is not None, f"index {name} is missing"
    return str(row[0])


async def test_a_version_1_store_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    _version_1_store(directory)
    assert "WHERE state IN" in _index_sql(directory, "ix_jobs_group")

    store = SQLiteStore(directory)
    await store.open()
    try:
        claim = {"limit": 10, "now": T0 + 1, "owner": "me", "lease_until": T0 + 60}
        fifo = await store.claim("fifo", fifo=True, **claim)
        std = await store.claim("std", fifo=False, **claim)
        assert [j.id for j in fifo] == ["f1"]  # the group's order survived the migration
        assert [j.id for j in std] == ["s1"]
    finally:
        await store.aclose()

    with sqlite3.connect(directory / DB_FILENAME) as conn:
        (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert int(version) == SCHEMA_VERSION == 3
    assert "WHERE grp IS NOT NULL AND state IN" in _index_sql(directory, "ix_jobs_group")


async def test_a_version_2_store_gains_the_cron_fires_table(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    _version_1_store(directory)
    with sqlite3.connect(directory / DB_FILENAME, isolation_level=None) as conn:
        _migrate_to_2(sqlite_utils.Database(conn))
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "cron_fires" not in tables

    store = SQLiteStore(directory)
    await store.open()
    try:
        taken = await store.claim_fire("tick", 60.0, owner="me", now=60.0, lease_until=90.0)
        again = await store.claim_fire("tick", 60.0, owner="other", now=60.0, lease_until=90.0)
        assert (taken, again) == (True, False)
        std = await store.claim("std", fifo=False, limit=10, now=T0, owner="me", lease_until=T0)
        assert [j.id for j in std] == ["s1"]  # the jobs were kept
    finally:
        await store.aclose()


async def test_the_fifo_queries_use_the_group_index(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    store = SQLiteStore(directory)
    await store.open()
    await store.aclose()
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT MIN(seq) FROM jobs "
            f"WHERE queue = ? AND grp = ? AND state IN {_LIVE}",
            ("q", '"a"'),
        ).fetchall()
    assert any("ix_jobs_group" in str(step[-1]) for step in plan), plan


class _RacedStore(SQLiteStore):
    """Reads the schema version as 0 the first time, as a process does that looked just
    before another one created the schema."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.reads = 0

    def _schema_version(self, conn: sqlite3.Connection, db: sqlite_utils.Database) -> int:
        self.reads += 1
        if self.reads == 1:
            return 0
        return super()._schema_version(conn, db)


async def test_a_store_migrated_by_another_process_meanwhile_is_not_migrated_twice(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    first = SQLiteStore(directory)
    await first.open()
    await first.enqueue([new_job("kept")])
    raced = _RacedStore(directory)
    await raced.open()  # would fail with "table jobs already exists" if it migrated again
    try:
        assert raced.reads == 2
        assert [j.id for j in await raced.list_jobs()] == ["kept"]
    finally:
        await raced.aclose()
        await first.aclose()


async def test_a_completion_finds_its_job_by_rowid_and_still_checks_its_id(
    tmp_path: Path,
) -> None:
    """Completions carrying the job's seq look the row up by rowid (the id index is not
    read). A seq can be reused once its job is pruned, so the id is checked too: a stale
    completion never completes the new job that took its seq."""
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    statements: list[str] = []
    try:
        owner = "host:1:x"

        async def claim_one() -> tuple[str, int]:
            [claimed] = await store.claim(
                "q", fifo=False, limit=1, now=T0, owner=owner, lease_until=T0 + 30
            )
            return claimed.id, claimed.seq

        await store.enqueue([new_job("old")])
        old_id, old_seq = await claim_one()
        await store.finish([completed_outcome(old_id, owner, 1, T0, "1", old_seq)])
        assert await store.prune(T0 + 1) == 1
        await store.enqueue([new_job("new")])
        new_id, new_seq = await claim_one()
        assert (new_id, new_seq) == ("new", old_seq)  # SQLite reused the rowid

        await store.finish([completed_outcome(old_id, owner, 1, T0, "2", old_seq)])  # stale
        job = await store.get("new")
        assert job is not None and (job.state, job.output) == ("running", None)

        assert store._conn is not None
        store._conn.set_trace_callback(statements.append)
        await store.finish([completed_outcome(new_id, owner, 1, T0, "3", new_seq)])
        store._conn.set_trace_callback(None)
        job = await store.get("new")
        assert job is not None and (job.state, job.output) == ("completed", "3")
    finally:
        await store.aclose()

    [update] = [s for s in statements if s.startswith("UPDATE jobs SET state = 'completed'")]
    conn = sqlite3.connect(tmp_path / "store" / DB_FILENAME)
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + update)]
    conn.close()
    assert [step for step in plan if "jobs" in step] == [
        "SEARCH jobs USING INTEGER PRIMARY KEY (rowid=?)"
    ]


async def test_a_store_closed_cleanly_forgets_its_owners_that_hold_nothing(
    tmp_path: Path,
) -> None:
    """Every runtime registers its owner id in ``owners``; only the rows of owners known
    gone (a dead pid of this PID namespace) were ever deleted. A container gets a new PID
    namespace at each restart, so each restart left a row that every maintenance pass of
    every process read, for ever. A clean close now deletes the rows of its owners that
    hold no running job."""
    idle, busy = "otherhost:1:idle", "otherhost:1:busy"
    store = SQLiteStore(tmp_path)
    await store.open()
    await store.enqueue([new_job("a"), new_job("b")])
    [a] = await store.claim("q", fifo=False, limit=1, now=T0, owner=idle, lease_until=T0 + 30)
    await store.finish([completed_outcome(a.id, idle, 1, T0, '"ok"')])
    await store.claim("q", fifo=False, limit=1, now=T0, owner=busy, lease_until=T0 + 30)
    await store.aclose()
    with closing(sqlite3.connect(tmp_path / DB_FILENAME)) as conn:
        owners = [r[0] for r in conn.execute("SELECT owner FROM owners ORDER BY owner")]
    assert owners == [busy]  # its job is still leased to it: its row stays
