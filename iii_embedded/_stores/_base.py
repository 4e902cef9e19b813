"""The store protocol: everything the queue logic asks of persistence.

Design rules every store follows (the conformance suite checks each):

* The store never reads a clock: every call that depends on time takes ``now``. The runtime
  passes its clock's time, so a virtual clock drives stores too.
* ``enqueue`` is atomic over its whole batch: every job is stored, or none is.
* A claim moves jobs from ``queued`` to ``running`` and increments ``attempts`` in the same
  step, so an attempt that is lost with its process still counts. Jobs claimed beyond the
  free slots (*prefetched*) have no ``started_at`` until an outcome records their start;
  ``recover`` gives such a job its attempt back, once in a row (see :meth:`Store.recover`).
* Standard queues hand out available jobs oldest-available first (``available_at``, then
  enqueue order). FIFO queues hand out only the *head* of each group (the lowest ``seq`` among
  its ``queued``, ``running`` and ``held`` jobs), only when the head is available and nothing
  of its group is running; a delayed head (backoff) blocks its group.
* ``finish`` applies outcomes only to jobs still leased by the caller for that attempt; an
  outcome for a job whose lease was lost (and maybe re-claimed elsewhere) is ignored.
* Claiming stays an index lookup: its cost must not grow with the number of pending jobs.

Times are float seconds since the epoch. Payloads and outputs are JSON text: serialised once
at enqueue, so both stores see exactly the same bytes.

``NewJob``, ``Job`` and ``Outcome`` are slotted attrs classes but not frozen: the runtime
makes one of each per job, and a frozen attrs instance costs three times as much to build
(~2 µs against ~0.65 µs for a job record). Treat them as read-only all the same: changing
one never changes the store.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Literal, Protocol

import attrs

__all__ = [
    "RUNNING_OWNERS",
    "CronFire",
    "EnqueueClaim",
    "ErrorInfo",
    "Job",
    "JobState",
    "LOST_ATTEMPT",
    "NewJob",
    "Outcome",
    "OutcomeKind",
    "QueueCounts",
    "Renewal",
    "Store",
    "UNSTARTED_ATTEMPT",
    "completed_outcome",
    "restore_converted",
    "make_enqueue_claim",
    "make_job",
    "make_new_job",
    "never_started",
]

_new = object.__new__

JobState = Literal["queued", "running", "held", "dead", "completed", "cancelled"]
"""Where a job is. ``queued`` covers ready and delayed (``available_at`` in the future)."""

OutcomeKind = Literal["completed", "retry", "dead", "released", "held", "cancelled", "started"]


@attrs.define(frozen=True)
class Renewal:
    """What a lease renewal found (``Store.renew``)."""

    cancelled: set[str] = attrs.field(factory=set)
    """Renewed jobs whose cancellation was requested."""
    lost: set[str] = attrs.field(factory=set)
    """Jobs not renewed: no longer running under this owner (their lease expired and
    another process took them back, or they were settled meanwhile)."""


@attrs.define(frozen=True, kw_only=True)
class ErrorInfo:
    """An error recorded on a job: the exception's type name, message and traceback."""

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


def _process_host() -> str:
    """This machine and PID namespace, as lease owners name them: the hostname, then
    (where Linux shows it) ``#`` and the inode of the PID namespace. Two containers with
    one hostname (host networking) that share a store cannot see each other's processes;
    with the namespace in the owner, an owner's pid is judged only in its own namespace
    (``_sqlite._owner_alive``), and other owners by their leases."""
    host = socket.gethostname()
    try:
        return f"{host}#{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


PROCESS_HOST = _process_host()
"""The host part of this process's lease owner ids (see ``_process_host``)."""

RUNNING_OWNERS: set[str] = set()
"""The lease owners of the runtimes running in this process (a runtime adds its own when
it starts and removes it when it stops). A lease held under this process's pid by an
owner not in it belongs to a process that is gone."""
os.register_at_fork(after_in_child=RUNNING_OWNERS.clear)  # a child runs none of them

LOST_ATTEMPT = ErrorInfo(
    type="LeaseExpired",
    message="the process running this attempt stopped, or stalled past its lease, before "
    "finishing it",
)
"""The error ``recover`` records on a job whose attempt was lost with its process."""
UNSTARTED_ATTEMPT = ErrorInfo(
    type="LeaseExpired",
    message="the process that had claimed this job stopped before its handler started "
    "(the attempt was given back)",
)
"""The error ``recover`` records on a prefetched job it gives its attempt back to."""


