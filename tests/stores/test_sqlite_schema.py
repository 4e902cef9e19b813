"""The file store's schema: older stores are migrated in place with their jobs, two
processes opening a store at once migrate it once, and the queries use the indexes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from iii_embedded._stores import NewJob
from iii_embedded._stores._sqlite import (
    _INSERT_JOBS,
    _JOB_VALUES,
    _LIVE,
    DB_FILENAME,
    SCHEMA_VERSION,
    SQLiteStore,
    _migrate_to_1,
)

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
    assert int(version) == SCHEMA_VERSION == 2
    assert "WHERE grp IS NOT NULL AND state IN" in _index_sql(directory, "ix_jobs_group")


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
    await first.enqueue(
        [
            NewJob(
                id="kept",
                queue="q",
                function_id="fn",
                payload="{}",
                group=None,
                created_at=T0,
                available_at=T0,
                max_attempts=3,
            )
        ]
    )
    raced = _RacedStore(directory)
    await raced.open()  # would fail with "table jobs already exists" if it migrated again
    try:
        assert raced.reads == 2
        assert [j.id for j in await raced.list_jobs()] == ["kept"]
    finally:
        await raced.aclose()
        await first.aclose()
