"""The ceiling: what SQLite from Python does on this machine, with no runtime around it."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any


def _connect(synchronous: str) -> sqlite3.Connection:
    path = Path(tempfile.mkdtemp(prefix="bench-raw-")) / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, payload TEXT, state TEXT, "
        "available_at REAL, lease REAL)"
    )
    conn.execute("CREATE INDEX ix ON jobs(state, available_at, seq)")
    return conn


def insert(
    n: int, per_commit: int, synchronous: str = "NORMAL", many: bool = False
) -> dict[str, Any]:
    """INSERT n rows, committing every ``per_commit`` rows (executemany if ``many``)."""
    conn = _connect(synchronous)
    rows = [(f'{{"n": {i}}}', "queued", 0.0) for i in range(n)]
    sql = "INSERT INTO jobs (payload, state, available_at) VALUES (?, ?, ?)"
    start = time.perf_counter()
    for i in range(0, n, per_commit):
        conn.execute("BEGIN")
        if many:
            conn.executemany(sql, rows[i : i + per_commit])
        else:
            for row in rows[i : i + per_commit]:
                conn.execute(sql, row)
        conn.execute("COMMIT")
    return {"rate": n / (time.perf_counter() - start)}


def cycle(n: int, per_tx: int, synchronous: str = "NORMAL") -> dict[str, Any]:
    """The minimal enqueue→claim→ack cycle: insert, claim with UPDATE…RETURNING, delete;
    ``per_tx`` jobs per transaction for each of the three steps."""
    conn = _connect(synchronous)
    start = time.perf_counter()
    for i in range(0, n, per_tx):
        count = min(per_tx, n - i)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO jobs (payload, state, available_at) VALUES (?, 'queued', 0)",
            [(f'{{"n": {j}}}',) for j in range(count)],
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        claimed = conn.execute(
            "UPDATE jobs SET state = 'running', lease = 1 WHERE seq IN (SELECT seq FROM jobs "
            "WHERE state = 'queued' AND available_at <= 1 ORDER BY available_at, seq LIMIT ?) "
            "RETURNING seq, payload",
            (count,),
        ).fetchall()
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("DELETE FROM jobs WHERE seq = ?", [(r[0],) for r in claimed])
        conn.execute("COMMIT")
    return {"rate": n / (time.perf_counter() - start)}
