"""The file-based store: one SQLite database in WAL mode, shared safely by processes.

How it works, and why:

* **One writer thread per store.** Every call from the event loop becomes a request on a
  ``queue.SimpleQueue``; the thread takes *all* pending requests, runs them in one
  transaction (``BEGIN IMMEDIATE`` … ``COMMIT``: group commit) and resolves their futures
  on the loop with one ``call_soon_threadsafe``. The requests of one turn of the loop are
  handed over together at the start of the next (or up to two turns later, while other
  tasks are ready to run), after the tasks that turn woke have made theirs: an enqueue
  and the claim of the dispatcher it woke share a transaction. A
  commit costs 30-165 µs here, so many concurrent enqueues, claims and acks share one.
  Each request runs inside its own
  ``SAVEPOINT``: a request that fails (a full disk, a bad batch) is rolled back alone and
  gets its own error while the others commit. Nothing blocking ever runs on the loop.
* **A claim is one statement**: ``UPDATE … WHERE seq IN (SELECT … LIMIT n) RETURNING``, with
  the rows read in full before commit. Standard queues claim through the index
  ``(queue, state, available_at, seq)``: an index range scan whatever the backlog.
* **FIFO heads live in a side table** ``fifo_groups(queue, grp, head_seq)``, kept in the
  same transactions as the jobs: a FIFO claim scans the queue's groups (not its jobs) and
  takes heads that are queued and available. A partial unique index on ``(queue, grp)``
  for running jobs makes a second running job of one group impossible, across processes.
* **Leases**: a claim writes ``lease_owner``/``lease_until``; the runtime renews them while
  handlers run. ``recover`` returns expired leases, and at once the jobs of owners
  (``host:pid:…``) whose process is gone from this host.
* **At ``synchronous: normal``, checkpoints run in a thread of their own.** SQLite's
  automatic checkpoint runs on the connection that commits, so every ~1000 WAL pages one
  commit of the writer also copied the WAL into the database and synced both: at
  ``normal`` those are the only fsyncs, a 2-12 ms stall for every request waiting behind
  it (~0.4% of single enqueues). A second connection checkpoints instead (``PASSIVE``: it
  never blocks the writer) every ``_CHECKPOINT_EVERY`` commits; the writer keeps its
  automatic checkpoint only as a backstop, at ``_BACKSTOP_PAGES``. At ``full`` the writer
  checkpoints as SQLite does by default: every commit syncs the WAL anyway, its
  checkpoints did not stall, and a background one made commits slower (the WAL kept
  growing, and an fsync that extends a file costs more than one that overwrites it).
* The schema is created and migrated with sqlite-utils; ``meta.schema_version`` records it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import logging
import os
import queue
import sqlite3
import stat as stat_module
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlite_utils

from .._errors import StoreClosedError, StoreError, StoreVersionError
from ._base import (
    LOST_ATTEMPT,
    PROCESS_HOST,
    RUNNING_OWNERS,
    UNSTARTED_ATTEMPT,
    CronFire,
    EnqueueClaim,
    ErrorInfo,
    Job,
    JobState,
    NewJob,
    Outcome,
    QueueCounts,
    Renewal,
    make_job,
    never_started,
    restore_converted,
)

__all__ = ["SQLiteStore", "SCHEMA_VERSION", "DB_FILENAME"]

SCHEMA_VERSION = 3
DB_FILENAME = "iii-queue.db"
_MAX_BATCH = 512
# Background checkpoints (``synchronous: normal`` only): a pass every this many write
# commits. Under a light load a pass ends before the next commit and the WAL starts over
# from its beginning.
_CHECKPOINT_EVERY = 100
# SQLite's automatic checkpoint is off on the writer's connection: it would run inside
# whichever commit crosses its threshold, and that commit may run on the event loop
# (``commit_on_loop``). The writer thread checkpoints that connection instead:
# - every this many write commits: at ``full`` about SQLite's default (1,000 pages is ~100
#   commits of the end-to-end benchmark); at ``normal`` the backstop for when the
#   background passes cannot keep up (the WAL cannot start over while a commit lands
#   during every pass);
_OWN_CHECKPOINT_EVERY = {"full": 100, "normal": 1000}
# - and once the log is longer than this, whatever the count (large commits): the WAL
#   file's size is read every ``_WAL_CHECK_EVERY`` write commits, or sooner once they have
#   done ``_WAL_CHECK_WORK`` (request weights: about a page each; a ``stat`` after every
#   commit cost ~10% end to end at ``full``). ``journal_size_limit`` is set to the same
#   figure, so SQLite cuts the file back to it each time the log starts over, and a file
#   longer than that holds a log longer than that. At ``full`` that is SQLite's own
#   figure, 1,000 pages; at ``normal`` 10,000, the backstop.
# A checkpoint that could not copy the whole log (another connection's was running, or a
# reader holds an old snapshot) is asked for again at the next commit, as SQLite does.
_PAGE = 4096
_WAL_LIMIT = {"full": 1_000 * _PAGE, "normal": 10_000 * _PAGE}
_WAL_CHECK_EVERY = 16
_WAL_CHECK_WORK = 256
# A marker on the writer's queue: checkpoint (``_own_checkpoint``).
_CHECKPOINT = object()
# Commits on the event loop (``commit_on_loop``, see ``_hand_over``): only while write
# transactions take at most this long on average (a moving average over the last ~8, on
# either thread; a single stall of 100 ms takes ~12 fast ones to forget). 3 ms, not 1:
# on a CPU ~3x slower than the Xeon the end-to-end benchmark's transactions take
# ~1.1-1.5 ms at ``full``, and a 1 ms budget left 98% of them to the writer (docs/design.md).
_LOOP_BUDGET_S = 0.003
# ... and only while no timer of the loop falls due within this many average transactions,
# so a commit on the loop is unlikely to make a due timer late (a prediction from the
# average: a stall still can).
_TIMER_MARGIN = 2.0
# Until this many commits have fed the average, the guard expects a commit to take the
# whole budget (the average starts at 0 and takes ~8 commits to come up to the real figure).
_WARM_COMMITS = 8
_AVERAGE_WEIGHT = 0.125
# The most work a transaction on the loop may carry: jobs enqueued, outcomes, and the
# most jobs its claims may take, each one more for every 4 KB of payload or output (a
# page of the database), so that large payloads go to the writer.
_LOOP_MAX_WEIGHT = 512
# How many turns of the loop a transaction that could commit on the loop waits for the
# loop's other ready callbacks before it goes to the writer instead.
_LOOP_PUT_OFF = 2
_BUSY_TIMEOUT_MS = 10_000
# Expired runs deleted per transaction by ``prune`` (~2-3 ms each): one DELETE of a million
# rows held the write lock for seconds (every process's enqueues and claims waited) and
# put every page it touched in the WAL at once.
_PRUNE_BATCH = 1000

log = logging.getLogger("iii_embedded.store")
_LIVE = "('queued', 'running', 'held')"
_COLUMNS = (
    "id, queue, function_id, payload, grp, seq, state, attempts, max_attempts, created_at, "
    "available_at, started_at, finished_at, first_failed_at, last_failed_at, error_type, "
    "error_message, error_traceback, output, lease_owner, lease_until, idempotency_key, "
    "cancel_requested"
)
_HOST = PROCESS_HOST
_INSERT_JOBS = (
    "INSERT INTO jobs (id, queue, function_id, payload, grp, state, created_at, "
    "available_at, max_attempts, idempotency_key) VALUES "
)
_JOB_VALUES = "(?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)"  # 9 parameters: 900 per 100 rows
# The same insert when some of its jobs are stored already claimed (``enqueue_claimed``),
# as a prefetching claim would leave them: no ``started_at``, the attempt counted.
_INSERT_CLAIMED = (
    "INSERT INTO jobs (id, queue, function_id, payload, grp, state, created_at, "
    "available_at, max_attempts, idempotency_key, attempts, lease_owner, lease_until) VALUES "
)
_CLAIMED_VALUES = "(?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, 1, ?, ?)"

# counts(): one statement per state, each answered by that state's partial index.
_COUNT_BY_STATE = {
    state: f"SELECT queue, COUNT(*) FROM jobs WHERE state = '{state}' GROUP BY queue"
    for state in ("queued", "running", "held", "dead")
} | {
    # Written so that it implies the finished-jobs index's condition, which SQLite needs
    # to use a partial index (it does not infer it from ``state = 'completed'`` alone).
    "completed": "SELECT queue, COUNT(*) FROM jobs "
    "WHERE state IN ('completed', 'cancelled') AND state = 'completed' GROUP BY queue",
}
_COUNT_DELAYED = (
    "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND queue = ? AND available_at > ?"
)
_OLDEST_QUEUED = "SELECT MIN(available_at) FROM jobs WHERE state = 'queued' AND queue = ?"

T = TypeVar("T")
Conn = sqlite3.Connection


def _row_to_job(row: Sequence[Any]) -> Job:
    error = None
    if row[15] is not None:
        error = ErrorInfo(type=row[15], message=row[16] or "", traceback=row[17] or "")
    return make_job(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        error,
        row[18],
        row[19],
        row[20],
        row[21],
        bool(row[22]),
    )


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    db["jobs"].create(  # type: ignore[union-attr]
        {
            "seq": int,
            "id": str,
            "queue": str,
            "function_id": str,
            "payload": str,
            "grp": str,
            "state": str,
            "attempts": int,
            "max_attempts": int,
            "created_at": float,
            "available_at": float,
            "started_at": float,
            "finished_at": float,
            "first_failed_at": float,
            "last_failed_at": float,
            "error_type": str,
            "error_message": str,
            "error_traceback": str,
            "output": str,
            "lease_owner": str,
            "lease_until": float,
            "idempotency_key": str,
            "cancel_requested": int,
            "dead_seq": int,
        },
        pk="seq",
        not_null={
            "id",
            "queue",
            "function_id",
            "payload",
            "state",
            "attempts",
            "max_attempts",
            "created_at",
            "available_at",
            "cancel_requested",
        },
        defaults={"attempts": 0, "cancel_requested": 0},
    )
    db["fifo_groups"].create(  # type: ignore[union-attr]
        {"queue": str, "grp": str, "head_seq": int},
        pk=("queue", "grp"),
        not_null={"head_seq"},
    )
    db["owners"].create(  # type: ignore[union-attr]
        {"owner": str, "host": str, "pid": int, "started_at": float}, pk="owner"
    )
    db["jobs"].create_index(["id"], unique=True, index_name="ix_jobs_id")  # type: ignore[union-attr]

    # sqlite-utils has no partial indexes; these are plain SQL.
    for sql in (
        # Claims and due times read only queued jobs: running and finished jobs stay out
        # of this index, so acknowledging a job does not touch it.
        "CREATE INDEX ix_jobs_ready ON jobs(queue, available_at, seq) WHERE state = 'queued'",
        # Only FIFO jobs: standard-queue rows (grp NULL) never pay for this index.
        f"CREATE INDEX ix_jobs_group ON jobs(queue, grp, seq) "
        f"WHERE state IN {_LIVE} AND grp IS NOT NULL",
        "CREATE UNIQUE INDEX ix_jobs_one_running_per_group ON jobs(queue, grp) "
        "WHERE state = 'running' AND grp IS NOT NULL",
        "CREATE INDEX ix_jobs_leases ON jobs(lease_until) WHERE state = 'running'",
        "CREATE INDEX ix_jobs_held ON jobs(function_id) WHERE state = 'held'",
        "CREATE INDEX ix_jobs_finished ON jobs(finished_at) "
        "WHERE state IN ('completed', 'cancelled')",
        "CREATE INDEX ix_jobs_dead ON jobs(queue, dead_seq) WHERE state = 'dead'",
        "CREATE INDEX ix_jobs_keys ON jobs(function_id, idempotency_key) "
        "WHERE idempotency_key IS NOT NULL AND state NOT IN ('dead', 'cancelled')",
    ):
        db.execute(sql)


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    # The FIFO index's condition tested ``state IN (...)`` first. SQLite evaluates a partial
    # index's condition on the old and the new row of every UPDATE that changes ``state``,
    # standard-queue rows included, and an IN list is the costly part: a claim and an
    # acknowledgement each cost ~4 µs more per job than with no FIFO index at all. Testing
    # ``grp IS NOT NULL`` first settles it for standard rows at once. Same rows, same
    # queries (they all name ``grp = ?``, which implies it).
    db.execute("DROP INDEX IF EXISTS ix_jobs_group")
    db.execute(
        "CREATE INDEX ix_jobs_group ON jobs(queue, grp, seq) "
        f"WHERE grp IS NOT NULL AND state IN {_LIVE}"
    )


def _migrate_to_3(db: sqlite_utils.Database) -> None:
    # One row per cron job: its last fire time taken and who took it, so that processes
    # sharing the store run each fire once (see ``claim_fire``).
    db["cron_fires"].create(  # type: ignore[union-attr]
        {
            "job_id": str,
            "scheduled": float,
            "owner": str,
            "running": int,
            "lease_until": float,
        },
        pk="job_id",
        not_null={"scheduled", "owner", "running", "lease_until"},
    )


_MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_to_1,
    2: _migrate_to_2,
    3: _migrate_to_3,
}


class _Request:
    __slots__ = ("claim", "durable", "fn", "future", "jobs", "weight", "write")

    def __init__(
        self,
        fn: Callable[[Conn], Any],
        # A concurrent future for a request made on another thread (``enqueue_from_thread``).
        future: asyncio.Future[Any] | concurrent.futures.Future[Any],
        write: bool,
        jobs: list[NewJob] | None = None,
        durable: bool = True,
        weight: int | None = None,
        claim: EnqueueClaim | None = None,
    ) -> None:
        self.fn = fn
        self.future = future
        self.write = write
        # False for writes that may be lost with the machine (a claim, a lease renewal):
        # with synchronous=full their transaction commits without an fsync.
        self.durable = durable
        # For enqueue requests: their jobs, so concurrent enqueues can share one insert.
        self.jobs = jobs
        # How much work the request is (rows written or claimed), for the hot-path
        # requests the event loop may commit itself; None for every other request.
        self.weight = weight
        # For an enqueue that stores jobs claimed: told the outcome once it is settled.
        self.claim = claim


# (future, succeeded, value or error, claim of an ``enqueue_claimed`` or None), per request.
_Results = list[
    tuple[asyncio.Future[Any] | concurrent.futures.Future[Any], bool, Any, EnqueueClaim | None]
]


class _ThreadFuture(concurrent.futures.Future[list[str]]):
    """The future of an enqueue from another thread, with what to call once its jobs are
    committed, before it resolves (``enqueue_from_thread``)."""

    def __init__(self, committed: Callable[[], None] | None) -> None:
        super().__init__()
        self.committed = committed


def _settle_elsewhere(results: _Results) -> _Results:
    """In the thread that committed them: settle the requests made on other threads
    (concurrent futures) and return the rest, for the event loop to settle."""
    rest: _Results = []
    for item in results:
        future, ok, value, _ = item
        if isinstance(future, asyncio.Future):
            rest.append(item)
            continue
        committed = future.committed if isinstance(future, _ThreadFuture) else None
        if ok and committed is not None:
            # Before the caller can resume: what it does next comes after (the queue's
            # wake-up, say), and its jobs are committed even if it gave up waiting.
            committed()
        if future.set_running_or_notify_cancel():  # False: the caller gave up waiting
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
    return rest


def _deliver(results: _Results) -> None:
    for future, ok, value, claim in results:
        if not future.done():
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        if claim is not None:
            # After the caller's future, so the caller resumes before a worker can start
            # the job (a handler that waits for the run it enqueued registers its wait
            # first), and whether or not anyone still waits: a cancelled caller's jobs
            # are stored all the same.
            claim.deliver(claim, claim.stored if ok else None)


def _row_of(job: NewJob) -> tuple[Any, ...]:
    """A new job's values, in the order of ``_INSERT_JOBS``'s columns."""
    return (
        job.id,
        job.queue,
        job.function_id,
        job.payload,
        job.group,
        job.created_at,
        job.available_at,
        job.max_attempts,
        job.idempotency_key,
    )


def _runs(batch: list[_Request]) -> list[list[_Request]]:
    """``batch`` in order, in runs: each run of consecutive enqueues together, every other
    request alone. Merging enqueues across another request would move them before it: a
    claim made before them would see (and take) their jobs, or an enqueue's claim of owed
    jobs ``ahead`` would take one that an earlier claim was meant to."""
    runs: list[list[_Request]] = []
    last: list[_Request] | None = None
    for request in batch:
        if request.jobs is not None and last is not None:
            last.append(request)
            continue
        run = [request]
        runs.append(run)
        last = run if request.jobs is not None else None
    return runs


# Jobs of one enqueue claim (or of none), in order: what ``_enqueue_claimed`` stores.
_Segments = list[tuple[list[NewJob], EnqueueClaim | None]]


def _segments(jobs: list[NewJob], claim: EnqueueClaim) -> _Segments:
    """One ``enqueue_claimed``'s jobs: its first ``claim.count`` claimed, the rest not."""
    count = claim.count
    if count >= len(jobs):
        return [(jobs, claim)]
    return [(jobs[:count], claim), (jobs[count:], None)]