def never_started(started_at: float | None, error_type: str | None) -> bool:
    """Whether ``recover`` gives a lost job its attempt back: no start was recorded, and
    the last thing that happened to it was not already a recovery (a job that kills its
    process before its start is written gets the benefit of the doubt once in a row)."""
    return started_at is None and error_type != LOST_ATTEMPT.type


@attrs.define(kw_only=True)
class NewJob:
    """A job to store. ``id`` is its receipt id (a UUID string chosen by the runtime)."""

    id: str
    queue: str
    function_id: str
    payload: str
    """JSON text of the payload."""
    group: str | None = None
    """FIFO group key (JSON text of the group field's value), ``None`` on standard queues."""
    created_at: float
    available_at: float
    max_attempts: int
    idempotency_key: str | None = None
    """If set, a live job of the same function with the same key is returned instead."""


def make_new_job(
    id_: str,
    queue: str,
    function_id: str,
    payload: str,
    group: str | None,
    created_at: float,
    available_at: float,
    max_attempts: int,
    idempotency_key: str | None,
    /,
) -> NewJob:
    """A :class:`NewJob` from all its fields, positionally (see :func:`make_job`)."""
    job: NewJob = _new(NewJob)
    job.id = id_
    job.queue = queue
    job.function_id = function_id
    job.payload = payload
    job.group = group
    job.created_at = created_at
    job.available_at = available_at
    job.max_attempts = max_attempts
    job.idempotency_key = idempotency_key
    return job


@attrs.define(kw_only=True)
class Job:
    """A stored job as the store sees it (also a run record)."""

    id: str
    queue: str
    function_id: str
    payload: str
    group: str | None
    seq: int
    """Enqueue order within the store; a redrive gives a job a new, later ``seq``."""
    state: JobState
    attempts: int
    """Attempts started so far (a claim increments it)."""
    max_attempts: int
    created_at: float
    available_at: float
    started_at: float | None = None
    finished_at: float | None = None
    first_failed_at: float | None = None
    last_failed_at: float | None = None
    error: ErrorInfo | None = None
    output: str | None = None
    """JSON text of the handler's return value, for completed jobs."""
    lease_owner: str | None = None
    lease_until: float | None = None
    idempotency_key: str | None = None
    cancel_requested: bool = False


def make_job(
    id_: str,
    queue: str,
    function_id: str,
    payload: str,
    group: str | None,
    seq: int,
    state: JobState,
    attempts: int,
    max_attempts: int,
    created_at: float,
    available_at: float,
    started_at: float | None,
    finished_at: float | None,
    first_failed_at: float | None,
    last_failed_at: float | None,
    error: ErrorInfo | None,
    output: str | None,
    lease_owner: str | None,
    lease_until: float | None,
    idempotency_key: str | None,
    cancel_requested: bool,
    /,
) -> Job:
    """A :class:`Job` from all its fields, positionally in declaration order.

    The stores build one per claimed job. ``Job(**fields)`` spends most of its ~3 µs matching
    21 keyword arguments; setting the slots directly takes ~0.7 µs. Tests check that this
    and the other ``make_`` functions set every field as the class's own ``__init__`` does.
    """
    job: Job = _new(Job)
    job.id = id_
    job.queue = queue
    job.function_id = function_id
    job.payload = payload
    job.group = group
    job.seq = seq
    job.state = state
    job.attempts = attempts
    job.max_attempts = max_attempts
    job.created_at = created_at
    job.available_at = available_at
    job.started_at = started_at
    job.finished_at = finished_at
    job.first_failed_at = first_failed_at
    job.last_failed_at = last_failed_at
    job.error = error
    job.output = output
    job.lease_owner = lease_owner
    job.lease_until = lease_until
    job.idempotency_key = idempotency_key
    job.cancel_requested = cancel_requested
    return job


