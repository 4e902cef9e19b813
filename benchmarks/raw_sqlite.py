"""The ceiling: SQLite from Python on this machine, with no runtime around it.

One connection, WAL, a minimal job table (rowid, payload, state, due time, lease) with one
index for claims, tiny JSON payloads. These are the limits a durable queue on SQLite can
approach; ``benchmarks.run`` reports every file-store figure as a ratio to them.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Literal

from ._util import scratch

Synchronous = Literal["normal", "full"]


def _connect(synchronous: Synchronous) -> sqlite3.Connection:
    conn = sqlite3.connect(scratch("raw") / "raw.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL, "
        "state TEXT NOT NULL, available_at REAL NOT NULL, lease_until REAL)"
    )
    conn.execute("CREATE INDEX jobs_ready ON jobs(state, available_at, seq)")
    return conn


def insert(
    n: int, per_commit: int, synchronous: Synchronous = "normal", many: bool = False
) -> dict[str, Any]:
    """INSERT ``n`` rows, ``per_commit`` per transaction: one ``execute`` per row, or one
    ``executemany`` per transaction when ``many``."""
    conn = _connect(synchronous)
    rows = [(f'{{"n": {i}}}', "queued", 0.0) for i in range(n)]
    sql = "INSERT INTO jobs (payload, state, available_at) VALUES (?, ?, ?)"
    execute = conn.execute
    start = time.perf_counter()
    for first in range(0, n, per_commit):
        chunk = rows[first : first + per_commit]
        execute("BEGIN")
        if many:
            conn.executemany(sql, chunk)
        else:
            for row in chunk:
                execute(sql, row)
        execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return {"rate": n / elapsed}


def cycle(n: int, per_tx: int, synchronous: Synchronous = "normal") -> dict[str, Any]:
    """The minimal durable enqueue→claim→ack cycle, ``per_tx`` jobs per transaction for
    each step (three commits per ``per_tx`` jobs): insert; claim with
    ``UPDATE … RETURNING`` through the ready index; delete the claimed rows."""
    conn = _connect(synchronous)
    execute = conn.execute
    start = time.perf_counter()
    for first in range(0, n, per_tx):
        count = min(per_tx, n - first)
        execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO jobs (payload, state, available_at) VALUES (?, 'queued', 0)",
            [(f'{{"n": {first + i}}}',) for i in range(count)],
        )
        execute("COMMIT")
        execute("BEGIN IMMEDIATE")
        claimed = execute(
            "UPDATE jobs SET state = 'running', lease_until = 1 WHERE seq IN "
            "(SELECT seq FROM jobs WHERE state = 'queued' AND available_at <= 1 "
            "ORDER BY available_at, seq LIMIT ?) RETURNING seq, payload",
            (count,),
        ).fetchall()
        execute("COMMIT")
        execute("BEGIN IMMEDIATE")
        conn.executemany("DELETE FROM jobs WHERE seq = ?", [(row[0],) for row in claimed])
        execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return {"rate": n / elapsed}
