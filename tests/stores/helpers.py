"""Shared by the file store's own tests: a plain ready job."""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from iii_embedded._stores import NewJob
from iii_embedded._stores._sqlite import DB_FILENAME

T0 = 1_000.0


def new_job(job_id: str, *, queue: str = "q", pad: int = 0) -> NewJob:
    """A ready standard-queue job of function ``fn``, available at ``T0`` (``pad``: that
    many more bytes of payload)."""
    return NewJob(
        id=job_id,
        queue=queue,
        function_id="fn",
        payload=json.dumps({"id": job_id, "pad": "x" * pad} if pad else {"id": job_id}),
        group=None,
        created_at=T0,
        available_at=T0,
        max_attempts=3,
    )


def jobs_in_database_file(store_dir: Path, scratch: Path) -> int:
    """Jobs in the database file alone, without its WAL: the checkpointed ones. -1 for a
    copy taken while a checkpoint was writing pages (torn: try again)."""
    scratch.mkdir()
    shutil.copy(store_dir / DB_FILENAME, scratch / DB_FILENAME)
    try:
        with closing(sqlite3.connect(scratch / DB_FILENAME)) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchall():
                return 0  # even the schema is only in the WAL yet
            (count,) = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
    except sqlite3.DatabaseError:
        return -1
    return int(count)