@attrs.define(kw_only=True)
class EnqueueClaim:
    """Jobs an enqueue stores already claimed (:meth:`Store.enqueue_claimed`).

    The first ``count`` jobs of the enqueue are stored as a claim of ``owner`` would leave
    them, prefetched: ``running``, one attempt counted, no ``started_at``, leased until
    ``lease_until``. Once the transaction has ended, on the event loop, ``deliver`` is
    called with this claim and their :class:`Job` records (``None`` if nothing was
    stored), whether or not anyone still awaits the enqueue's ids.
    """

    owner: str
    lease_until: float
    count: int
    deliver: Callable[[EnqueueClaim, list[Job] | None], None]
    ahead: int = 0
    """Before storing its own jobs, the enqueue claims up to this many queued jobs of
    their queue available at ``now``, oldest first, as a prefetching claim would: jobs
    stored queued earlier, which its own must not overtake. They come first in
    ``stored``."""
    now: float = 0.0
    stored: list[Job] = attrs.field(factory=list)
    """Filled by the store in the enqueue's transaction: the claimed jobs' records."""


def make_enqueue_claim(
    owner: str,
    lease_until: float,
    count: int,
    deliver: Callable[[EnqueueClaim, list[Job] | None], None],
    ahead: int,
    now: float,
    /,
) -> EnqueueClaim:
    """An :class:`EnqueueClaim` (``stored`` empty), positionally (one per claim at enqueue,
    see :func:`make_job`)."""
    claim: EnqueueClaim = _new(EnqueueClaim)
    claim.owner = owner
    claim.lease_until = lease_until
    claim.count = count
    claim.deliver = deliver
    claim.ahead = ahead
    claim.now = now
    claim.stored = []
    return claim


@attrs.define(kw_only=True)
class Outcome:
    """What happened to a claimed job's attempt, to be applied by ``Store.finish``.

    * ``completed``: the handler returned ``output`` (JSON text).
    * ``retry``: the attempt failed with ``error``; available again at ``available_at``.
    * ``dead``: the attempt failed with ``error`` and the job goes to the DLQ.
    * ``released``: the attempt did not happen (graceful shutdown); the attempt is given back.
    * ``held``: the function is not registered here; the job waits (attempt given back).
    * ``cancelled``: the run was cancelled while running, or before its handler started
      (``started=False``: a prefetched job; the attempt is given back).
    * ``started``: the handler of a prefetched job started at ``at``; the job stays
      ``running`` and only its ``started_at`` is recorded (if it has none yet).

    A ``released`` or ``held`` outcome of a job whose cancel was requested meanwhile is
    written ``cancelled`` (unstarted) instead, and the store changes the outcome to say so.
    So is a ``retry`` of such a job (``cancelled``, started, its failed attempt's error
    recorded): the run ends now rather than wait out its backoff to be cancelled then.

    ``started_at`` on the other kinds is when the attempt's handler started; the store
    records it on a job that has none (a prefetched job whose start was not yet written).
    """

    job_id: str
    kind: OutcomeKind
    owner: str
    attempt: int
    at: float
    output: str | None = None
    error: ErrorInfo | None = None
    available_at: float | None = None
    started: bool = True
    """False if the handler never started (only for ``cancelled``)."""
    seq: int | None = None
    """The claimed job's ``seq``, if known: a store may find the job by it instead of by
    ``job_id`` (the file store's rowid, one B-tree lookup fewer per outcome)."""
    started_at: float | None = None
    """When the attempt's handler started (``None`` if it did not)."""
    converted_from: Literal["released", "held", "retry"] | None = None
    """Set by the store that wrote a ``released``, ``held`` or ``retry`` outcome as
    ``cancelled`` (its cancel was requested meanwhile), to the kind it had: if that write
    then fails, the caller puts it back (``restore_converted``)."""


def restore_converted(outcomes: Sequence[Outcome]) -> None:
    """Undo what stores did to ``outcomes`` that were converted in a write that failed:
    the outcomes say again what their runner decided."""
    for outcome in outcomes:
        if outcome.converted_from is not None:
            outcome.kind = outcome.converted_from
            outcome.started = True
            outcome.converted_from = None