def _segments_of(requests: list[_Request]) -> _Segments | None:
    """The jobs of ``requests`` one after another, in segments: each request's claimed
    jobs (see ``enqueue_claimed``), and the unclaimed jobs between them together; ``None``
    if no request stores claimed jobs."""
    if all(r.claim is None for r in requests):
        return None
    segments: _Segments = []
    unclaimed: list[NewJob] | None = None  # the last segment's, while it has no claim
    for r in requests:
        jobs = r.jobs or []
        claim = r.claim
        count = claim.count if claim is not None else 0
        if count:
            segments.append((jobs[:count] if count < len(jobs) else jobs, claim))
            unclaimed = None
        if count < len(jobs):
            if unclaimed is None:
                unclaimed = []
                segments.append((unclaimed, None))
            unclaimed += jobs[count:] if count else jobs
    return segments


class SQLiteStore:
    """A :class:`~iii_embedded._stores.Store` in ``<directory>/iii-queue.db`` (SQLite, WAL)."""

    shared = True
    claims_on_enqueue = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        synchronous: Literal["normal", "full"] = "normal",
        commit_on_loop: bool = True,
        max_page_count: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        # Absolute: the file's identity is checked by path after each commit (``_file_gone``),
        # and the program may change its working directory meanwhile.
        self.path = self.directory.absolute() / DB_FILENAME
        self.synchronous = synchronous
        self.commit_on_loop = commit_on_loop
        self._max_page_count = max_page_count  # for tests: simulates a full disk
        # _Request, _CHECKPOINT, or None (stop).
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Conn | None = None
        self._identity: tuple[int, int] = (-1, -1)
        self._stat_path = str(self.path)
        """The database file's device and inode when opened (see ``_file_gone``)."""
        self._wal_identity: tuple[int, int] | None = None
        """The same of its -wal file (``None``: there was none to look at)."""
        self._gone_logged = False
        self._owners: set[str] = set()
        self._closed = False
        self._sync_mode = synchronous.upper()
        # Requests made during one turn of the event loop, handed over together at the
        # start of the next, or up to two turns later (see ``_submit``, ``_hand_over``).
        self._outbox: list[_Request] = []
        self._put_off = 0  # turns the hand-over of the outbox waited for a busy loop
        # Requests from other threads go straight to the writer (``enqueue_from_thread``).
        # The gate orders them before the writer's stop; the count tells the writer to look
        # for their futures in a batch.
        self._gate = threading.Lock()
        self._elsewhere = 0
        # Held by whichever thread runs a transaction on the connection: the writer, or a
        # caller of ``enqueue_from_thread`` that found the writer with nothing to do.
        self._conn_lock = threading.Lock()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_wanted = threading.Event()
        self._commits = 0  # write commits (counted with the connection held)
        self.checkpoints = 0
        """Background checkpoint passes run (for tests and benchmarks)."""
        self.own_checkpoints = 0
        """Checkpoints the writer thread ran on its own connection (tests, benchmarks)."""
        self._wal_path = f"{self.path}-wal"
        self._checkpoint_posted = False  # a _CHECKPOINT marker waits for the writer
        self._checkpoint_again = False  # the last one could not copy the whole log
        self._work_since_look = 0  # work committed since the WAL's size was last read
        # Requests of this loop handed to the writer whose results the loop has not yet
        # had back. The loop commits itself only when there are none, so that its
        # transactions never overtake earlier ones.
        self._with_writer = 0
        self.commit_seconds = 0.0
        """Moving average of write transactions' durations, on any thread (seconds)."""
        self._timed_commits = 0  # how many fed it: until ~8 have, the timer guard is cautious
        self.loop_commits = 0
        """Transactions the event loop committed itself (tests, benchmarks)."""
        # Whether the connection's busy timeout is SQLite's wait (``_BUSY_TIMEOUT_MS``) or
        # 0, the loop's (guarded by ``_conn_lock``; see ``_wait_when_busy``).
        self._busy_waits = True

    @property
    def location(self) -> str:
        """The database file's path."""
        return str(self.path)

    # --- plumbing ----------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str) -> StoreError:
        text = str(exc)
        low = text.lower()
        if "disk is full" in low or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            cause = "the disk is full"
        elif "readonly" in low or "read-only" in low:
            cause = "the store is read-only"
        elif isinstance(exc, PermissionError) or "permission" in low:
            cause = "permission denied"
        elif "not a database" in low or "malformed" in low:
            cause = "the file is not a valid SQLite database (corrupt?)"
        elif "unable to open" in low:
            cause = "the database cannot be opened (missing directory, or not writable?)"
        else:
            cause = text
        return StoreError(f"{self.path}: {doing} failed: {cause} ({text})")

    def _submit(
        self,
        fn: Callable[[Conn], T],
        *,
        write: bool = True,
        jobs: list[NewJob] | None = None,
        durable: bool = True,
        weight: int | None = None,
        claim: EnqueueClaim | None = None,
    ) -> asyncio.Future[T]:
        loop = self._loop
        if self._closed or loop is None:
            raise StoreClosedError(f"{self.path}: the store is not open")
        future: asyncio.Future[T] = loop.create_future()
        # Not put on the writer's queue at once: the writer would take it alone as soon as
        # the loop next lets go of the GIL. Requests made in one turn of the loop go to the
        # writer together, in order, at the start of the next turn (or up to two turns
        # later, see ``_hand_over``), after the tasks this turn woke have run. So an
        # enqueue and the claim of the dispatcher it woke share a transaction.
        outbox = self._outbox
        if not outbox:
            loop.call_soon(self._hand_over)
        outbox.append(_Request(fn, future, write, jobs, durable, weight, claim))
        return future

    def _hand_over(self) -> None:
        """Run at the start of the loop turn after requests were made (and again, up to two
        turns later, while other tasks are ready): commit them here, on the loop, when
        that is cheap and safe (``commit_on_loop``), else hand them to the writer thread.

        Handing a transaction to the writer costs two thread wake-ups, writer and then
        loop, ~65 µs each on a VM whose idle CPUs halt, which is more than a small
        transaction's own statements. The loop commits itself only when it has nothing
        else to run this turn (it waits up to two turns for tasks that are ready), the
        requests are hot-path ones (enqueue, claim, finish, renew) with bounded work, the
        writer has nothing of this loop's outstanding and is not in a transaction or about
        to checkpoint, no other process holds the write lock (it is not waited for),
        recent transactions stayed within the budget, and no timer falls due before the
        transaction would likely end (see docs/design.md)."""
        outbox = self._outbox
        may = self.commit_on_loop and self._loop_may_commit(outbox)
        busy = may and self._loop_busy()
        loop = self._loop
        if busy and self._put_off < _LOOP_PUT_OFF and loop is not None:
            # Other tasks are ready to run: let them run first, rather than hand the
            # transaction to the writer (two wake-ups), and look again. What they request
            # joins this transaction. A loop still busy after that leaves it to the
            # writer, so a busy loop delays a commit by a few turns at most.
            self._put_off += 1
            loop.call_soon(self._hand_over)
            return
        self._put_off = 0
        self._outbox = []
        if may and not busy and self._commit_here(outbox):
            return
        self._to_writer(outbox)

    def _loop_busy(self) -> bool:
        """Whether the loop has callbacks ready to run (asyncio's ``_ready`` queue; a loop
        that does not show it, uvloop among them, counts as busy)."""
        ready = getattr(self._loop, "_ready", None)
        return ready is None or bool(ready)

    def _to_writer(self, outbox: list[_Request]) -> None:
        self._with_writer += len(outbox)
        put = self._requests.put
        for request in outbox:
            put(request)

    def _loop_may_commit(self, outbox: list[_Request]) -> bool:
        # While a checkpoint waits for the writer, the loop's transactions queue behind it:
        # taking the connection again and again, the loop would starve the writer of it.
        if self._with_writer or self._checkpoint_posted or self._closed or not outbox:
            return False
        # asyncio's queue of callbacks to run (other loops, uvloop among them, do not
        # show theirs: there the writer always commits). Whether it is empty is for the
        # caller to ask (``_loop_busy``).
        if getattr(self._loop, "_ready", None) is None:
            return False
        weight = 0
        for request in outbox:
            if request.weight is None:
                return False
            weight += request.weight
        if weight > _LOOP_MAX_WEIGHT or self.commit_seconds > _LOOP_BUDGET_S:
            return False
        # asyncio's heap of timers: the earliest first (a cancelled one may still head it
        # until the loop's next turn, which only errs towards the writer).
        loop = self._loop
        timers = getattr(loop, "_scheduled", None)
        if loop is None or timers is None:
            return False
        expected = self.commit_seconds
        if self._timed_commits < _WARM_COMMITS:  # the average does not know commits yet
            expected = max(expected, _LOOP_BUDGET_S)
        try:
            return not timers or (timers[0].when() - loop.time() > expected * _TIMER_MARGIN)
        except Exception:  # a loop whose timers are not asyncio's: leave it to the writer
            return False

    def _commit_here(self, outbox: list[_Request]) -> bool:
        """Run ``outbox`` as one transaction on this (the loop's) thread. False, with
        nothing done, if the connection or the write lock is taken, or if anything fails
        (the writer then runs the batch with its per-request recovery)."""
        if not self._conn_lock.acquire(blocking=False):
            return False
        try:
            conn = self._conn
            if conn is None:
                return False
            start = time.perf_counter()
            try:
                # The loop never waits in SQLite's busy handler. The timeout stays at 0
                # until a writer-side transaction needs it back (``_wait_when_busy``):
                # the loop commits most transactions in a row, and two PRAGMAs around
                # each cost ~15 µs, a fifth of a lone enqueue's commit at ``normal``.
                if self._busy_waits:
                    conn.execute("PRAGMA busy_timeout = 0")
                    self._busy_waits = False
                self._begin(conn, outbox)
            except Exception:  # another process is writing: the writer waits for it
                _roll_back(conn)
                return False
            try:
                results = self._fast_batch(conn, outbox, begun=True)
            except BaseException:  # KeyboardInterrupt on the main thread, say
                _roll_back(conn)  # do not leave the write lock held
                self._to_writer(outbox)  # nothing is lost: the writer runs it again
                raise
            if results is None:
                return False
            if any(r.write for r in outbox):
                self._count_commit(_work(outbox))
            self.loop_commits += 1
        finally:
            self._conn_lock.release()
        self._timed(time.perf_counter() - start)
        _deliver(results)
        return True

    def _wait_when_busy(self, conn: Conn) -> None:
        """With the connection held, off the loop: let SQLite wait (up to its busy
        timeout) for a write lock another process holds, as the writer's transactions do
        (the loop's set it to 0, see ``_commit_here``)."""
        if not self._busy_waits:
            # Never fails in practice; if it did, the transaction would not wait for a lock
            # and its requests would get the error, rather than the writer thread die.
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                self._busy_waits = True

    def _timed(self, seconds: float) -> None:
        """Note how long a write transaction took, on any thread."""
        self.commit_seconds += (seconds - self.commit_seconds) * _AVERAGE_WEIGHT
        self._timed_commits += 1

    def _back_from_writer(self, results: _Results) -> None:
        self._with_writer -= len(results)
        _deliver(results)

    def _begin(self, conn: Conn, batch: list[_Request]) -> None:
        """Start the batch's transaction. With ``synchronous: full``, a batch of only
        non-durable writes commits at ``NORMAL`` (no fsync): a claim lost with the machine
        leaves its job queued, to run again, which at-least-once delivery allows. The next
        durable commit syncs the whole log, those frames included."""
        write = False
        durable = False
        for r in batch:
            write = write or r.write
            durable = durable or (r.write and r.durable)
        if write and self.synchronous == "full":
            mode = "FULL" if durable else "NORMAL"
            if mode != self._sync_mode:
                conn.execute(f"PRAGMA synchronous = {mode}")
                self._sync_mode = mode
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _serve(self) -> None:
        conn = self._conn
        assert conn is not None and self._loop is not None
        loop = self._loop
        get = self._requests.get
        get_nowait = self._requests.get_nowait
        stop = False
        while not stop:
            first = get()
            if first is None:
                break
            if first is _CHECKPOINT:
                self._own_checkpoint(conn)
                continue
            assert isinstance(first, _Request)
            batch = [first]
            checkpoint = False
            while len(batch) < _MAX_BATCH:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if item is _CHECKPOINT:
                    checkpoint = True
                    continue
                assert isinstance(item, _Request)
                batch.append(item)
            write = any(r.write for r in batch)
            with self._conn_lock:
                start = time.perf_counter()
                self._wait_when_busy(conn)
                results = self._run_batch(conn, batch)
                if write:
                    self._count_commit(_work(batch))
            if write:
                self._timed(time.perf_counter() - start)
            if self._elsewhere:
                before = len(results)
                results = _settle_elsewhere(results)
                with self._gate:
                    self._elsewhere -= before - len(results)
            if results:
                with contextlib.suppress(RuntimeError):  # loop closed: nobody waits
                    loop.call_soon_threadsafe(self._back_from_writer, results)
            if checkpoint:  # after the results: their callers need not wait for it
                self._own_checkpoint(conn)

    def _count_commit(self, work: int) -> None:
        """A write committed (with the connection held, on any thread): every
        ``_CHECKPOINT_EVERY`` of them ask the checkpointer for a pass, and ask the writer
        thread for a checkpoint of its own when one is due (see ``_OWN_CHECKPOINT_EVERY``
        and ``_WAL_LIMIT``)."""
        self._commits += 1
        if self._checkpointer is not None and self._commits % _CHECKPOINT_EVERY == 0:
            self._checkpoint_wanted.set()
        if self._checkpoint_posted:
            return
        due = self._checkpoint_again or (
            self._commits % _OWN_CHECKPOINT_EVERY[self.synchronous] == 0
        )
        self._work_since_look += work
        if not due and (
            self._work_since_look >= _WAL_CHECK_WORK or self._commits % _WAL_CHECK_EVERY == 0
        ):
            self._work_since_look = 0
            try:
                due = os.stat(self._wal_path).st_size > _WAL_LIMIT[self.synchronous]
            except OSError:
                return
        if due:
            self._checkpoint_posted = True
            self._requests.put(_CHECKPOINT)

    def _own_checkpoint(self, conn: Conn) -> None:
        """In the writer thread: a ``PASSIVE`` checkpoint on the writer's connection,
        which lets the next write start the WAL over when every frame was copied."""
        with self._conn_lock:
            self._checkpoint_posted = False
            try:
                busy, logged, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error as exc:
                log.debug("%s: checkpoint failed: %s", self.path, exc)
                self._checkpoint_again = True
                return
            self._checkpoint_again = bool(busy) or copied < logged
            if not busy:  # else another connection's checkpoint was running
                self.own_checkpoints += 1

    def _run_batch(self, conn: Conn, batch: list[_Request]) -> _Results:
        # Fast path: the whole batch in one transaction with no savepoints (failures are
        # rare). If any request fails, roll back and run the batch again carefully.
        fast = self._fast_batch(conn, batch)
        if fast is not None:
            return fast
        failed: dict[int, BaseException] = {}
        pending = batch
        merge = True
        while True:
            outcome = self._try_batch(conn, pending, failed, merge)
            if outcome is not None:
                done = {id(r): v for r, v in outcome}
                return [
                    (r.future, False, failed[id(r)], r.claim)
                    if id(r) in failed
                    else (r.future, True, done[id(r)], r.claim)
                    for r in batch
                ]
            # The transaction was lost (SQLite rolls it all back on some errors, a full disk
            # among them): run again without the request that failed, and without merging.
            pending = [r for r in pending if id(r) not in failed]
            merge = False

    def _fast_batch(
        self, conn: Conn, batch: list[_Request], *, begun: bool = False
    ) -> _Results | None:
        """Run every request in one plain transaction (``begun``: already started), in
        the order they were made, each run of consecutive enqueues merged into one insert.
        ``None`` (after a rollback) if anything failed."""
        try:
            if not begun:
                self._begin(conn, batch)
            results: list[Any] = []
            for run in _runs(batch):
                if len(run) > 1:  # enqueues, one after another
                    ids = self._enqueue_run(conn, run)
                    start = 0
                    for request in run:
                        count = len(request.jobs or ())
                        results.append(ids[start : start + count])
                        start += count
                else:
                    results.append(run[0].fn(conn))
            conn.execute("COMMIT")
        except Exception:
            _roll_back(conn)
            return None
        gone = self._file_gone()
        if gone is not None:
            return [(r.future, False, gone, r.claim) for r in batch]
        return [(r.future, True, value, r.claim) for r, value in zip(batch, results, strict=True)]

    def _try_batch(
        self,
        conn: Conn,
        pending: list[_Request],
        failed: dict[int, BaseException],
        merge: bool,
    ) -> list[tuple[_Request, Any]] | None:
        """Run ``pending`` in one transaction, each request in a savepoint. Returns the
        successful (request, value) pairs once committed, or ``None`` if the transaction
        was lost and must be retried without the requests now in ``failed``.

        With ``merge``, each run of consecutive enqueues is first tried as one insert
        (their ids are handed back per request); if that fails they run one by one, so
        only the bad one fails. Requests take effect in the order they were made."""
        if not pending:
            return []
        try:
            self._begin(conn, pending)
        except sqlite3.Error as exc:
            err = self._error(exc, "starting a transaction")
            for r in pending:
                failed[id(r)] = err
            return []
        succeeded: list[tuple[_Request, Any]] = []
        for run in _runs(pending) if merge else [[r] for r in pending]:
            if len(run) > 1:  # enqueues, one after another
                merged = self._merged_enqueue(conn, run)
                if merged is None and not conn.in_transaction:
                    return None
                if merged is not None:
                    succeeded += merged
                    continue
            if not self._try_each(conn, run, succeeded, failed):
                return None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = self._error(exc, "committing")
            for request, _ in succeeded:
                failed[id(request)] = err
            return []
        gone = self._file_gone()
        if gone is not None:
            for request, _ in succeeded:
                failed[id(request)] = gone
            return []
        return succeeded

    def _file_gone(self) -> StoreError | None:
        """After a commit: the error to give its callers if the database file, or its
        -wal file, is no longer the one this store opened (removed, or replaced). SQLite
        keeps writing to an open file that was unlinked, so the commit succeeded into a
        file nobody will open again (a crash loses a WAL's commits not yet copied into the
        database file): no receipt may be handed out for it. Two ``stat`` per commit."""
        try:
            stat = os.stat(self._stat_path)
            same = (stat.st_dev, stat.st_ino) == self._identity
        except OSError:
            same = False
        which, fate = "database file", "this write went with it"
        if same and self._wal_identity is not None:
            which = "database's -wal file"
            fate = (
                "this write is only in the removed file (lost if the process dies; a clean "
                "stop copies it into the database file)"
            )
            try:
                stat = os.stat(self._stat_path + "-wal")
                same = (stat.st_dev, stat.st_ino) == self._wal_identity
            except OSError:
                same = False
        if same:
            return None
        if not self._gone_logged:
            self._gone_logged = True
            log.error(
                "%s: the %s was removed or replaced while the store was open; every write "
                "from now on fails (stop the app, which copies what it wrote into the "
                "database file if that is still in place, and start it again)",
                self.path,
                which,
            )
        return StoreError(
            f"{self.path}: the {which} was removed or replaced while the store was open: {fate}"
        )

    def _try_each(
        self,
        conn: Conn,
        requests: list[_Request],
        succeeded: list[tuple[_Request, Any]],
        failed: dict[int, BaseException],
    ) -> bool:
        """Run ``requests`` one by one, each in a savepoint, into ``succeeded`` or
        ``failed``. False if the transaction was lost."""
        for request in requests:
            try:
                conn.execute("SAVEPOINT req")
                value = request.fn(conn)
                conn.execute("RELEASE req")
                succeeded.append((request, value))
            except Exception as exc:
                failed[id(request)] = (
                    exc if isinstance(exc, StoreError) else self._error(exc, "a store operation")
                )
                if not conn.in_transaction:
                    return False
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO req")
                    conn.execute("RELEASE req")
                if not conn.in_transaction:
                    return False
        return True

    def _merged_enqueue(
        self, conn: Conn, requests: list[_Request]
    ) -> list[tuple[_Request, Any]] | None:
        try:
            conn.execute("SAVEPOINT merged")
            ids = self._enqueue_run(conn, requests)
            conn.execute("RELEASE merged")
        except Exception:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO merged")
                    conn.execute("RELEASE merged")
            return None
        out: list[tuple[_Request, Any]] = []
        start = 0
        for request in requests:
            count = len(request.jobs or ())
            out.append((request, ids[start : start + count]))
            start += count
        return out

    @staticmethod
    def _enqueue_run(conn: Conn, requests: list[_Request]) -> list[str]:
        """Insert the jobs of a run of enqueue requests, in order, as one enqueue's."""
        segments = _segments_of(requests)
        if segments is None:
            return SQLiteStore._enqueue(conn, [job for r in requests for job in (r.jobs or ())])
        return SQLiteStore._enqueue_claimed(conn, segments)

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and start the writer thread."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        await asyncio.get_running_loop().run_in_executor(None, self._open_connection)
        if self.synchronous == "normal":
            self._checkpoint_wanted.clear()
            self._checkpointer = threading.Thread(
                target=self._checkpoint, name=f"iii-sqlite-checkpoint[{self.path}]", daemon=True
            )
            self._checkpointer.start()
        self._thread = threading.Thread(
            target=self._serve, name=f"iii-sqlite[{self.path}]", daemon=True
        )
        self._thread.start()

    def own_thread_ids(self) -> Sequence[int]:
        """The writer thread's native id (the checkpointer runs beside it, unpinned)."""
        thread = self._thread
        return () if thread is None or thread.native_id is None else (thread.native_id,)

    def _checkpoint(self) -> None:
        """The checkpointer thread: a ``PASSIVE`` checkpoint each time the writer asks."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            log.warning(
                "%s: no background checkpoints (%s); the writer checkpoints", self.path, exc
            )
            return
        try:
            while True:
                self._checkpoint_wanted.wait()
                self._checkpoint_wanted.clear()
                if self._closed:
                    return
                try:
                    # fetchall() ends the statement, so this connection holds no read
                    # lock afterwards (one would stop the WAL from starting over).
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:  # the writer's backstop still checkpoints
                    log.debug("%s: background checkpoint failed: %s", self.path, exc)
        finally:
            conn.close()

    def _open_connection(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(
                f"{self.directory}: the store's file_path must be a directory, and this is a "
                "file (the store keeps its database inside it)"
            )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{self.directory}: cannot create the store directory: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.W_OK):
            raise StoreError(f"{self.path}: the store directory is read-only (permission denied)")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StoreError(f"{self.path}: the database file is read-only (permission denied)")
        self._create_file()
        conn: Conn | None = None
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
                # Multi-row statements have one text per row count (up to 100 each).
                cached_statements=512,
            )
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch the database to WAL mode ({mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            # 32 MB of page cache (SQLite's default is 2 MB): with a deep backlog, the
            # index pages a claim and an ack touch stay in memory.
            conn.execute("PRAGMA cache_size = -32768")
            # The writer thread checkpoints instead (see _OWN_CHECKPOINT_EVERY).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT[self.synchronous]}")
            if self._max_page_count is not None:
                conn.execute(f"PRAGMA max_page_count = {int(self._max_page_count)}")
            self._migrate(conn)
            # Through any symbolic link as it points now: a link re-pointed later (a
            # deploy's ``current``) does not make this store's own file look replaced.
            self._stat_path = os.path.realpath(self.path)
            stat = os.stat(self._stat_path)
            self._identity = (stat.st_dev, stat.st_ino)
            try:  # made by the first read, which the migration's check was
                stat = os.stat(self._stat_path + "-wal")
                self._wal_identity = (stat.st_dev, stat.st_ino)
            except OSError:
                self._wal_identity = None
        except StoreError:
            if conn is not None:
                conn.close()
            raise
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise self._error(exc, "opening the store") from None
        self._conn = conn
        # A new connection waits SQLite's busy timeout (set above): a store opened again
        # after the loop set 0 on its last connection must have the loop set it again.
        self._busy_waits = True

    def _create_file(self) -> None:
        """Make the database file if there is none, and refuse an empty one.

        SQLite takes a 0-byte file for a new database and deletes the WAL beside it, which
        holds every commit since the last checkpoint: such a file is damage (a failed copy,
        a ``> file``), never a store. So that no process of ours can see a 0-byte file of
        another that is creating the store, the file is made under a name of its own, with
        its first page written (the switch to WAL mode writes it), and linked into place.
        """
        try:
            stat = os.stat(self.path)
            size: int | None = stat.st_size
        except FileNotFoundError:
            size = None
        except OSError:
            return  # left to SQLite, whose error names the cause
        else:
            if stat_module.S_ISDIR(stat.st_mode):
                raise StoreError(
                    f"{self.path}: this is a directory, where the store keeps its database "
                    "file; move it away, or point file_path at another directory"
                )
        if size == 0:
            raise StoreError(
                f"{self.path}: the database file is empty (0 bytes): it was truncated or "
                "replaced, so the store's jobs are not in it; restore it from a backup "
                "(with its -wal file, if any), or delete it to start an empty store"
            )
        if size is not None:
            return
        draft = self.path.with_name(f"{DB_FILENAME}.new-{os.getpid()}-{threading.get_ident()}")
        try:
            with contextlib.closing(sqlite3.connect(draft, isolation_level=None)) as conn:
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                os.link(draft, self.path)
        except sqlite3.Error as exc:  # a full disk: no file is left that looks damaged
            raise self._error(exc, "creating the store") from None
        except OSError:
            pass  # no hard links on this file system: SQLite makes the file itself
        finally:
            with contextlib.suppress(OSError):
                os.unlink(draft)

    def _migrate(self, conn: Conn) -> None:
        db = sqlite_utils.Database(conn)
        if self._schema_version(conn, db) == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated meanwhile.
            version = self._schema_version(conn, db)
            if version < SCHEMA_VERSION:
                db["meta"].create(  # type: ignore[union-attr]
                    {"key": str, "value": str}, pk="key", if_not_exists=True
                )
                try:
                    for target in range(version + 1, SCHEMA_VERSION + 1):
                        _MIGRATIONS[target](db)
                except sqlite3.Error as exc:  # rolled back below: the store is as it was
                    raise self._error(
                        exc, f"migrating the store from schema version {version}"
                    ) from None
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled it back already
                conn.execute("ROLLBACK")
            raise

    def _schema_version(self, conn: Conn, db: sqlite_utils.Database) -> int:
        """The store's schema version (0: an empty database). Raises for a database that
        is not a store, or one from a newer iii-embedded."""
        tables = set(db.table_names())
        if not tables:
            return 0
        if "meta" not in tables:
            raise StoreError(
                f"{self.path}: this database is not an iii-embedded store "
                f"(it has tables {sorted(tables)} but no schema version); "
                "point file_path at another directory"
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        try:
            version = int(row[0]) if row else 0
        except (TypeError, ValueError):
            raise StoreError(
                f"{self.path}: the store's schema version is {row[0]!r}, not a number "
                "(its meta table was changed by hand?)"
            ) from None
        if version > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.path}: the store has schema version {version}, but this "
                f"iii-embedded understands up to {SCHEMA_VERSION}: upgrade iii-embedded"
            )
        return version

    async def aclose(self) -> None:
        """Finish pending requests, stop the writer thread, close the database."""
        if self._thread is None or self._closed:
            self._closed = True
            return
        if self._owners:
            # Only rows of owners known gone are deleted by others, and an owner in another
            # PID namespace (a container before its restart) never is: each would stay.
            owners = sorted(self._owners)
            with contextlib.suppress(StoreError):  # a failed store closes all the same
                await self._submit(lambda conn: _forget_owners(conn, owners))
        with self._gate:  # requests from other threads now fail instead of waiting forever
            self._closed = True
        outbox, self._outbox = self._outbox, []
        self._to_writer(outbox)
        self._requests.put(None)
        thread = self._thread
        await _join(thread)
        self._thread = None
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            # Closed before the writer's connection, so that the writer's is the last: it
            # then checkpoints the whole WAL and removes it.
            self._checkpoint_wanted.set()
            await _join(checkpointer)
        if self._conn is not None:
            with self._conn_lock:  # a caller committing in its own thread finishes first
                self._conn.close()
                self._conn = None

    # --- producing ---------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[NewJob]) -> asyncio.Future[list[str]]:
        """Store jobs atomically; see :meth:`Store.enqueue`."""
        jobs = list(jobs)
        return self._submit(
            lambda conn: self._enqueue(conn, jobs), jobs=jobs, weight=_jobs_weight(jobs)
        )

    def enqueue_claimed(
        self, jobs: Sequence[NewJob], claim: EnqueueClaim
    ) -> asyncio.Future[list[str]]:
        """Store jobs atomically, the first ``claim.count`` already claimed; see
        :meth:`Store.enqueue_claimed`. The claimed rows go straight into the lease index:
        they never enter the ready index, and no claim statement moves them."""
        jobs = list(jobs)
        return self._submit(
            lambda conn: self._enqueue_claimed(conn, _segments(jobs, claim)),
            jobs=jobs,
            weight=_jobs_weight(jobs),
            claim=claim,
        )

    def enqueue_from_thread(
        self,
        jobs: Sequence[NewJob],
        *,
        inline: bool = False,
        committed: Callable[[], None] | None = None,
    ) -> concurrent.futures.Future[list[str]]:
        """Store jobs atomically from a thread other than the event loop's; see
        :meth:`Store.enqueue_from_thread`. The writer takes them with no hop through the
        loop and resolves the future once they are committed (``committed`` first)."""
        jobs = list(jobs)
        future = _ThreadFuture(committed)
        request = _Request(lambda conn: self._enqueue(conn, jobs), future, True, jobs)
        with self._gate:
            if self._closed or self._thread is None or self._conn is None:
                raise StoreClosedError(f"{self.path}: the store is not open")
            # The writer has nothing to do: commit here, in the caller's thread, and save
            # both wake-ups (as a library that runs SQLite in its caller would). Otherwise
            # the request joins the writer's next batch.
            inline = inline and self._requests.empty() and self._conn_lock.acquire(blocking=False)
            if not inline:
                self._elsewhere += 1
                self._requests.put(request)
                return future
        try:
            start = time.perf_counter()
            self._wait_when_busy(self._conn)
            [(_, ok, value, _)] = self._run_batch(self._conn, [request])
            self._count_commit(len(jobs))
            self._timed(time.perf_counter() - start)
        finally:
            self._conn_lock.release()
        _settle_elsewhere([(future, ok, value, None)])
        return future

    @staticmethod
    def _enqueue(conn: Conn, jobs: list[NewJob]) -> list[str]:
        """Insert ``jobs`` (queued); their ids, or those of the live jobs their idempotency
        keys name."""
        ids: list[str] = []
        rows = []
        taken: dict[tuple[str, str], str] = {}
        for job in jobs:
            if job.idempotency_key is not None:
                key = (job.function_id, job.idempotency_key)
                existing = taken.get(key)
                if existing is None:
                    found = conn.execute(
                        "SELECT id FROM jobs WHERE function_id = ? AND idempotency_key = ? "
                        "AND idempotency_key IS NOT NULL AND state NOT IN ('dead', 'cancelled') "
                        "LIMIT 1",
                        key,
                    ).fetchone()
                    existing = found[0] if found else None
                if existing is not None:
                    ids.append(existing)
                    continue
                taken[key] = job.id
            ids.append(job.id)
            rows.append(_row_of(job))
        # One multi-row statement per 100 jobs, not executemany: sqlite3 lets go of the GIL
        # around every step and must take it back from the busy event-loop thread each
        # time; one step per chunk took the writer's CPU per job down by ~15%.
        for chunk in _chunks(rows, 100):
            conn.execute(
                _INSERT_JOBS + ",".join([_JOB_VALUES] * len(chunk)),
                list(_flatten(chunk)),
            )
        SQLiteStore._index_groups(conn, rows)
        return ids

    @staticmethod
    def _enqueue_claimed(conn: Conn, segments: _Segments) -> list[str]:
        """Insert the jobs of ``segments``: those of a segment with a claim stored claimed,
        each added to the claim's ``stored``; the others as ``_enqueue`` stores them."""
        # In the order the jobs came, so that each job's seq follows it and a claim
        # ``ahead`` takes only jobs stored queued before its own enqueue: the jobs stored
        # queued (idempotency keys included) as any enqueue's, each claim's ``ahead`` jobs
        # just before its own, and the claimed jobs (they carry no idempotency key) as
        # they are, consecutive ones in one statement.
        ids: list[str] = []
        pending: list[tuple[NewJob, EnqueueClaim]] = []  # claimed, not inserted yet
        for segment, claim in segments:
            if claim is None:
                SQLiteStore._insert_claimed(conn, pending)
                ids += SQLiteStore._enqueue(conn, segment)
                continue
            claim.stored = []  # this transaction may be a second try
            if claim.ahead > 0:
                SQLiteStore._insert_claimed(conn, pending)
                claim.stored += SQLiteStore._claim(
                    conn,
                    segment[0].queue,
                    False,
                    claim.ahead,
                    claim.now,
                    claim.owner,
                    claim.lease_until,
                    None,
                )
            for job in segment:
                pending.append((job, claim))
                ids.append(job.id)
        SQLiteStore._insert_claimed(conn, pending)
        return ids

    @staticmethod
    def _insert_claimed(conn: Conn, pending: list[tuple[NewJob, EnqueueClaim]]) -> None:
        """Insert ``pending`` claimed jobs (then empty it), each added to its claim's
        ``stored`` as the record a claim would return."""
        for chunk in _chunks(pending, 100):
            values: list[Any] = []
            for job, claim in chunk:
                values += _row_of(job)
                values += (claim.owner, claim.lease_until)
            seqs = dict(
                conn.execute(
                    _INSERT_CLAIMED
                    + ",".join([_CLAIMED_VALUES] * len(chunk))
                    + " RETURNING id, seq",
                    values,
                ).fetchall()
            )
            for job, claim in chunk:
                claim.stored.append(
                    make_job(
                        job.id,
                        job.queue,
                        job.function_id,
                        job.payload,
                        job.group,
                        seqs[job.id],
                        "running",
                        1,
                        job.max_attempts,
                        job.created_at,
                        job.available_at,
                        None,
                        None,
                        None,
                        None,
                        None,
                        None,
                        claim.owner,
                        claim.lease_until,
                        job.idempotency_key,
                        False,
                    )
                )
        pending.clear()

    @staticmethod
    def _index_groups(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
        """Add the FIFO groups of newly inserted rows to ``fifo_groups``."""
        groups = {(r[1], r[4]) for r in rows if r[4] is not None}
        for q, grp in groups:
            conn.execute(
                "INSERT OR IGNORE INTO fifo_groups(queue, grp, head_seq) "
                f"SELECT ?, ?, MIN(seq) FROM jobs WHERE queue = ? AND grp = ? AND state IN {_LIVE}",
                (q, grp, q, grp),
            )

    # --- consuming ---------------------------------------------------------------------

    async def claim(
        self,
        queue: str,
        *,
        fifo: bool,
        limit: int,
        now: float,
        owner: str,
        lease_until: float,
        start: int | None = None,
    ) -> list[Job]:
        """Claim available jobs; see :meth:`Store.claim`."""
        return await self.exchange(
            [],
            queue,
            fifo=fifo,
            limit=limit,
            now=now,
            owner=owner,
            lease_until=lease_until,
            start=start,
        )

    async def exchange(
        self,
        outcomes: Sequence[Outcome],
        queue: str,
        *,
        fifo: bool,
        limit: int,
        now: float,
        owner: str,
        lease_until: float,
        start: int | None = None,
    ) -> list[Job]:
        """Finish then claim in one transaction; see :meth:`Store.exchange`."""
        outcomes = list(outcomes)
        if limit <= 0 and not outcomes:
            return []
        register = owner not in self._owners
        if register:
            self._owners.add(owner)

        def run(conn: Conn) -> list[Job]:
            if register:
                self._register_owner(conn, owner, now)
            if outcomes:
                self._finish(conn, outcomes, fifo=fifo)
            if limit <= 0:
                return []
            if start is None or start >= limit:
                return self._claim(conn, queue, fifo, limit, now, owner, lease_until, now)
            # The jobs that start at once, then the prefetched ones (no ``started_at``):
            # the second statement takes the next oldest, as one claim of both would.
            jobs = (
                self._claim(conn, queue, fifo, start, now, owner, lease_until, now)
                if start > 0
                else []
            )
            if len(jobs) == start:
                jobs += self._claim(conn, queue, fifo, limit - start, now, owner, lease_until, None)
            return jobs

        # A claim alone need not survive a power loss (see ``_begin``); outcomes must.
        try:
            return await self._submit(
                run, durable=bool(outcomes) or register, weight=_weight(outcomes) + max(0, limit)
            )
        except StoreError:
            restore_converted(outcomes)  # rolled back: they say again what was decided
            raise

    def mark_started(self, job_id: str, owner: str, attempt: int, at: float) -> bool:
        """``False``: starts are written in batches, with the next exchange; see
        :meth:`Store.mark_started`."""
        return False

    @staticmethod
    def _claim(
        conn: Conn,
        queue: str,
        fifo: bool,
        limit: int,
        now: float,
        owner: str,
        lease_until: float,
        started_at: float | None,
    ) -> list[Job]:
        if fifo:
            candidates = (
                "SELECT j.seq FROM fifo_groups g JOIN jobs j ON j.seq = g.head_seq "
                "WHERE g.queue = ? AND j.state = 'queued' AND j.available_at <= ? "
                "ORDER BY j.available_at, j.seq LIMIT ?"
            )
            own = ""
        else:
            candidates = (
                "SELECT seq FROM jobs WHERE queue = ? AND state = 'queued' "
                "AND available_at <= ? ORDER BY available_at, seq LIMIT ?"
            )
            # Jobs of FIFO groups (stored by a process that configures this queue FIFO)
            # are for FIFO claims only, as in memory. Tested on the rows the update reads
            # anyway, not in the candidates' index-only scan: such jobs among the oldest
            # candidates make the claim come back short, which only a store shared by
            # processes that disagree on the queue's type can see (docs/design.md).
            own = " AND grp IS NULL"
        rows = conn.execute(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, "
            f"lease_owner = ?, lease_until = ? WHERE seq IN ({candidates}){own} "
            f"RETURNING {_COLUMNS}",
            (started_at, owner, lease_until, queue, now, limit),
        ).fetchall()
        jobs = [_row_to_job(r) for r in rows]
        jobs.sort(key=lambda j: (j.available_at, j.seq))
        return jobs

    @staticmethod
    def _register_owner(conn: Conn, owner: str, now: float) -> None:
        host, pid = _parse_owner(owner)
        conn.execute(
            "INSERT OR IGNORE INTO owners(owner, host, pid, started_at) VALUES (?, ?, ?, ?)",
            (owner, host, pid, now),
        )

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        """Apply outcomes; see :meth:`Store.finish`."""
        outcomes = list(outcomes)
        if outcomes:
            try:
                await self._submit(
                    lambda conn: self._finish(conn, outcomes), weight=_weight(outcomes)
                )
            except StoreError:
                restore_converted(outcomes)  # rolled back: they say again what was decided
                raise

    def _finish(self, conn: Conn, outcomes: list[Outcome], *, fifo: bool = True) -> None:
        """Apply outcomes. ``fifo=False`` (a standard queue's batch) skips the FIFO group
        bookkeeping, which only jobs with a group need."""
        retries, dead, released, held, cancelled, starts = [], [], [], [], [], []
        by_seq: list[tuple[Any, ...]] = []  # completions that know their job's rowid
        by_id: list[tuple[Any, ...]] = []
        for o in outcomes:
            if o.converted_from == "retry":
                # Converted by an earlier run of this write that was rolled back (another
                # request of its batch failed): a retry again, to be written with its
                # error. (A converted released or held outcome is written the same either
                # way: cancelled, unstarted.)
                o.kind, o.converted_from = "retry", None
            if o.kind == "completed":
                row = (o.output, o.at, o.seq, o.owner, o.attempt, o.job_id, o.started_at)
                (by_id if o.seq is None else by_seq).append(row)
                continue
            match = (o.job_id, o.owner, o.attempt)
            if o.kind == "started":
                starts.append((o.at, *match))
            elif o.kind == "retry":
                e = o.error
                retries.append(
                    (
                        e.type if e else None,
                        e.message if e else None,
                        e.traceback if e else None,
                        o.at,
                        o.at,
                        o.available_at if o.available_at is not None else o.at,
                        o.started_at,
                        *match,
                    )
                )
            elif o.kind == "dead":
                dead.append((o, match))
            elif o.kind == "released":
                released.append(match)
            elif o.kind == "held":
                held.append(match)
            else:
                cancelled.append((o.at, 0 if o.started else 1, *match))
        failed_cancelled: list[tuple[Any, ...]] = []
        if released or held or retries:
            failed_cancelled = self._cancel_flagged(
                conn, outcomes, released, held, retries, cancelled
            )
        lease = "state = 'running' AND id = ? AND lease_owner = ? AND attempts = ?"
        touched: list[tuple[str, str]] = []
        if starts:  # prefetched jobs whose handlers started (they stay running)
            conn.executemany(
                f"UPDATE jobs SET started_at = ? WHERE {lease} AND started_at IS NULL", starts
            )
        if by_seq or by_id:
            if fifo:
                touched += self._groups_of(conn, [row[5] for row in by_seq + by_id])
            # One UPDATE ... FROM (VALUES ...) per 100 outcomes (see ``_enqueue``). A job
            # whose seq is known is found by its rowid; the id index is not read. That
            # matters once the id index outgrows the cache: ids of older stores (random
            # version-4 UUIDs) put every lookup on a different page. The id is still
            # checked on the row ("+": not through ix_jobs_id), as SQLite reuses the rowids
            # of pruned jobs.
            for rows, key in (
                (by_seq, "jobs.seq = v.column3 AND +jobs.id = v.column6"),
                (by_id, "jobs.id = v.column6"),
            ):
                for chunk in _chunks(rows, 100):
                    conn.execute(
                        "UPDATE jobs SET state = 'completed', output = v.column1, "
                        "finished_at = v.column2, lease_owner = NULL, lease_until = NULL, "
                        "started_at = COALESCE(jobs.started_at, v.column7) "
                        "FROM (VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk)) + ") "
                        f"AS v WHERE {key} AND jobs.state = 'running' "
                        "AND jobs.lease_owner = v.column4 AND jobs.attempts = v.column5",
                        list(_flatten(chunk)),
                    )
        if retries:
            conn.executemany(
                "UPDATE jobs SET state = 'queued', error_type = ?, error_message = ?, "
                "error_traceback = ?, first_failed_at = COALESCE(first_failed_at, ?), "
                "last_failed_at = ?, available_at = ?, lease_owner = NULL, lease_until = NULL, "
                f"started_at = COALESCE(started_at, ?) WHERE {lease}",
                retries,
            )
        if failed_cancelled:  # retries of jobs whose cancel was asked: cancelled now
            if fifo:
                touched += self._groups_of(conn, [row[7] for row in failed_cancelled])
            conn.executemany(
                "UPDATE jobs SET state = 'cancelled', error_type = ?, error_message = ?, "
                "error_traceback = ?, first_failed_at = COALESCE(first_failed_at, ?), "
                "last_failed_at = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL, "
                f"started_at = COALESCE(started_at, ?) WHERE {lease}",
                failed_cancelled,
            )
        if released:
            conn.executemany(
                "UPDATE jobs SET state = 'queued', attempts = MAX(0, attempts - 1), "
                f"started_at = NULL, lease_owner = NULL, lease_until = NULL WHERE {lease}",
                released,
            )
        if held:
            conn.executemany(
                "UPDATE jobs SET state = 'held', attempts = MAX(0, attempts - 1), "
                f"started_at = NULL, lease_owner = NULL, lease_until = NULL WHERE {lease}",
                held,
            )
        if cancelled:
            if fifo:
                touched += self._groups_of(conn, [c[2] for c in cancelled])
            conn.executemany(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, "
                "attempts = MAX(0, attempts - ?), lease_owner = NULL, lease_until = NULL "
                f"WHERE {lease}",
                cancelled,
            )
        for o, match in dead:
            if fifo:
                touched += self._groups_of(conn, [o.job_id])
            self._bury(conn, o.error, o.at, f"WHERE {lease}", match, o.started_at)
        self._refresh_groups(conn, touched)

    @staticmethod
    def _cancel_flagged(
        conn: Conn,
        outcomes: list[Outcome],
        released: list[tuple[Any, ...]],
        held: list[tuple[Any, ...]],
        retries: list[tuple[Any, ...]],
        cancelled: list[tuple[Any, ...]],
    ) -> list[tuple[Any, ...]]:
        """Jobs settled ``released`` or ``held`` (they never started) whose cancel was
        asked meanwhile are written ``cancelled`` instead, unstarted: a cancel that said it
        would stop them must not leave them queued, or held for a function that may never
        come. A ``retry`` of such a job (its attempt failed before the stop reached it)
        ends ``cancelled`` too, rather than wait out its backoff queued: those are taken
        out of ``retries`` and returned, to be written with their error. The outcomes are
        changed to say so, for the runner's hooks."""
        matches = {m[0]: m for m in released + held}
        matches.update((r[7], r[7:]) for r in retries)
        flagged: set[str] = set()
        for chunk in _chunks(list(matches), 500):
            marks = ",".join("?" * len(chunk))
            for job_id, owner, attempts in conn.execute(
                f"SELECT id, lease_owner, attempts FROM jobs WHERE id IN ({marks}) "
                "AND state = 'running' AND cancel_requested = 1",
                chunk,
            ):
                if matches[job_id][1:] == (owner, attempts):
                    flagged.add(job_id)
        if not flagged:
            return []
        for o in outcomes:
            if o.kind in ("released", "held") and o.job_id in flagged:
                o.converted_from = o.kind
                o.kind = "cancelled"
                o.started = False
                cancelled.append((o.at, 1, o.job_id, o.owner, o.attempt))
            elif o.kind == "retry" and o.job_id in flagged:
                o.converted_from = o.kind
                o.kind = "cancelled"
        released[:] = [m for m in released if m[0] not in flagged]
        held[:] = [m for m in held if m[0] not in flagged]
        # A retry's values: error (3), first and last failed at, available_at, started_at,
        # then the lease match. Written cancelled, ``finished_at`` takes available_at's place.
        failed = [(*r[:5], r[4], *r[6:]) for r in retries if r[7] in flagged]
        retries[:] = [r for r in retries if r[7] not in flagged]
        return failed

    @staticmethod
    def _groups_of(conn: Conn, ids: list[str]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            out += conn.execute(
                f"SELECT queue, grp FROM jobs WHERE id IN ({marks}) AND grp IS NOT NULL", chunk
            ).fetchall()
        return out

    @staticmethod
    def _refresh_groups(conn: Conn, groups: Sequence[tuple[str, str]]) -> None:
        for q, grp in set(groups):
            row = conn.execute(
                f"SELECT MIN(seq) FROM jobs WHERE queue = ? AND grp = ? AND state IN {_LIVE}",
                (q, grp),
            ).fetchone()
            if row is None or row[0] is None:
                conn.execute("DELETE FROM fifo_groups WHERE queue = ? AND grp = ?", (q, grp))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO fifo_groups(queue, grp, head_seq) VALUES (?, ?, ?)",
                    (q, grp, row[0]),
                )

    @staticmethod
    def _bury(
        conn: Conn,
        error: ErrorInfo | None,
        at: float,
        where: str,
        params: Sequence[Any],
        started_at: float | None = None,
    ) -> None:
        conn.execute(
            "UPDATE jobs SET state = 'dead', error_type = ?, error_message = ?, "
            "error_traceback = ?, first_failed_at = COALESCE(first_failed_at, ?), "
            "last_failed_at = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL, "
            "started_at = COALESCE(started_at, ?), "
            "dead_seq = (SELECT COALESCE(MAX(dead_seq), 0) + 1 FROM jobs WHERE state = 'dead') "
            f"{where}",
            (
                error.type if error else None,
                error.message if error else None,
                error.traceback if error else None,
                at,
                at,
                at,
                started_at,
                *params,
            ),
        )

    async def renew(self, owner: str, job_ids: Sequence[str], lease_until: float) -> Renewal:
        """Extend leases; see :meth:`Store.renew`."""
        ids = list(job_ids)

        def run(conn: Conn) -> Renewal:
            renewal = Renewal(lost=set(ids))
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"UPDATE jobs SET lease_until = ? WHERE id IN ({marks}) "
                    "AND state = 'running' AND lease_owner = ? RETURNING id, cancel_requested",
                    (lease_until, *chunk, owner),
                ).fetchall()
                for job_id, cancel_requested in rows:
                    renewal.lost.discard(job_id)
                    if cancel_requested:
                        renewal.cancelled.add(job_id)
            return renewal

        # A lease lost with the machine is moot: no fsync.
        return await self._submit(run, durable=False, weight=len(ids))

    async def claim_fire(
        self, job_id: str, scheduled: float, *, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a cron fire; see :meth:`Store.claim_fire`. A fire still marked running
        does not block the next one if its owner's process is gone (on this host)."""

        def run(conn: Conn) -> bool:
            last = conn.execute(
                "SELECT scheduled, owner, running, lease_until FROM cron_fires WHERE job_id = ?",
                (job_id,),
            ).fetchone()
            if last is not None:
                last_scheduled, last_owner, running, last_until = last
                if last_scheduled >= scheduled:
                    return False
                if self._fire_holds(running, last_until, last_owner, now):
                    return False
            conn.execute(
                "INSERT INTO cron_fires(job_id, scheduled, owner, running, lease_until) "
                "VALUES (?, ?, ?, 1, ?) ON CONFLICT(job_id) DO UPDATE SET "
                "scheduled = excluded.scheduled, owner = excluded.owner, running = 1, "
                "lease_until = excluded.lease_until",
                (job_id, scheduled, owner, lease_until),
            )
            return True

        # Lost with the machine, a fire taken is simply taken again by nobody: its time
        # has passed when the machine is back.
        return await self._submit(run, durable=False)

    def _fire_holds(self, running: int, lease_until: float, owner: str, now: float) -> bool:
        """Whether a cron job's last fire still holds back its next one: running, its lease
        live, and its owner's process not known to be gone."""
        return bool(running) and lease_until > now and _owner_alive(owner, self._owners)

    async def renew_fires(self, owner: str, job_ids: Sequence[str], lease_until: float) -> None:
        """Extend cron fire leases; see :meth:`Store.renew_fires`."""
        ids = list(job_ids)

        def run(conn: Conn) -> None:
            conn.executemany(
                "UPDATE cron_fires SET lease_until = ? "
                "WHERE job_id = ? AND owner = ? AND running = 1",
                [(lease_until, job_id, owner) for job_id in ids],
            )

        if ids:
            await self._submit(run, durable=False)

    async def end_fires(self, owner: str, job_ids: Sequence[str]) -> None:
        """Mark cron fires finished; see :meth:`Store.end_fires`."""
        ids = list(job_ids)

        def run(conn: Conn) -> None:
            conn.executemany(
                "UPDATE cron_fires SET running = 0 WHERE job_id = ? AND owner = ?",
                [(job_id, owner) for job_id in ids],
            )

        if ids:
            await self._submit(run, durable=False)

    async def list_fires(self, now: float) -> list[CronFire]:
        """The last fire of each cron job; see :meth:`Store.list_fires`."""

        def run(conn: Conn) -> list[CronFire]:
            rows = conn.execute(
                "SELECT job_id, scheduled, owner, running, lease_until FROM cron_fires "
                "ORDER BY job_id"
            ).fetchall()
            return [
                CronFire(
                    job_id=job_id,
                    scheduled=scheduled,
                    owner=owner,
                    running=bool(running),
                    lease_until=until,
                    holds=self._fire_holds(running, until, owner, now),
                )
                for job_id, scheduled, owner, running, until in rows
            ]

        return await self._submit(run, write=False)

    async def recover(self, now: float) -> list[Job]:
        """Return expired leases and dead processes' jobs; see :meth:`Store.recover`."""
        return await self._submit(lambda conn: self._recover(conn, now))

    def _recover(self, conn: Conn, now: float) -> list[Job]:
        gone = [
            owner
            for (owner,) in conn.execute("SELECT owner FROM owners").fetchall()
            if not _owner_alive(owner, self._owners)
        ]
        expired = conn.execute(
            "SELECT seq FROM jobs WHERE state = 'running' AND lease_until <= ?", (now,)
        ).fetchall()
        seqs = {r[0] for r in expired}
        for chunk in _chunks(gone, 500):
            marks = ",".join("?" * len(chunk))
            seqs.update(
                r[0]
                for r in conn.execute(
                    f"SELECT seq FROM jobs WHERE state = 'running' AND lease_owner IN ({marks})",
                    chunk,
                ).fetchall()
            )
            conn.execute(f"DELETE FROM owners WHERE owner IN ({marks})", chunk)
        moved: list[Job] = []
        touched: list[tuple[str, str]] = []
        for seq in sorted(seqs):
            attempts, max_attempts, queue, grp, started_at, error_type = conn.execute(
                "SELECT attempts, max_attempts, queue, grp, started_at, error_type "
                "FROM jobs WHERE seq = ?",
                (seq,),
            ).fetchone()
            if grp is not None:
                touched.append((queue, grp))
            refund = never_started(started_at, error_type)
            error = UNSTARTED_ATTEMPT if refund else LOST_ATTEMPT
            if attempts >= max_attempts and not refund:
                self._bury(conn, error, now, "WHERE seq = ?", (seq,))
            else:
                conn.execute(
                    "UPDATE jobs SET state = 'queued', attempts = attempts - ?, "
                    "error_type = ?, error_message = ?, error_traceback = '', "
                    "available_at = ?, lease_owner = NULL, lease_until = NULL WHERE seq = ?",
                    (1 if refund else 0, error.type, error.message, now, seq),
                )
            moved.append(
                _row_to_job(
                    conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE seq = ?", (seq,)).fetchone()
                )
            )
        self._refresh_groups(conn, touched)
        return moved

    async def release_held(
        self, function_ids: Sequence[str], queues: Sequence[str] | None = None
    ) -> int:
        """Un-hold jobs of registered functions; see :meth:`Store.release_held`."""
        ids = list(function_ids)
        names = None if queues is None else list(queues)

        def run(conn: Conn) -> int:
            count = 0
            where, extra = "", []
            if names is not None:
                if not names:
                    return 0
                where = f" AND queue IN ({','.join('?' * len(names))})"
                extra = names
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                count += conn.execute(
                    f"UPDATE jobs SET state = 'queued' WHERE state = 'held' "
                    f"AND function_id IN ({marks}){where}",
                    [*chunk, *extra],
                ).rowcount
            return count

        return await self._submit(run)

    async def mistyped_queues(self, fifo: Sequence[str], standard: Sequence[str]) -> list[str]:
        """Queues whose live jobs are of the other type; see :meth:`Store.mistyped_queues`.
        A standard queue costs one probe of the group index. A FIFO queue's live jobs are
        counted, and those with a group: through indexes alone (the ready and group
        indexes, and the few running and held jobs), not by reading every row of the
        table, finished runs included (a start's cost, not a claim's)."""
        fifo_names, standard_names = list(fifo), list(standard)

        def count(conn: Conn, sql: str, name: str) -> int:
            (n,) = conn.execute(sql, (name,)).fetchone()
            return int(n)

        def run(conn: Conn) -> list[str]:
            found = [
                name
                for name in standard_names
                if conn.execute(
                    f"SELECT 1 FROM jobs WHERE queue = ? AND grp IS NOT NULL "
                    f"AND state IN {_LIVE} LIMIT 1",
                    (name,),
                ).fetchone()
            ]
            for name in fifo_names:
                live = sum(
                    count(
                        conn,
                        f"SELECT COUNT(*) FROM jobs WHERE state = '{state}' AND queue = ?",
                        name,
                    )
                    for state in ("queued", "running", "held")
                )
                grouped = count(
                    conn,
                    f"SELECT COUNT(*) FROM jobs WHERE queue = ? AND grp IS NOT NULL "
                    f"AND state IN {_LIVE}",
                    name,
                )
                if live > grouped:
                    found.append(name)
            return sorted(found)

        return await self._submit(run, write=False)

    async def next_available_at(self, queue: str, now: float) -> float | None:
        """Earliest future availability; see :meth:`Store.next_available_at`."""

        def run(conn: Conn) -> float | None:
            fifo = conn.execute("SELECT 1 FROM fifo_groups WHERE queue = ? LIMIT 1", (queue,))
            if fifo.fetchone():
                # A FIFO queue: only a group's head can become available, so a job
                # delayed behind a head that is due later is not a time to wake for (the
                # in-memory store's heap of heads answers so too).
                row = conn.execute(
                    "SELECT MIN(j.available_at) FROM fifo_groups g "
                    "JOIN jobs j ON j.seq = g.head_seq WHERE g.queue = ? "
                    "AND j.state = 'queued' AND j.available_at > ?",
                    (queue, now),
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT MIN(available_at) FROM jobs WHERE queue = ? AND state = 'queued' "
                    "AND available_at > ?",
                    (queue, now),
                ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        # One index probe (the ready index, in order), or a FIFO queue's groups: the loop
        # may run it too.
        return await self._submit(run, write=False, weight=1)

    async def next_delayed_at(self, queue: str, after: float) -> float | None:
        """Earliest availability of a delayed job; see :meth:`Store.next_delayed_at`."""

        def run(conn: Conn) -> float | None:
            # The ready index in order, from ``after``: the jobs enqueued since the
            # caller's last claim (available when stored) are passed over, and are few.
            row = conn.execute(
                "SELECT available_at FROM jobs WHERE queue = ? AND state = 'queued' "
                "AND available_at > ? AND available_at > created_at "
                "ORDER BY available_at LIMIT 1",
                (queue, after),
            ).fetchone()
            return None if row is None else float(row[0])

        return await self._submit(run, write=False, weight=1)

    # --- runs --------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id; see :meth:`Store.get`."""

        def run(conn: Conn) -> Job | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _row_to_job(row) if row else None

        return await self._submit(run, write=False)

    async def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The states of the runs that exist; see :meth:`Store.states`."""
        wanted = list(dict.fromkeys(job_ids))

        def run(conn: Conn) -> dict[str, str]:
            found: dict[str, str] = {}
            for chunk in _chunks(wanted, 500):
                marks = ",".join("?" * len(chunk))
                found.update(
                    conn.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk)
                )
            return found

        return await self._submit(run, write=False)

    async def key_holders(self, function_id: str, keys: Sequence[str]) -> list[Job]:
        """The runs holding these keys; see :meth:`Store.key_holders`."""
        wanted = list(dict.fromkeys(keys))

        def run(conn: Conn) -> list[Job]:
            found: list[Job] = []
            for chunk in _chunks(wanted, 500):
                marks = ",".join("?" * len(chunk))
                found += map(
                    _row_to_job,
                    conn.execute(  # the condition of ix_jobs_keys, which answers it
                        f"SELECT {_COLUMNS} FROM jobs WHERE function_id = ? "
                        f"AND idempotency_key IN ({marks}) AND idempotency_key IS NOT NULL "
                        "AND state NOT IN ('dead', 'cancelled')",
                        [function_id, *chunk],
                    ).fetchall(),
                )
            return found

        return await self._submit(run, write=False)

    async def cancel(self, job_id: str, now: float, owner: str | None = None) -> Job | None:
        """Cancel a run; see :meth:`Store.cancel` (``owner`` matters only in memory)."""

        def run(conn: Conn) -> Job | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            before = _row_to_job(row)
            if before.state in ("queued", "held"):
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?",
                    (now, job_id),
                )
                if before.group is not None:
                    self._refresh_groups(conn, [(before.queue, before.group)])
            elif before.state == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return before

        return await self._submit(run)

    async def prune(self, finished_before: float) -> int:
        """Forget finished runs; see :meth:`Store.prune`. At most ``_PRUNE_BATCH`` rows
        a transaction, so that other writes get in between."""

        def run(conn: Conn) -> int:
            return conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs "
                "WHERE state IN ('completed', 'cancelled') AND finished_at < ? LIMIT ?)",
                (finished_before, _PRUNE_BATCH),
            ).rowcount

        pruned = 0
        while True:
            deleted = await self._submit(run)
            pruned += deleted
            if deleted < _PRUNE_BATCH:
                return pruned

    # --- dead-letter queue -------------------------------------------------------------

    async def list_dead(self, queue: str, *, offset: int = 0, limit: int = 100) -> list[Job]:
        """Dead jobs, oldest failure first; see :meth:`Store.list_dead`."""
        return await self._submit(
            lambda conn: [
                _row_to_job(r)
                for r in conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE queue = ? AND state = 'dead' "
                    "ORDER BY dead_seq LIMIT ? OFFSET ?",
                    (queue, limit, offset),
                ).fetchall()
            ],
            write=False,
        )

    async def dead_ids(self, queue: str) -> list[str]:
        """Every dead job's id, oldest failure first; see :meth:`Store.dead_ids`."""
        return await self._submit(lambda conn: self._dead_ids(conn, queue, None), write=False)

    @staticmethod
    def _dead_ids(conn: Conn, queue: str, job_ids: Sequence[str] | None) -> list[str]:
        if job_ids is None:
            return [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE queue = ? AND state = 'dead' ORDER BY dead_seq",
                    (queue,),
                ).fetchall()
            ]
        found: list[tuple[str, int]] = []
        for chunk in _chunks(list(dict.fromkeys(job_ids)), 500):
            marks = ",".join("?" * len(chunk))
            found += conn.execute(
                f"SELECT id, dead_seq FROM jobs WHERE queue = ? AND state = 'dead' "
                f"AND id IN ({marks})",
                (queue, *chunk),
            ).fetchall()
        # Oldest failure first across every chunk, as the in-memory store answers.
        found.sort(key=lambda r: r[1])
        return [r[0] for r in found]

    async def redrive(self, queue: str, job_ids: Sequence[str] | None, now: float) -> list[str]:
        """Send dead jobs back to the tail of their queue; see :meth:`Store.redrive`."""

        def run(conn: Conn) -> list[str]:
            ids = self._dead_ids(conn, queue, job_ids)
            groups: list[tuple[str, str]] = []
            for job_id in ids:
                # A new rowid is a new, later seq: the job joins the tail of its group.
                row = conn.execute(
                    "SELECT grp, function_id, idempotency_key FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                key = row[2]
                if (
                    key is not None
                    and conn.execute(
                        "SELECT 1 FROM jobs WHERE function_id = ? AND idempotency_key = ? "
                        "AND state NOT IN ('dead', 'cancelled') LIMIT 1",
                        (row[1], key),
                    ).fetchone()
                ):
                    key = None  # a newer live run owns the key now
                conn.execute(
                    "INSERT INTO jobs (id, queue, function_id, payload, grp, state, attempts, "
                    "max_attempts, created_at, available_at, first_failed_at, last_failed_at, "
                    "error_type, error_message, error_traceback, idempotency_key, "
                    "cancel_requested) "
                    "SELECT '~' || id, queue, function_id, payload, grp, 'queued', 0, "
                    "max_attempts, created_at, ?, first_failed_at, last_failed_at, error_type, "
                    "error_message, error_traceback, ?, 0 FROM jobs WHERE id = ?",
                    (now, key, job_id),
                )
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                conn.execute("UPDATE jobs SET id = ? WHERE id = ?", (job_id, "~" + job_id))
                if row[0] is not None:
                    groups.append((queue, row[0]))
            self._refresh_groups(conn, groups)
            return ids

        return await self._submit(run)

    async def discard(self, queue: str, job_ids: Sequence[str] | None) -> list[str]:
        """Delete dead jobs; see :meth:`Store.discard`."""

        def run(conn: Conn) -> list[str]:
            ids = self._dead_ids(conn, queue, job_ids)
            for chunk in _chunks(ids, 500):
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", chunk)
            return ids

        return await self._submit(run)

    # --- inspection --------------------------------------------------------------------

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        """Counts per queue; see :meth:`Store.counts`.

        Counting reads an index entry per job (~60 ms for a million queued jobs), so it
        does not run on the writer thread, where it would hold up every enqueue, claim and
        acknowledgement meanwhile. It reads the last committed state on a connection of
        its own, in a worker thread; WAL lets it read while the writer commits."""
        if self._closed or self._loop is None:
            raise StoreClosedError(f"{self.path}: the store is not open")
        return await self._loop.run_in_executor(None, self._read_aside, self._count, now)

    def _read_aside(self, fn: Callable[[Conn, float], T], now: float) -> T:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            try:
                conn.execute("PRAGMA query_only = 1")
                return fn(conn, now)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise self._error(exc, "reading the counts") from None

    @staticmethod
    def _count(conn: Conn, now: float) -> dict[str, QueueCounts]:
        # Each state is counted through its partial index, never by scanning the table:
        # queued jobs through the ready index alone (it holds the queue and the due time),
        # so a backlog of a million costs ~60 ms rather than the ~650 ms of a table scan.
        # One read transaction: every statement sees the same snapshot.
        conn.execute("BEGIN")
        try:
            fields: dict[str, dict[str, Any]] = {}
            for state, sql in _COUNT_BY_STATE.items():
                for queue, n in conn.execute(sql):
                    fields.setdefault(queue, {})[state] = n
            for queue, f in fields.items():
                if not f.get("queued"):
                    continue
                (delayed,) = conn.execute(_COUNT_DELAYED, (queue, now)).fetchone()
                (oldest,) = conn.execute(_OLDEST_QUEUED, (queue,)).fetchone()
                f["ready"] = f["queued"] - delayed
                f["delayed"] = delayed
                # The oldest queued job is the oldest ready one, unless it is not due yet
                # (then none is).
                f["oldest_ready_at"] = oldest if oldest <= now else None
        finally:
            conn.execute("COMMIT")
        return {
            queue: QueueCounts(
                ready=f.get("ready", 0),
                delayed=f.get("delayed", 0),
                running=f.get("running", 0),
                held=f.get("held", 0),
                dead=f.get("dead", 0),
                completed=f.get("completed", 0),
                oldest_ready_at=f.get("oldest_ready_at"),
            )
            for queue, f in fields.items()
        }

    async def list_jobs(
        self, queue: str | None = None, state: JobState | None = None, *, limit: int | None = 1000
    ) -> list[Job]:
        """Jobs by queue and state in ``seq`` order; see :meth:`Store.list_jobs`."""
        where, params = [], []
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return await self._submit(
            lambda conn: [
                _row_to_job(r)
                for r in conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY seq LIMIT ?",
                    (*params, -1 if limit is None else limit),
                ).fetchall()
            ],
            write=False,
        )


def _roll_back(conn: Conn) -> None:
    """End the connection's transaction, if SQLite has not ended it already."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _work(batch: list[_Request]) -> int:
    """A committed batch's work, for ``_WAL_CHECK_WORK`` (unweighed requests count 1)."""
    work = 0
    for r in batch:  # (a loop: no generator to make and resume, on every commit)
        work += r.weight or 1
    return work


def _jobs_weight(jobs: list[NewJob]) -> int:
    """New jobs' share of a transaction's work (see ``_LOOP_MAX_WEIGHT``): a row each,
    and their payloads' pages."""
    size = 0
    for job in jobs:
        size += len(job.payload)
    return len(jobs) + size // _PAGE


def _weight(outcomes: list[Outcome]) -> int:
    """Outcomes' share of a transaction's work (see ``_LOOP_MAX_WEIGHT``): their outputs
    and their errors' texts."""
    size = 0
    for o in outcomes:
        if o.output:
            size += len(o.output)
        if o.error is not None:
            size += len(o.error.message) + len(o.error.traceback)
    return len(outcomes) + size // _PAGE


async def _join(thread: threading.Thread) -> None:
    """Wait on the loop for ``thread`` to end, polling: not with a thread of the loop's
    executor, which is gone once the interpreter has begun to shut down (a signal can
    stop a ``register_worker`` engine then, after the script's last line)."""
    delay = 0.0005
    while thread.is_alive():
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


_flatten = itertools.chain.from_iterable
"""The values of rows one after another, for one multi-row statement's parameters."""


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _parse_owner(owner: str) -> tuple[str | None, int | None]:
    parts = owner.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def _forget_owners(conn: Conn, owners: list[str]) -> None:
    """Delete the rows of ``owners`` (a closing store's) that hold no running job: a job
    still leased to one (a handler abandoned in its thread) keeps its row, for a process
    of its PID namespace to see it gone."""
    for chunk in _chunks(owners, 500):
        marks = ",".join("?" * len(chunk))
        conn.execute(
            f"DELETE FROM owners WHERE owner IN ({marks}) AND NOT EXISTS (SELECT 1 FROM jobs "
            "WHERE state = 'running' AND lease_owner = owners.owner)",
            chunk,
        )


def _owner_alive(owner: str, ours: set[str]) -> bool:
    """False only if ``owner`` is known to be gone: a process of this host and PID
    namespace that no longer exists, or one with this process's pid that no runtime of
    this process runs under. Owners on other hosts or in other PID namespaces (another
    container, or this container before a restart), or with ids of another form, are
    taken to be alive: their leases tell."""
    if owner in ours or owner in RUNNING_OWNERS:
        return True
    host, pid = _parse_owner(owner)
    if host != _HOST or pid is None:
        return True
    return pid != os.getpid() and _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
