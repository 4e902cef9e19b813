"""Faults of the file store (SPEC §5): each gives a clear error naming the path and the
cause, and nothing already acknowledged is lost."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from iii_embedded import (
    III,
    Config,
    InvocationError,
    StoreConfig,
    StoreError,
    StoreVersionError,
    TriggerAction,
)
from iii_embedded._stores import ErrorInfo, NewJob, Outcome
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore

pytestmark = pytest.mark.anyio

T0 = 1_000.0


def new_job(job_id: str, payload: str = "{}") -> NewJob:
    return NewJob(
        id=job_id,
        queue="q",
        function_id="fn",
        payload=payload,
        created_at=T0,
        available_at=T0,
        max_attempts=3,
    )


async def make_store(directory: Path) -> None:
    store = SQLiteStore(directory)
    await store.open()
    await store.enqueue([new_job("kept")])
    await store.aclose()


def run_as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child that dropped root (as root, permissions are not enforced).
    Modules are imported before dropping, since the interpreter may live under /root."""
    preamble = (
        "import os, asyncio, sqlite3, anyio, anyio._backends._asyncio, sqlite_utils\n"
        "import iii_embedded, iii_embedded._stores._sqlite, concurrent.futures.thread\n"
        # The modules an app imports when it is made (urllib among them, which Python
        # 3.13 no longer imports at start-up).
        "import iii_embedded._http, iii_embedded._cron, iii_embedded._topics\n"
        "import iii_embedded._builtins, iii_embedded._config_loader\n"
        "if os.getuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


async def test_a_read_only_directory_fails_at_start_naming_the_path() -> None:
    # pytest's tmp_path lives under a 0700 directory the unprivileged child cannot reach.
    base = Path(tempfile.mkdtemp(prefix="iii-readonly-", dir="/tmp"))
    os.chmod(base, 0o755)
    directory = base / "store"
    await make_store(directory)
    os.chmod(directory, 0o555)
    os.chmod(directory / DB_FILENAME, 0o444)
    try:
        proc = run_as_nobody(f"""
            import anyio
            from iii_embedded import III, Config, StoreConfig, StoreError
            store = StoreConfig(store_method="file_based", file_path={str(directory)!r})
            app = III(Config(store=store))
            async def main():
                try:
                    async with app.running():
                        print("STARTED")
                except StoreError as exc:
                    print("ERROR", exc)
            anyio.run(main)
        """)
    finally:
        os.chmod(directory, 0o755)
        os.chmod(directory / DB_FILENAME, 0o644)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERROR "), proc.stdout + proc.stderr
    assert str(directory) in proc.stdout
    assert "read-only" in proc.stdout
    # Nothing acknowledged was lost: the job is still there for a process that can write.
    store = SQLiteStore(directory)
    await store.open()
    try:
        assert [j.id for j in await store.list_jobs()] == ["kept"]
    finally:
        await store.aclose()
        shutil.rmtree(base, ignore_errors=True)


async def test_a_file_where_the_store_directory_should_be_is_named_as_such(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue_store"
    path.write_text("not a directory")
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(path).open()
    assert str(caught.value) == (
        f"{path}: the store's file_path must be a directory, and this is a file "
        "(the store keeps its database inside it)"
    )
    assert path.read_text() == "not a directory"


async def test_a_directory_where_the_database_file_should_be_is_named_as_such(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "store"
    (directory / DB_FILENAME).mkdir(parents=True)
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(directory).open()
    assert str(caught.value) == (
        f"{directory / DB_FILENAME}: this is a directory, where the store keeps its "
        "database file; move it away, or point file_path at another directory"
    )


async def test_a_corrupt_database_fails_naming_the_path_and_the_cause(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    await make_store(directory)
    for suffix in ("-wal", "-shm"):
        (directory / (DB_FILENAME + suffix)).unlink(missing_ok=True)
    with open(directory / DB_FILENAME, "r+b") as f:
        f.write(b"this is not a database header at all" * 4)
    store = SQLiteStore(directory)
    with pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert str(directory / DB_FILENAME) in message
    assert "not a valid SQLite database" in message


@pytest.mark.parametrize("with_wal", [True, False])
async def test_an_empty_database_file_is_refused_and_its_wal_kept(
    tmp_path: Path, with_wal: bool
) -> None:
    """A database file cut to 0 bytes (a failed copy, a ``> file``) is damage: SQLite would
    take it for a new database, delete the WAL beside it (the jobs acknowledged since the
    last checkpoint) and start empty. The store never leaves an empty file itself: the
    switch to WAL mode writes the first page as soon as the file is made."""
    directory = tmp_path / "store"
    directory.mkdir()
    (directory / DB_FILENAME).write_bytes(b"")
    wal = directory / (DB_FILENAME + "-wal")
    if with_wal:
        wal.write_bytes(b"frames of acknowledged jobs" * 100)
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(directory).open()
    assert str(caught.value) == (
        f"{directory / DB_FILENAME}: the database file is empty (0 bytes): it was truncated "
        "or replaced, so the store's jobs are not in it; restore it from a backup (with its "
        f"-wal file, if any), or delete it to start an empty store"
    )
    assert (directory / DB_FILENAME).stat().st_size == 0
    assert wal.exists() == with_wal
    if with_wal:
        assert wal.read_bytes() == b"frames of acknowledged jobs" * 100


async def test_a_store_that_cannot_be_made_leaves_no_file_for_the_next_start(
    tmp_path: Path,
) -> None:
    """A full disk at the first start (here a file size limit of 0, so that every write
    fails) fails that start naming the path, and leaves no empty database file, which the
    next start, with room again, would refuse as damaged (SQLite makes the file before
    it finds that it cannot write it)."""
    directory = tmp_path / "store"
    code = f"""
import resource, signal, anyio
from iii_embedded import StoreError
from iii_embedded._stores._sqlite import SQLiteStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
async def main():
    try:
        await SQLiteStore({str(directory)!r}).open()
    except StoreError as exc:
        print("ERROR", exc)
anyio.run(main)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert list(directory.iterdir()) == []
    assert proc.stdout.startswith(
        f"ERROR {directory / DB_FILENAME}: creating the store failed: "
    ), proc.stdout + proc.stderr
    store = SQLiteStore(directory)
    await store.open()
    try:
        await store.enqueue([new_job("first")])
        assert [j.id for j in await store.list_jobs()] == ["first"]
    finally:
        await store.aclose()


async def test_a_database_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    store = SQLiteStore(directory)
    with pytest.raises(StoreError, match="not an iii-embedded store") as caught:
        await store.open()
    assert str(directory / DB_FILENAME) in str(caught.value)
    with sqlite3.connect(directory / DB_FILENAME) as conn:  # and it was left untouched
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["users"]


async def _store_with_schema_version(tmp_path: Path, version: str) -> Path:
    """A store made by ``make_store`` whose meta table was then set to ``version`` by hand."""
    directory = tmp_path / "store"
    await make_store(directory)
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    return directory


async def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    directory = await _store_with_schema_version(tmp_path, "99")
    store = SQLiteStore(directory)
    with pytest.raises(StoreVersionError, match="schema version 99") as caught:
        await store.open()
    assert str(directory / DB_FILENAME) in str(caught.value)


async def test_a_schema_version_that_is_not_a_number_is_refused_naming_the_path(
    tmp_path: Path,
) -> None:
    directory = await _store_with_schema_version(tmp_path, "abc")
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(directory).open()
    assert str(caught.value) == (
        f"{directory / DB_FILENAME}: the store's schema version is 'abc', not a number "
        "(its meta table was changed by hand?)"
    )


async def test_a_schema_version_lowered_by_hand_fails_its_migration_and_changes_nothing(
    tmp_path: Path,
) -> None:
    directory = await _store_with_schema_version(tmp_path, "2")
    with pytest.raises(StoreError) as caught:
        await SQLiteStore(directory).open()
    assert str(caught.value).startswith(
        f"{directory / DB_FILENAME}: migrating the store from schema version 2 failed: "
        'table "cron_fires" already exists'
    )
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == [("2",)]
        assert conn.execute("SELECT id FROM jobs").fetchall() == [("kept",)]


async def test_reopening_keeps_the_jobs_and_the_schema(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    await make_store(directory)
    store = SQLiteStore(directory)
    await store.open()
    try:
        assert [j.id for j in await store.list_jobs()] == ["kept"]
    finally:
        await store.aclose()


async def test_a_full_disk_fails_the_enqueue_that_hit_it_and_nothing_else(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    await make_store(directory)
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    store = SQLiteStore(directory, max_page_count=pages + 8)
    await store.open()
    try:
        big = json.dumps({"blob": "x" * 20_000})
        accepted = []
        with pytest.raises(StoreError) as caught:
            for n in range(100):
                await store.enqueue([new_job(f"big-{n}-a", big), new_job(f"big-{n}-b", big)])
                accepted += [f"big-{n}-a", f"big-{n}-b"]
        message = str(caught.value)
        assert str(directory / DB_FILENAME) in message
        assert "the disk is full" in message
        stored = [j.id for j in await store.list_jobs(limit=10_000)]
        assert stored == ["kept", *accepted]  # the failed batch stored nothing, in full
        # The store keeps serving: claims and acks still work.
        claimed = await store.claim(
            "q", fifo=False, limit=100, now=T0, owner="h:1:x", lease_until=T0 + 30
        )
        assert [j.id for j in claimed] == stored
    finally:
        await store.aclose()


async def test_a_full_disk_reaches_the_caller_as_an_enqueue_error(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    await make_store(directory)
    with sqlite3.connect(directory / DB_FILENAME) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    app = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(directory))),
        store=SQLiteStore(directory, max_page_count=pages + 4),
        shutdown_grace_ms=0,
    )
    app.register_function("fn", lambda data: None)
    async with app.running():
        with pytest.raises(InvocationError) as caught:
            for _ in range(100):
                await app.trigger_async(
                    "fn", {"blob": "y" * 50_000}, action=TriggerAction.Enqueue(queue="default")
                )
    assert caught.value.code == "enqueue_error"
    assert "the disk is full" in caught.value.message
    assert isinstance(caught.value.__cause__, StoreError)


async def test_a_store_opened_by_a_relative_path_survives_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = III(
        Config(store=StoreConfig(store_method="file_based", file_path="data")),
        shutdown_grace_ms=0,
    )
    app.register_function("fn", lambda data: None)
    async with app.running():
        monkeypatch.chdir("/")  # the program moves on: the store's file stays where it was
        receipt = await app.trigger_async(
            "fn", {"n": 1}, action=TriggerAction.Enqueue(delay_ms=3_600_000)
        )
    store = SQLiteStore(tmp_path / "data")
    await store.open()
    try:
        assert [j.id for j in await store.list_jobs()] == [receipt["messageReceiptId"]]
    finally:
        await store.aclose()


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_store_whose_file_is_removed_while_open_gives_no_more_receipts(
    tmp_path: Path, how: str
) -> None:
    # SQLite writes on into an unlinked file without complaint: a receipt for such a
    # write would name a job that no process will ever find.
    directory = tmp_path / "store"
    app = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(directory))),
        shutdown_grace_ms=0,
    )
    app.register_function("fn", lambda data: None)
    async with app.running():
        kept = await app.trigger_async(
            "fn", {"n": 1}, action=TriggerAction.Enqueue(delay_ms=3_600_000)
        )
        shutil.rmtree(directory)
        if how == "replaced":
            await make_store(directory)  # another store now lives at the path
        errors = []
        for n in range(2):
            with pytest.raises(InvocationError) as caught:
                await app.trigger_async(
                    "fn", {"n": n}, action=TriggerAction.Enqueue(delay_ms=3_600_000)
                )
            errors.append(caught.value)
    assert "messageReceiptId" in kept  # acknowledged before the removal
    assert [e.code for e in errors] == ["enqueue_error", "enqueue_error"]
    assert all(
        "the database file was removed or replaced while the store was open" in e.message
        for e in errors
    )
    if how == "replaced":
        store = SQLiteStore(directory)
        await store.open()
        try:
            assert [j.id for j in await store.list_jobs()] == ["kept"]  # only its own
        finally:
            await store.aclose()


async def test_a_store_whose_wal_file_is_removed_while_open_gives_no_more_receipts(
    tmp_path: Path,
) -> None:
    """SQLite commits on into a WAL file that was unlinked (an ``rm *-wal`` to "clean up"),
    where a crash loses them and no other process sees them: no receipt may be given for
    such a commit. What was written before is in the unlinked file, and a clean close
    copies it into the database file."""
    directory = tmp_path / "store"
    store = SQLiteStore(directory)
    await store.open()
    try:
        await store.enqueue([new_job("kept")])
        (directory / (DB_FILENAME + "-wal")).unlink()
        errors = []
        for n in range(2):
            with pytest.raises(StoreError) as caught:
                await store.enqueue([new_job(f"after-{n}")])
            errors.append(str(caught.value))
    finally:
        await store.aclose()
    expected = (
        f"{directory / DB_FILENAME}: the database's -wal file was removed or replaced while "
        "the store was open: this write is only in the removed file (lost if the process "
        "dies; a clean stop copies it into the database file)"
    )
    assert errors == [expected, expected]
    store = SQLiteStore(directory)
    await store.open()
    try:
        # The close copied the removed file's commits in, the refused ones too: a caller
        # that enqueues again after the error may have its job twice (at-least-once).
        assert [j.id for j in await store.list_jobs()] == ["kept", "after-0", "after-1"]
    finally:
        await store.aclose()


@pytest.mark.parametrize("kind", ["held", "released", "retry"])
async def test_a_failed_write_leaves_a_converted_outcome_as_its_runner_decided(
    tmp_path: Path, kind: Literal["held", "released", "retry"]
) -> None:
    """The store writes a held, released or retry outcome of a job whose cancel was
    requested as cancelled, and says so on the outcome; if that transaction fails,
    nothing was written, and the outcome says again what its runner decided (its hooks
    must not report a cancel that did not happen)."""
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    try:
        await store.enqueue([new_job("h")])
        claimed = await store.claim(
            "q", fifo=False, limit=1, now=T0, owner="me", lease_until=T0 + 30
        )
        assert [j.id for j in claimed] == ["h"]
        await store.cancel("h", T0)

        def broken(conn: object, groups: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        store._refresh_groups = broken  # type: ignore[method-assign,assignment]
        error = ErrorInfo(type="ValueError", message="boom") if kind == "retry" else None
        outcome = Outcome(job_id="h", kind=kind, owner="me", attempt=1, at=T0 + 2, error=error)
        with pytest.raises(StoreError, match="disk I/O error"):
            await store.finish([outcome])
        del store._refresh_groups
        unwritten = await store.get("h")
        assert (outcome.kind, outcome.started, outcome.converted_from) == (kind, True, None)
        await store.finish([outcome])  # written this time: cancelled, and it says so
        written = await store.get("h")
    finally:
        await store.aclose()
    assert unwritten is not None and (unwritten.state, unwritten.cancel_requested) == (
        "running",
        True,
    )
    started = kind == "retry"  # a retry's attempt ran: it is kept
    assert (outcome.kind, outcome.started, outcome.converted_from) == ("cancelled", started, kind)
    assert written is not None
    assert (written.state, written.attempts) == ("cancelled", 1 if started else 0)
    assert written.error == error


async def test_a_converted_retry_keeps_its_error_when_its_batch_is_run_again(
    tmp_path: Path,
) -> None:
    """A retry of a job whose cancel was asked is written cancelled with its error; when
    another request of the same batch fails, the writer rolls back and runs the batch
    again, and that second run must write the error too (it saw the outcome already
    converted and wrote a bare cancel; found by a review)."""
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    error = ErrorInfo(type="RuntimeError", message="attempt fails", traceback="tb")
    try:
        await store.enqueue([new_job("r")])
        await store.claim("q", fifo=False, limit=1, now=T0, owner="me", lease_until=T0 + 30)
        await store.cancel("r", T0)
        outcome = Outcome(
            job_id="r",
            kind="retry",
            owner="me",
            attempt=1,
            at=T0 + 2,
            error=error,
            available_at=T0 + 1000,
            started_at=T0,
        )
        finish = asyncio.ensure_future(store.finish([outcome]))
        await asyncio.sleep(0)  # the finish is the batch's first request
        duplicate = asyncio.ensure_future(store.enqueue([new_job("r")]))  # fails: id taken
        await asyncio.gather(finish, duplicate, return_exceptions=True)
        written = await store.get("r")
    finally:
        await store.aclose()
    assert finish.exception() is None and isinstance(duplicate.exception(), StoreError)
    assert written is not None and written.state == "cancelled"
    assert (written.error, written.last_failed_at, written.started_at) == (error, T0 + 2, T0)
    assert (outcome.kind, outcome.converted_from) == ("cancelled", "retry")
