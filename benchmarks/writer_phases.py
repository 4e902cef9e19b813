"""What one writer transaction of the end-to-end scenario costs in SQLite, phase by phase.

    python -m benchmarks.writer_phases                 # both synchronous settings
    python -m benchmarks.writer_phases --sync full -n 2000

Replays the file store's own statements (``SQLiteStore._enqueue``, ``_finish``,
``_claim``) on one connection, in transactions shaped like the ones the end-to-end
scenario produces (``profile_e2e`` counts them): 16 enqueued jobs in every transaction,
and in every other one the completion of the jobs claimed last time plus a claim of 32.
No event loop, no writer thread, no futures: the figures are the floor the store's SQL
sets, to compare with the writer thread's CPU per job in ``profile_e2e``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from iii_embedded._ids import new_receipt_id
from iii_embedded._stores import Job, completed_outcome, make_new_job
from iii_embedded._stores._sqlite import SQLiteStore

PHASES = ("begin", "insert", "finish", "claim", "commit")
OWNER = "bench:1:phases"


def run(sync: str, transactions: int, per_tx: int = 16, claim: int = 32) -> dict[str, float]:
    """Microseconds per job spent in each phase."""
    store = SQLiteStore(tempfile.mkdtemp(prefix="iii-phases-"), synchronous=sync)  # type: ignore[arg-type]
    store._open_connection()
    conn = store._conn
    assert conn is not None
    now = time.time()
    store._register_owner(conn, OWNER, now)
    spent = dict.fromkeys(PHASES, 0.0)
    claimed: list[Job] = []
    clock = time.perf_counter
    for i in range(transactions):
        jobs = [
            make_new_job(new_receipt_id(), "default", "noop", '{"n": 1}', None, now, now, 3, None)
            for _ in range(per_tx)
        ]
        t0 = clock()
        conn.execute("BEGIN IMMEDIATE")
        t1 = clock()
        store._enqueue(conn, jobs)
        t2 = t3 = t4 = clock()
        if i % 2:
            if claimed:
                done = [completed_outcome(j.id, OWNER, j.attempts, now, "null") for j in claimed]
                store._finish(conn, done, fifo=False)
            t3 = clock()
            claimed = store._claim(conn, "default", False, claim, now + 1, OWNER, now + 30, now)
            t4 = clock()
        conn.execute("COMMIT")
        t5 = clock()
        steps = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        for name, spent_s in zip(PHASES, steps, strict=True):
            spent[name] += spent_s
    conn.close()
    jobs_total = transactions * per_tx
    return {name: s / jobs_total * 1e6 for name, s in spent.items()}


def main() -> None:
    """Print the phases for each synchronous setting asked for."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.writer_phases")
    parser.add_argument("--sync", choices=("normal", "full", "both"), default="both")
    parser.add_argument("-n", type=int, default=1250, help="transactions (16 jobs each)")
    args = parser.parse_args()
    for sync in ("normal", "full") if args.sync == "both" else (args.sync,):
        phases = run(sync, args.n)
        cells = "  ".join(f"{name} {us:5.2f}" for name, us in phases.items())
        print(f"{sync:6}  µs per job:  {cells}  total {sum(phases.values()):5.2f}")


if __name__ == "__main__":
    main()