def completed_outcome(
    job_id: str,
    owner: str,
    attempt: int,
    at: float,
    output: str,
    seq: int | None = None,
    started_at: float | None = None,
) -> Outcome:
    """The outcome of a handler that returned ``output``, built as :func:`make_job` builds
    jobs (one per job on the hot path)."""
    outcome: Outcome = _new(Outcome)
    outcome.job_id = job_id
    outcome.kind = "completed"
    outcome.owner = owner
    outcome.attempt = attempt
    outcome.at = at
    outcome.output = output
    outcome.error = None
    outcome.available_at = None
    outcome.started = True
    outcome.seq = seq
    outcome.started_at = started_at
    outcome.converted_from = None
    return outcome


@attrs.define(frozen=True, kw_only=True)
class QueueCounts:
    """Point-in-time counts of one queue's jobs in a store."""

    ready: int = 0
    delayed: int = 0
    running: int = 0
    held: int = 0
    dead: int = 0
    completed: int = 0
    """Completed runs still kept (within the result retention)."""
    oldest_ready_at: float | None = None


@attrs.define(frozen=True, kw_only=True)
class CronFire:
    """The last fire of one cron job taken in a store (see :meth:`Store.claim_fire`)."""

    job_id: str
    """The cron job's id: its function id and schedule."""
    scheduled: float
    """The fire time taken (epoch seconds)."""
    owner: str
    """The runtime that took it (``host:pid:…``)."""
    running: bool
    """Not yet ended by its owner."""
    lease_until: float
    holds: bool
    """Whether it still holds back the job's next fire: running, with its lease live, and
    its owner's process not known to be gone. ``running`` without ``holds`` is a fire
    whose process stopped before ending it."""


