"""At ``synchronous: normal`` the file store checkpoints its WAL in a thread of its own, so
no commit of the writer stalls while the WAL is copied into the database and synced. At
``full`` the writer thread checkpoints every 100 write commits, as SQLite's automatic
checkpoint would every 1,000 pages (docs/durability.md says why). SQLite's own is off on
the writer's connection: it would run inside a commit, and commits may run on the event
loop (``commit_on_loop``, tests/stores/test_sqlite_commit_on_loop.py)."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded._stores import _sqlite
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore

from .helpers import jobs_in_database_file, new_job

pytestmark = pytest.mark.anyio


def checkpointers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("iii-sqlite-checkpoint")]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (up to 5 s) for the checkpointer thread to make ``condition`` true."""
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.001)
    assert condition(), what


async def test_at_normal_a_thread_of_its_own_checkpoints_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sqlite, "_CHECKPOINT_EVERY", 5)
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    copies = iter(range(1_000_000))
    try:
        assert store._conn is not None
        (automatic,) = store._conn.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert automatic == 0  # the writer's own backstop comes far later
        (limit,) = store._conn.execute("PRAGMA journal_size_limit").fetchone()
        assert limit == _sqlite._WAL_LIMIT["normal"] == 10_000 * 4096
        for i in range(10):  # ten commits: a pass is asked for after the 5th and the 10th
            await store.enqueue([new_job(f"j{i}")])
        # The ten jobs reach the database file itself, not only its WAL. The pass counts
        # itself once its checkpoint has returned, a moment after the file has the jobs.
        await until(
            lambda: (
                jobs_in_database_file(store.directory, tmp_path / str(next(copies))) == 10
                and store.checkpoints >= 1
            ),
            "the jobs checkpointed",
        )
        assert 1 <= store.checkpoints <= 2  # two requests, perhaps served by one pass
        assert store.own_checkpoints == 0
        assert len(checkpointers()) == 1
    finally:
        await store.aclose()


async def test_closing_stops_the_checkpointer_and_removes_the_wal(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    await store.enqueue([new_job("a")])
    assert len(checkpointers()) == 1
    await store.aclose()
    assert checkpointers() == []
    # The writer's connection closed last, so it checkpointed everything and removed the
    # WAL: the database file alone holds the job.
    assert not (tmp_path / "store" / f"{DB_FILENAME}-wal").exists()
    assert jobs_in_database_file(tmp_path / "store", tmp_path / "copy") == 1


async def test_at_full_the_writer_thread_checkpoints_once_the_log_is_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_sqlite._WAL_LIMIT, "full", 4096)  # one page: long at once
    store = SQLiteStore(tmp_path / "store", synchronous="full")
    await store.open()
    copies = iter(range(1_000_000))
    try:
        assert checkpointers() == []
        assert store._conn is not None
        (limit,) = store._conn.execute("PRAGMA journal_size_limit").fetchone()
        assert limit == 4096
        assert store.own_checkpoints == 0
        for i in range(15):
            await store.enqueue([new_job(f"j{i}")])
        assert store.own_checkpoints == 0  # the log's length is looked at every 16th
        await store.enqueue([new_job("j15")])
        # Longer than one page: the jobs reach the database file itself.
        await until(lambda: store.own_checkpoints == 1, "the writer's checkpoint")
        await until(
            lambda: jobs_in_database_file(store.directory, tmp_path / str(next(copies))) == 16,
            "the jobs checkpointed",
        )
    finally:
        await store.aclose()


async def test_at_full_the_writer_thread_also_checkpoints_every_so_many_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(_sqlite._OWN_CHECKPOINT_EVERY, "full", 5)
    store = SQLiteStore(tmp_path / "store", synchronous="full")
    await store.open()
    try:
        for i in range(4):
            await store.enqueue([new_job(f"j{i}")])
        assert store.own_checkpoints == 0  # a short log: no reason yet
        await store.enqueue([new_job("j4")])
        await until(lambda: store.own_checkpoints == 1, "the fifth commit's checkpoint")
        assert _sqlite._WAL_LIMIT["full"] == 1000 * 4096  # SQLite's default, in bytes
    finally:
        await store.aclose()


async def test_a_checkpoint_that_cannot_finish_is_asked_again_until_the_log_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SQLite's own automatic checkpoint does: while the log is past the limit, every
    commit asks for a checkpoint. One that cannot copy everything (a reader holds an old
    snapshot) leaves the log long, so it is asked again; once one finishes, the next
    commit starts the log over and cuts the file back to the limit."""
    limit = 16 * 4096
    monkeypatch.setitem(_sqlite._WAL_LIMIT, "full", limit)
    store = SQLiteStore(tmp_path / "store", synchronous="full")
    await store.open()
    wal = store.directory / f"{DB_FILENAME}-wal"
    try:
        await store.enqueue([new_job("first")])
        with closing(sqlite3.connect(store.path, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT COUNT(*) FROM jobs").fetchall()  # holds its snapshot
            for i in range(40):
                await store.enqueue([new_job(f"j{i}", pad=2000)])
            await until(lambda: store.own_checkpoints >= 10, "checkpoints asked again")
            held_back = wal.stat().st_size
            assert held_back > 4 * limit  # they could not copy past the reader
            reader.execute("COMMIT")
        asked = store.own_checkpoints
        await store.enqueue([new_job("after")])  # asks again; this one can finish
        await until(lambda: store.own_checkpoints > asked, "a checkpoint that finishes")
        await store.enqueue([new_job("restart")])  # starts the log over, cuts the file
        assert wal.stat().st_size <= limit
    finally:
        await store.aclose()


async def test_a_checkpointer_that_cannot_connect_is_logged_and_the_store_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if threading.current_thread().name.startswith("iii-sqlite-checkpoint"):
            raise sqlite3.OperationalError("unable to open database file")
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(_sqlite.sqlite3, "connect", connect)
    caplog.set_level(logging.WARNING, logger="iii_embedded.store")
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        await until(lambda: bool(caplog.records), "the warning")
        assert await store.enqueue([new_job("a")]) == ["a"]
    finally:
        await store.aclose()
    [warning] = [r.getMessage() for r in caplog.records]
    assert "no background checkpoints (unable to open database file)" in warning
    assert str(store.path) in warning