class Store(Protocol):
    """What the queue logic needs from persistence. All methods are safe to call from the
    event loop thread: a store that blocks (SQLite) does its work on its own thread."""

    @property
    def shared(self) -> bool:
        """True if other processes may write to this store (the runtime then polls)."""

    @property
    def location(self) -> str:
        """Where the store lives, for messages (a path, or ``":memory:"``)."""

    async def open(self) -> None:
        """Open (create or migrate) the store. Raises ``StoreError`` with path and cause."""

    def own_thread_ids(self) -> Sequence[int]:
        """Native ids of the open store's threads that serve the event loop's requests
        (pinned with the loop by ``pin_cpu``); empty for a store without threads."""

    async def aclose(self) -> None:
        """Flush and close. Idempotent."""

    # --- producing -------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[NewJob]) -> Awaitable[list[str]]:
        """Store ``jobs`` atomically (all or none) and return their ids in order.

        For a job whose ``idempotency_key`` matches a live job of the same function (one that
        is not ``dead`` or ``cancelled`` and not yet pruned), nothing is stored and the live
        job's id is returned in its place. The awaitable resolves only once the jobs are
        durable. A store may do its part at the call (the file store hands the jobs to its
        writer there and returns a future) or when awaited (an ``async def``); either may
        raise ``StoreError``.

        Calls take effect in the order they are made (``counts`` excepted): a call made
        after ``enqueue`` was called (before it returned) sees the jobs if the enqueue
        succeeds. The runtime relies on this when it wakes a queue's dispatcher before the
        enqueue commits.
        """

    def enqueue_from_thread(
        self,
        jobs: Sequence[NewJob],
        *,
        inline: bool = False,
        committed: Callable[[], None] | None = None,
    ) -> Future[list[str]] | None:
        """``enqueue`` called from a thread other than the event loop's: a future of the
        ids that resolves once the jobs are durable, or ``None`` if this store takes
        requests only on its event loop (the caller then goes through the loop).
        ``committed`` is called once the jobs are committed, before the future resolves
        (even if its caller cancelled it meanwhile), in whichever thread committed them:
        what it schedules comes before anything the caller does next.

        The file store hands the jobs to its writer thread directly, so a caller waits
        for two thread wake-ups instead of four. With ``inline`` (the caller's thread
        would only wait: a blocking ``trigger``, never an event loop's thread) it may
        commit them in the caller's thread when its writer has nothing to do, and then
        returns a future already resolved. The future may raise ``StoreError``; the call
        itself raises it if the store is not open."""

    @property
    def claims_on_enqueue(self) -> bool:
        """Whether this store offers :meth:`enqueue_claimed`."""

    def enqueue_claimed(self, jobs: Sequence[NewJob], claim: EnqueueClaim) -> Awaitable[list[str]]:
        """``enqueue``, with the first ``claim.count`` jobs stored already claimed (see
        :class:`EnqueueClaim`). Only for a store whose ``claims_on_enqueue`` is true.

        For a queue whose dispatcher found nothing more to claim and has room, this saves
        the claim that would follow the insert: on the file store, a statement that moves
        each row from one index to another, and a wake-up of the dispatcher. The caller
        passes only standard-queue jobs that are available now and carry no idempotency
        key. The file store does this; the in-memory store, whose claim costs little and
        which stores nothing until its enqueue is awaited, does not."""

    async def next_delayed_at(self, queue: str, after: float) -> float | None:
        """The earliest ``available_at`` after ``after`` among ``queued`` jobs of ``queue``
        that were not available when stored (delayed, or retried with a backoff), or
        ``None``. Only for a store whose ``claims_on_enqueue`` is true: a runner that
        claims at enqueue stops at that time, and ignores the jobs enqueued since its last
        claim, which it knows of."""

    # --- consuming -------------------------------------------------------------------

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
        """Move up to ``limit`` available jobs of ``queue`` to ``running`` and return them.

        Each returned job has ``attempts`` already incremented and the lease set to
        ``owner`` until ``lease_until``. The first ``start`` of them (all when ``None``)
        start at once and get ``started_at = now``; the others are *prefetched*: they wait
        in the caller's buffer with ``started_at`` unset, until an outcome (``started``, or
        the attempt's end) records when their handler started. See the module docstring
        for order.
        """

    def mark_started(self, job_id: str, owner: str, attempt: int, at: float) -> bool:
        """Record at once, with no I/O, that a prefetched job's handler started at ``at``
        (on the event loop's thread). ``False`` if this store cannot: the runner then
        writes the start with its next exchange (a ``started`` outcome).

        The in-memory store can, and shows a prefetched job that has not started as
        ``queued`` (see :meth:`get`); the file store writes starts in batches."""

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        """Apply outcomes (see :class:`Outcome`), all in one transaction."""

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
        """``finish(outcomes)`` then ``claim(queue, ...)``, in one transaction.

        The queue runners' hot path: acknowledging a batch of jobs and taking the next
        batch costs one commit, and a FIFO group's next job is claimable in the same call
        that finished its predecessor. If it raises, nothing was applied or claimed.
        """

    async def renew(self, owner: str, job_ids: Sequence[str], lease_until: float) -> Renewal:
        """Extend the leases of ``owner``'s running jobs; say which were cancelled and
        which are no longer ``owner``'s."""

    async def recover(self, now: float) -> list[Job]:
        """Return running jobs whose lease expired (or whose owner process is known to be
        gone) to ``queued`` (available at ``now``), or to ``dead`` when they have used every
        attempt. Returns the jobs it moved, in their new state.

        The lost attempt counts, with one exception: a job with no ``started_at`` (claimed
        as prefetched, and no start recorded) gets its attempt back, unless the last thing
        that happened to it was such a recovery (its error is ``LeaseExpired``). A start is
        recorded a little after the handler starts, so a job that kills its process at once
        may be given its attempt back once, but not twice in a row: it still reaches the
        dead-letter queue."""

    async def release_held(
        self, function_ids: Sequence[str], queues: Sequence[str] | None = None
    ) -> int:
        """Make ``held`` jobs of these functions (in ``queues`` if given) ``queued``
        again; return how many."""

    async def mistyped_queues(self, fifo: Sequence[str], standard: Sequence[str]) -> list[str]:
        """The queues among ``fifo`` that hold live jobs (queued, running or held) without
        a message group, and those among ``standard`` that hold live jobs with one: jobs
        stored while the queue had the other type, which a runner of this type cannot
        claim (see docs/design.md, "A queue's type is its jobs' type")."""

    async def next_available_at(self, queue: str, now: float) -> float | None:
        """The earliest ``available_at`` after ``now`` among ``queued`` jobs of ``queue``
        that could be claimed then: in a FIFO queue, only its groups' heads (a job behind
        a head due later cannot start before it)."""

    # --- cron fires ------------------------------------------------------------------

    async def claim_fire(
        self, job_id: str, scheduled: float, *, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take the fire of cron job ``job_id`` at time ``scheduled`` for ``owner``.

        Among all the processes sharing the store, one caller gets ``True`` for a given
        job and time; the others get ``False``. ``False`` also while the job's previous
        fire is still running: its owner holds it until :meth:`end_fires`, as long as its
        lease (renewed by :meth:`renew_fires`) has not expired and its process is not
        known to be gone. A later ``scheduled`` than one already taken is needed: a fire
        time never runs twice, and one earlier than the last taken never runs."""

    async def renew_fires(self, owner: str, job_ids: Sequence[str], lease_until: float) -> None:
        """Extend ``owner``'s leases on the running fires of these cron jobs."""

    async def end_fires(self, owner: str, job_ids: Sequence[str]) -> None:
        """Mark ``owner``'s fires of these cron jobs finished (the next fire may start)."""

    async def list_fires(self, now: float) -> list[CronFire]:
        """The last fire taken of every cron job that has fired, by job id; ``holds`` as
        :meth:`claim_fire` would judge it at ``now``."""

    # --- runs ------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job (run) with this id, in any state, or ``None``.

        The in-memory store shows a prefetched job whose handler has not started (claimed
        beyond the free slots, see ``QueueConfig.prefetch``) as it was before its claim:
        ``queued``, its attempt not counted, no lease. Only this process can take its jobs,
        so the claim is the runner's bookkeeping, not something a reader could act on. The
        file store shows it ``running``: it is leased, and no other process may take it.
        :meth:`counts` and :meth:`list_jobs` show the same as ``get``."""

    async def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The state of each of ``job_ids`` that exists (ids of no job are left out), as
        :meth:`get` shows it: one read for many runs, for waits that look whether other
        processes settled them."""

    async def key_holders(self, function_id: str, keys: Sequence[str]) -> list[Job]:
        """The runs of ``function_id`` that hold any of the idempotency ``keys`` now (the
        ones an enqueue with that key would return instead of storing a new run), in no
        particular order; as :meth:`get` shows them."""

    async def cancel(self, job_id: str, now: float, owner: str | None = None) -> Job | None:
        """Cancel a run. A ``queued`` or ``held`` job becomes ``cancelled`` at once; a
        ``running`` one is flagged ``cancel_requested`` (its runner stops it). Returns the
        job as it was *before* the call (as :meth:`get` shows it), or ``None`` if unknown.

        In memory a prefetched job that has not started and is leased to ``owner`` is
        cancelled at once too, its attempt given back: it reads ``queued``. The caller
        passes its runtime's owner only once its runner has let go of the job
        (``QueueRunner.withdraw``), or a worker would still start it. Otherwise (leased to
        another runtime sharing the store, or to a runner that has already settled it) the
        job is flagged, as a running job, for its runner to settle."""

    async def prune(self, finished_before: float) -> int:
        """Delete ``completed`` and ``cancelled`` jobs finished before the given time."""

    # --- dead-letter queue -----------------------------------------------------------

    async def list_dead(self, queue: str, *, offset: int = 0, limit: int = 100) -> list[Job]:
        """Dead jobs of ``queue``, oldest failure first."""

    async def dead_ids(self, queue: str) -> list[str]:
        """The ids of every job dead in ``queue`` now, oldest failure first, read at once
        (paging with ``list_dead`` can skip ids that another writer's redrive shifts)."""

    async def redrive(self, queue: str, job_ids: Sequence[str] | None, now: float) -> list[str]:
        """Move dead jobs (these ids, or all when ``None``) back to ``queued`` with attempts
        reset and a new ``seq`` (the tail of their group), oldest failure first whatever
        order ``job_ids`` come in. Returns the ids moved, in that order."""

    async def discard(self, queue: str, job_ids: Sequence[str] | None) -> list[str]:
        """Delete dead jobs (these ids, or all when ``None``); return the ids deleted,
        oldest failure first."""

    # --- inspection ------------------------------------------------------------------

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        """Counts per queue name for every queue that has jobs in the store.

        The counts are those of the last commit: a store may take them from a snapshot
        that does not include requests still in flight (the file store counts on a
        connection of its own, so that a long scan does not hold up its writer)."""

    async def list_jobs(
        self, queue: str | None = None, state: JobState | None = None, *, limit: int | None = 1000
    ) -> list[Job]:
        """Jobs filtered by queue and state, in ``seq`` order (for inspection and tests);
        at most ``limit`` of them (``None``: all)."""
