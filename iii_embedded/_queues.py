"""One named queue at run time: a dispatcher that claims jobs and a pool of workers.

The dispatcher claims as many jobs as there are free slots in one store call (a batch, so
a SQLite store pays one transaction for many jobs), hands them to long-lived worker tasks
through an in-memory buffer (spawning a task per job costs more than the job), and sleeps
until something can have changed: a local enqueue or a finished job (woken at once), the
next delayed job's time (on the runtime's clock), or, for stores shared with other
processes, ``poll_interval_ms`` of real time.

What an attempt costs, and what blocks a FIFO group, is decided in the store (see
:mod:`iii_embedded._stores._base`); this module decides what a handler's result or error
means: completed, retry after backoff, dead-letter, released on shutdown, held when the
function is unknown here, or cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import random
import time
import traceback
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc

from ._codec import dumps_lenient, loads
from ._config import QueueConfig
from ._context import _current
from ._errors import NonRetryableError, RetryAfter, StoreError, exception_message
from ._fastpath import (
    PENDING,
    Interrupted,
    Interrupter,
    first_step,
    handler_failed,
    resume_suspended,
)
from ._stores import (
    EnqueueClaim,
    ErrorInfo,
    Job,
    NewJob,
    Outcome,
    completed_outcome,
    make_enqueue_claim,
)
from ._threads import ThreadPool

if TYPE_CHECKING:
    from ._registry import FunctionSpec
    from ._runtime import Runtime

__all__ = ["QueueRunner", "error_info"]

log = logging.getLogger("iii_embedded.queue")

StopReason = Literal["shutdown", "cancelled"]

_FAN_OUT_S = 0.01
"""How long a sync job started while a queue's thread is busy may wait for that thread
before the pool wakes another for it (``ThreadPool`` ``fan_out_s``): the delay before
blocking handlers run side by side. Long enough that the check is seldom the next timer
due, which would send the loop's commits to the writer (``commit_on_loop``)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """Skip the runtime's own frames at the top of a handler's traceback: the operator
    reading a dead job wants to start at their handler."""
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return tb


def error_info(exc: BaseException) -> ErrorInfo:
    """Record an exception as the store keeps it: type name, message, traceback."""
    tb = _user_frames(exc.__traceback__) or exc.__traceback__
    return ErrorInfo(
        type=_storable(type(exc).__qualname__),
        message=_storable(exception_message(exc)),
        traceback=_storable("".join(traceback.format_exception(type(exc), exc, tb))),
    )


def _storable(text: str) -> str:
    """``text`` with each lone surrogate (an undecodable byte of a file name, an argument
    or the environment, as Python keeps it) written as its escape, ``\\udcff``: UTF-8,
    and so the file store, cannot hold one, and both stores keep the same text."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Active(Interrupter):
    """A running job and the means to stop its handler."""

    __slots__ = ("job",)

    def __init__(self, job: Job) -> None:
        # Interrupter's fields set here: one of these is made per job.
        self.task = None
        self.reason = None
        self.job = job


class _SyncActive(_Active):
    """A job whose sync handler runs in one of the queue's threads (``_start_sync``), or
    waits in the queue's line for the thread of a running one (``_chain``).

    A thread cannot be stopped: stopping the job settles it at once and leaves the
    thread to finish alone, its result dropped (``settled``)."""

    __slots__ = (
        "cancel_timer",
        "context",
        "handed",
        "handler",
        "runner",
        "settled",
        "start_at",
        "started",
        "taken",
    )

    def __init__(self, job: Job, handler: Any, runner: QueueRunner) -> None:
        super().__init__(job)
        self.handler = handler
        self.runner = runner
        self.settled = False
        self.started = time.perf_counter()
        self.cancel_timer: Callable[[], None] | None = None
        # The line (see ``QueueRunner._chain``); what a pool thread reads or writes here
        # is guarded by the pool's lock, ``settled`` included.
        self.handed: _SyncActive | None = None
        """The waiting job this one's thread started when it ended: the loop registers it."""
        self.taken = False
        """For a waiting job: a thread started it."""
        self.start_at = 0.0
        """For a waiting job: when a thread started it (runtime clock)."""
        self.context: contextvars.Context | None = None

    def interrupt(self, reason: str) -> None:
        """Settle the job now (timeout, cancellation, shutdown); its thread runs on."""
        if self.reason is None:
            self.reason = reason
        self.runner._stop_sync(self, reason)


def log_dead_lettered(job: Job, info: object, extra: dict[str, Any], why: str = "") -> None:
    """The warning a job reaching its dead-letter queue logs (``why``: appended)."""
    log.warning(
        "job %s of %r moved to the dead-letter queue of %r after %d attempt(s): %s%s",
        job.id,
        job.function_id,
        job.queue,
        job.attempts,
        info,
        why,
        extra=extra,
    )


_FAILURE_LOG_EVERY_S = 60.0
"""How often a store that keeps failing a queue's exchanges is logged again (seconds)."""


class QueueRunner:
    """Runs one queue's jobs inside the runtime's task group."""

    def __init__(self, runtime: Runtime, config: QueueConfig) -> None:
        self.rt = runtime
        self.config = config
        self.name = config.name
        self.active: dict[str, _Active] = {}
        self.running = 0
        """Handlers executing now (at most ``concurrency``)."""
        self.unsettled = 0
        """Jobs claimed whose outcome is not yet written to the store."""
        self._exchanging = False
        """An exchange is in flight: its claim may bring jobs that must be handed back."""
        self._failed_exchanges = 0
        """Exchanges failed in a row (a full disk): one log line for many, see ``_failed``."""
        self._failure_logged_at = 0.0
        self._outcomes: list[tuple[Job, Outcome]] = []
        self.lent = 0
        """Slots lent by handlers that wait for other runs (see ``lend_slot``)."""
        self._lenders: dict[_Active, int] = {}
        """A waiting handler's attempt (its entry in ``active``) → how many of its waits
        are open. Keyed by attempt, not by receipt id: a retry shares its job's id, and may
        run while an abandoned thread of an earlier attempt still waits."""
        self._orphans: dict[_Active, int] = {}
        """A sync attempt stopped while waiting → how many of its waits are open (see
        ``_orphan``)."""
        self._room: anyio.Event | None = None
        """Set when a slot frees up, for a handler taking its lent slot back."""
        self._resumers: set[object] = set()
        """The attempts of handlers whose wait ended and that wait for a slot
        (``wait_for_room``; ``_stop_sync`` takes a stopped one out at once)."""
        self._workers = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.idle = False
        self._stopping = False
        self._wake_pending = True
        self._wake_event = anyio.Event()
        self._buffer: deque[Job] = deque()
        """Jobs claimed and not yet started (at most ``concurrency + prefetch`` in all)."""
        self._unmarked: list[Job] = []
        """Prefetched jobs whose handlers started since the last exchange: the next one
        records their start (``started`` outcomes) if they are still running."""
        self._idle: deque[asyncio.Future[None]] = deque()
        """Workers waiting for a job, each on its own future."""
        self._woken = 0
        """Workers woken for a job that have not resumed yet (see ``_spread``)."""
        self.prefetch = config.prefetch if config.prefetch is not None else 4 * config.concurrency
        """Jobs claimed beyond the free slots, so the workers have the next jobs at hand
        while the store writes outcomes and claims more (``QueueConfig.prefetch``)."""
        self.threads = ThreadPool(
            f"queue-{config.name}",
            max_threads=config.concurrency * 4 + 32,
            settle=self._settle_sync,
            # Only prefetched jobs can wait behind running ones (see ``_chain``).
            follow=self._follow if self.prefetch else None,
            fan_out_s=_FAN_OUT_S,
        )
        self._line: deque[_SyncActive] = deque()
        """Claimed sync jobs waiting for the thread of a running one, oldest first (see
        ``_chain``; guarded by the pool's lock: threads take from it)."""
        self._reserved: dict[str, _SyncActive] = {}
        """The jobs put in the line that the loop has not yet seen start, by id (loop only):
        claimed, out of ``_buffer``, waiting or just started by a thread."""
        self._check_leases = self.rt.store.shared and not self.rt.clock.is_virtual
        """On a store shared with other processes, a claimed job is started only while
        its lease holds: after a stall longer than the lease, another process may have
        taken it back (``_lease_lost``). Not with a virtual clock: a test that moves it
        past a lease has not stalled, and the renewal that the move also wakes is on its
        way (checking would let prefetched jobs go and claim them again, with a warning
        each)."""
        self._renewed_until = float("-inf")
        """The lease of every job this runner held at the last renewal (but those it
        lost then, which it let go)."""
        self.chained = 0
        """Sync jobs started by the thread of the job before them (see ``_chain``)."""
        self._context = contextvars.copy_context()
        """The context the line's handlers run in a copy of (as a worker's would)."""
        self._timeout_s = config.timeout_ms / 1000 if config.timeout_ms else None
        # Claims at enqueue (``claim_at_enqueue``). ``_drained``: the last claim found
        # nothing more available, and nothing since can have made a job available behind
        # this runner's back (``_generation`` counts those events: ``wake``), up to
        # ``_due_at``, the earliest time a job it knows of becomes available. Except the
        # jobs this runner's own enqueues stored queued that no claim has asked for yet:
        # ``_owed`` of them, which the next claim takes first.
        self.claims_on_enqueue = runtime.store.claims_on_enqueue and not config.is_fifo
        """Whether enqueues may store this queue's jobs claimed (see ``claim_at_enqueue``)."""
        self._drained = False
        self._generation = 0
        self._due_at = float("-inf")
        self._queued_here = 0
        """Jobs enqueued on this loop into this queue and stored queued (a running count)."""
        self._delayed_here = float("inf")
        """The earliest delayed job enqueued here since ``_learn_due`` began its read."""
        self._exchanges = 0
        """Claims the dispatcher has asked for (a serial number)."""
        self._exchanges_done = 0
        """The last of those whose jobs are in the buffer (or that failed)."""
        self._waits: dict[int, int] = {}
        """A claim at enqueue made while a claim of the dispatcher's was on its way (by
        ``id``) → that claim's serial number."""
        self._parked: list[tuple[EnqueueClaim, list[Job]]] = []
        """Jobs claimed at enqueue that wait for an older claim to reach the buffer."""
        self._owed = 0
        self._claiming = 0
        """The claim limit of the exchange in flight."""
        self._claimed_at_enqueue = 0
        """Jobs claimed by enqueues whose transactions have not ended."""
        self._ahead_on_its_way = 0
        """Claims at enqueue on their way that also claim owed jobs (``ahead``): while
        one is, later enqueues store their jobs queued (owed), for if its transaction
        fails, the owed jobs stay queued and a later claim must not overtake them."""

    # --- wiring ----------------------------------------------------------------------

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the dispatcher and the workers."""
        self._tg = tg
        tg.start_soon(self._dispatch, name=f"iii-dispatch[{self.name}]")
        for _ in range(self.config.concurrency):
            self._add_worker()

    def _add_worker(self) -> None:
        assert self._tg is not None
        self._workers += 1
        self._tg.start_soon(self._worker, name=f"iii-worker[{self.name}#{self._workers}]")

    def wake(self) -> None:
        """Jobs may be claimable now that this runner has not seen stored (an enqueue it
        did not claim, a redrive, another process's jobs): until its next claim finds the
        queue drained again, enqueues store their jobs queued, behind those."""
        self._generation += 1
        self._drained = False
        self._due_at = float("-inf")  # learnt again when the queue next drains
        self.poke()

    def queued_here(self, jobs: list[NewJob]) -> None:
        """An enqueue on the loop stores ``jobs`` queued (those it did not claim, see
        ``claim_at_enqueue``): claim them soon, or when they fall due."""
        now = self.rt.clock.now()
        count = 0
        for job in jobs:
            if job.available_at <= now:
                count += 1
            else:
                self._due_at = min(self._due_at, job.available_at)
                self._delayed_here = min(self._delayed_here, job.available_at)
        self._queued_here += count
        self._owed += count
        self.poke()

    def poke(self) -> None:
        """Run the dispatcher soon: outcomes to write, or room to claim into."""
        if self._wake_pending:
            # Already woken: the dispatcher has not run since, and its event is set (a new
            # event resets the flag; see ``_wait_for_wake``).
            return
        self._wake_pending = True
        self.idle = False
        self._wake_event.set()

    # Claims at enqueue. When this runner's last claim found nothing more to claim and it
    # has room, a job enqueued on the loop is stored already claimed (``enqueue_claimed``):
    # the claim that would follow its insert, and the dispatcher's turn to make it, are
    # saved. Only while nothing can be waiting ahead of the job: any enqueue not claimed
    # so, a redrive, a released or retried job, a poll for other processes' jobs, or a
    # delayed job falling due stops it until a claim finds the queue drained again
    # (docs/design.md, "Claims at enqueue").

    def claim_at_enqueue(self, jobs: list[NewJob]) -> EnqueueClaim | None:
        """The claim an enqueue of ``jobs`` (on the loop) should store its leading jobs
        with (``Store.enqueue_claimed``), or ``None``. The jobs it leaves out are stored
        queued, and the runner told of them (:meth:`queued_here`)."""
        if not self._drained or self._stopping or self._ahead_on_its_way:
            return None  # (only a runner that claims at enqueue drains)
        rt = self.rt
        now = rt.clock.now()
        if now >= self._due_at:
            return None
        room = self._room_to_claim() - self._claiming - self._owed
        count = 0
        for job in jobs:
            if count >= room or job.available_at > now or job.idempotency_key is not None:
                break
            count += 1
        if not count:
            return None
        # Jobs stored queued here that no claim has asked for yet are claimed first, in
        # the same transaction: the new jobs overtake none.
        ahead, self._owed = self._owed, 0
        if ahead:
            self._ahead_on_its_way += 1
        self._claimed_at_enqueue += ahead + count
        self.unsettled += ahead + count  # the runtime is not quiet while they are on their way
        claim = make_enqueue_claim(rt.owner, now + rt.lease_s, count, self._claimed, ahead, now)
        if self._claiming:
            # The dispatcher's claim on its way is older: its jobs go to the buffer first,
            # though they reach it only when the dispatcher resumes, after a commit they
            # may share with this one (``_claimed`` parks these till then).
            self._waits[id(claim)] = self._exchanges
        return claim

    def _room_to_claim(self) -> int:
        """Jobs this runner may still claim: ``concurrency + lent + prefetch`` less those
        it holds (running, waiting, in the line) and those claims at enqueue are bringing."""
        return (
            self.config.concurrency
            + self.lent
            + self.prefetch
            - self.running
            - len(self._buffer)
            - len(self._reserved)
            - self._claimed_at_enqueue
        )

    def _claimed(self, claim: EnqueueClaim, jobs: list[Job] | None) -> None:
        """The transaction of an enqueue that claimed ended: take its jobs as a claim's
        (``None``: nothing was stored), after those of an older claim of the dispatcher's
        that has not reached the buffer yet."""
        wait_for = self._waits.pop(id(claim), 0)
        if jobs and wait_for > self._exchanges_done:
            self._parked.append((claim, jobs))  # (``_unpark`` brings them back here)
            return
        if claim.ahead:
            self._ahead_on_its_way -= 1
        self._claimed_at_enqueue -= claim.ahead + claim.count
        self.unsettled -= claim.ahead + claim.count
        if jobs is None:  # the jobs it would have claimed ahead are still queued
            self.wake()
            self.rt.notify_activity()
            return
        self.unsettled += len(jobs)
        if self._stopping:  # stopped meanwhile: hand them back unstarted
            now = self.rt.clock.now()
            self._outcomes += [(j, self._outcome(j, "released", now)) for j in jobs]
            self.poke()
        else:
            self._buffer.extend(jobs)
            if self._may_start():
                # As ``_spread``: a worker task it wakes runs after the enqueue's caller.
                if self._idle and not self._woken and (self._buffer or self._reserved):
                    self._wake_worker()
            else:
                # Every slot is taken: ``_spread`` would hand them to running sync
                # handlers' threads, which could start one before the enqueue's caller
                # resumes (a handler waiting for the run it enqueued registers its wait
                # then). The caller's resumption is already scheduled: go after it.
                asyncio.get_running_loop().call_soon(self._spread)

    def _unpark(self) -> None:
        """The dispatcher's claim has reached the buffer: the jobs claimed at enqueue that
        waited for it follow (their wait is over: ``_claimed`` takes them now)."""
        parked, self._parked = self._parked, []
        for claim, jobs in parked:
            self._claimed(claim, jobs)

    @property
    def needs_wake(self) -> bool:
        """Whether a wake would change anything (read from other threads, racily but
        safely): not if one is pending, since the dispatcher's next round starts after
        the caller's commit anyway, nor once it has stopped claiming."""
        return not self._stopping and (self.claims_on_enqueue or not self._wake_pending)

    def stop_claiming(self) -> None:
        """Graceful shutdown, step one: claim nothing more (outcomes are still written)."""
        self._stopping = True
        # Prefetched jobs were never started: hand them back at once (unattempted).
        now = self.rt.clock.now()
        for entry in list(self._reserved.values()):
            if self._detach(entry):
                self._outcomes.append((entry.job, self._outcome(entry.job, "released", now)))
        while self._buffer:
            job = self._buffer.popleft()
            self._outcomes.append((job, self._outcome(job, "released", now)))
        self.wake()
        # Workers waiting for jobs exit once they see the runner stopping.
        while self._idle:
            self._wake_worker()

    # A handler that waits for other runs (``trigger_and_wait`` in ``_runs``) does no work
    # while it waits, so it lends its slot to its queue: otherwise a handler of a queue with
    # concurrency 1 waiting for a job of that queue would wait forever. Parallel waits of one
    # handler lend its one slot once. When its last wait ends, the handler takes the slot
    # back, first waiting for the jobs that ran in it to leave room: handlers *doing work*
    # never exceed ``concurrency`` (docs/design.md, "Waiting inside a handler").

    def holder(self, receipt_id: str, attempt: int) -> _Active | None:
        """The running attempt ``attempt`` of job ``receipt_id``, which holds a slot here;
        ``None`` if it does not (not this runner's, or stopped: a stopped sync handler's
        thread runs on, abandoned, and its waits lend nothing)."""
        entry = self.active.get(receipt_id)
        if entry is None or entry.job.attempts != attempt:
            return None
        if isinstance(entry, _SyncActive) and entry.settled:
            return None
        return entry

    def lend_slot(self, lender: _Active) -> None:
        """The running attempt ``lender`` (see ``holder``) starts waiting: its slot may run
        another job."""
        count = self._lenders.get(lender, 0)
        self._lenders[lender] = count + 1
        if count:
            return
        self.lent += 1
        # The waiting handler keeps its worker task busy: the lent slot needs one of its own.
        if self._workers < self.config.concurrency + self.lent:
            self._add_worker()
        # A sync handler waits in its pool thread: the job run in the slot it lends needs
        # a thread of its own, whatever the pool's bound.
        if isinstance(lender, _SyncActive):
            self.threads.hold()  # released with its last wait (``_release_thread``)
        self._room_changed()
        self._spread()
        self.poke()

    def reclaim_slot(self, lender: _Active) -> bool:
        """One wait of ``lender`` ended; True if it was its last (the slot is its own again:
        await :meth:`wait_for_room` before working)."""
        orphaned = self._orphans.get(lender)
        if orphaned is not None:  # stopped meanwhile: it has no slot to take back
            if orphaned > 1:
                self._orphans[lender] = orphaned - 1
            else:
                del self._orphans[lender]
                self._release_thread(lender)
            return False
        count = self._lenders.pop(lender) - 1
        if count:
            self._lenders[lender] = count
            return False
        self.lent -= 1
        self._release_thread(lender)
        if self._workers > self.config.concurrency + self.lent:
            self._wake_worker()  # a worker too many now: an idle one ends
        return True

    def _orphan(self, lender: _SyncActive) -> None:
        """A sync attempt stopped while it waits: its thread, and its waits, run on,
        abandoned, but the stop freed its slot, so that slot is no longer lent on top of it
        (the queue would run ``concurrency + 1`` handlers). Its thread stays held until
        its waits end."""
        count = self._lenders.pop(lender, 0)
        if count:
            self.lent -= 1
            self._orphans[lender] = count

    def _release_thread(self, lender: _Active) -> None:
        if isinstance(lender, _SyncActive):  # its first wait held a thread (``lend_slot``)
            self.threads.release()

    async def wait_for_room(self, lender: _Active | None = None) -> None:
        """Wait until the caller (the attempt ``lender``) can work without more than
        ``concurrency`` handlers (and the claim in flight) working in this queue. A sync
        attempt stopped meanwhile stops counting at once (``_stop_sync``)."""
        # ``running - lent`` counts the caller and every handler waiting here too. They are
        # let in one at a time, each when the handlers *working* leave it a slot: counting
        # one another, two of them would wait for each other forever. Workers start no
        # prefetched job while one of them waits (``_may_start``).
        if self.running - self.lent <= self.config.concurrency:
            return
        token: object = lender if lender is not None else object()
        self._resumers.add(token)
        try:
            while (
                token in self._resumers
                and self.running - self.lent - self._resuming >= self.config.concurrency
            ):
                if self._room is None:
                    self._room = anyio.Event()
                await self._room.wait()
        finally:
            self._resumers.discard(token)
            self._spread()

    def _room_changed(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    @property
    def _resuming(self) -> int:
        """Handlers whose wait ended and that wait for a slot (read from pool threads too:
        ``len`` of a set is one step under the GIL)."""
        return len(self._resumers)

    @property
    def inflight(self) -> int:
        """Jobs claimed by this runner and not yet settled in the store, plus one while an
        exchange is in flight (a shutdown must not close the store under it: the jobs its
        claim brings are then handed back, which needs the store)."""
        return self.unsettled + self._exchanging

    @property
    def prefetched_count(self) -> int:
        """Jobs claimed and not yet started."""
        return len(self._buffer) + sum(not e.taken for e in self._reserved.values())

    def leased_ids(self) -> list[str]:
        """Ids of the jobs this runner holds a lease on: running and prefetched."""
        ids = list(self.active)
        ids += self._reserved
        ids += [job.id for job in self._buffer]
        for _, jobs in self._parked:
            ids += [job.id for job in jobs]
        return ids

    def stop_job(self, job_id: str, reason: StopReason) -> bool:
        """Stop one claimed job of this runner: interrupt its handler if it runs, or
        settle it unstarted (``cancelled`` or ``released``) if it is prefetched. False if
        this runner does not hold it."""
        reserved = job_id in self._reserved
        job = None if job_id in self.active else self._take_unstarted(job_id)
        if job is not None:
            self._settle_unstarted(job, "released" if reason == "shutdown" else "cancelled")
            return True
        entry = self.active.get(job_id)
        if entry is not None:
            self.interrupt(entry, reason)
            return True
        if reason == "cancelled" and self._flag_parked(job_id):
            return True
        return reserved  # a thread started it from the line, and it has already ended

    def _flag_parked(self, job_id: str) -> bool:
        """Mark a job claimed at enqueue that waits in ``_parked`` as cancelled: it reaches
        the buffer with the others of its claim (their accounting stays whole), and its
        worker settles it ``cancelled``, unstarted, as any job whose cancel request came
        before its start. False if no parked job has this id."""
        for _, jobs in self._parked:
            for job in jobs:
                if job.id == job_id:
                    job.cancel_requested = True
                    return True
        return False

    def withdraw(self, job_id: str) -> bool:
        """Let go of a claimed job this runner has not started, before an in-memory store
        cancels it as the ``queued`` job it reads as (``Runs._cancel``, which then fires
        ``job_cancelled``): it leaves the buffer or the line, settled ``released``, which
        the store ignores once the job is cancelled, and which fires no hook. True also
        for a job already settled so (``released`` at shutdown, or ``held``) whose outcome
        is not written yet. False if this runner does not hold it unstarted, or has
        settled it ``cancelled`` itself (its outcome fires the hook: the store must leave
        the job to it); a job a thread took from the line meanwhile is registered as
        running first, for the cancel to stop."""
        job = self._take_unstarted(job_id)
        if job is not None:
            self._settle_unstarted(job, "released")
            return True
        return any(o.job_id == job_id and o.kind in ("released", "held") for _, o in self._outcomes)

    def _take_unstarted(self, job_id: str) -> Job | None:
        """Take a claimed job that has not started out of the line or the buffer. None if
        this runner does not hold it so; one a thread took from the line meanwhile is
        registered (running, or ended and settled) instead."""
        waiting = self._reserved.get(job_id)
        if waiting is not None:
            return waiting.job if self._detach(waiting) else None
        for job in self._buffer:
            if job.id == job_id:
                self._buffer.remove(job)
                return job
        return None

    def leases_renewed(self, lease_until: float, lost: set[str]) -> None:
        """The maintenance renewed the leases of this runner's jobs until ``lease_until``,
        but for ``lost`` ones, no longer this process's (on a shared store: their lease
        ran out, and another process may run them). Those not started yet are let go,
        unstarted; a running one runs on (at-least-once), its outcome ignored by the
        store."""
        self._renewed_until = lease_until
        for job_id in lost:
            job = self._take_unstarted(job_id)
            if job is not None:
                self._let_go(job)

    def _lease_lost(self, job: Job) -> bool:
        """True if ``job``'s lease ran out before it could start (a stall longer than the
        lease: the event loop blocked, the process stopped)."""
        lease = job.lease_until
        return lease is not None and self.rt.clock.now() >= max(lease, self._renewed_until)

    def _let_go(self, job: Job) -> None:
        log.warning(
            "queue %r: job %s was not started: its lease ran out before it could (the "
            "process stalled for longer than lease_ms?); another process may run it",
            self.name,
            job.id,
        )
        # Written with this owner: the store ignores it if the job is no longer ours, and
        # else returns the job to its queue, its attempt given back.
        self._settle_unstarted(job, "released")

    def _settle_unstarted(self, job: Job, kind: Literal["released", "cancelled"]) -> None:
        outcome = self._outcome(job, kind, self.rt.clock.now())
        outcome.started = False
        self._outcomes.append((job, outcome))
        self.wake()

    def interrupt_all(self, reason: StopReason) -> None:
        """Cancel every running handler of this queue (shutdown after the grace period)."""
        self.threads.flush_now()  # jobs a thread took from the line: now in ``active``
        for entry in list(self.active.values()):
            self.interrupt(entry, reason)

    @staticmethod
    def interrupt(entry: _Active, reason: StopReason) -> None:
        """Stop one running handler; its outcome is decided by ``reason``."""
        entry.interrupt(reason)

    # --- dispatcher ------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Claim jobs and write outcomes, both in batches.

        Workers do not write their outcomes: they append them to ``_outcomes`` and take the
        next job. The dispatcher then writes every pending outcome *and* claims the next
        jobs in one store call (``exchange``: one transaction). While it waits on the store,
        more outcomes pile up, so batches grow with the load and a commit is shared by as
        many jobs as finished meanwhile.
        """
        rt = self.rt
        store = rt.store
        clock = rt.clock
        fifo = self.config.is_fifo
        lease_s = rt.lease_s
        buffer = self._buffer
        while True:
            self._wake_pending = False
            free = 0 if self._stopping else self._room_to_claim()
            settled, self._outcomes = self._outcomes, []
            now = clock.now()
            writes = [outcome for _, outcome in settled]
            if self.claims_on_enqueue:
                for outcome in writes:
                    # Queued again, from its ``available_at``. (A job released while the
                    # runner runs, as by ``withdraw``, wakes it: ``_settle_unstarted``.)
                    if outcome.kind == "retry":
                        at = outcome.available_at if outcome.available_at is not None else now
                        self._due_at = min(self._due_at, at)
            # Drained (see ``claim_at_enqueue``): the only jobs to claim are the ones
            # enqueued here since, stored queued (``_owed``), so claim only those. With
            # none owed and no outcome to write, the store is not asked at all.
            drained = self._drained and now < self._due_at
            limit = free
            if drained:
                limit = max(0, min(free, self._owed))
                self._owed -= limit
            generation = self._generation
            queued_here = self._queued_here
            if self._unmarked:
                writes += self._start_marks()
            jobs: list[Job] = []
            if writes or limit > 0:
                # The jobs this claim gives that can start at once; the rest are prefetched
                # and start as slots free up (their start is written later: a crash before
                # that gives their attempt back, see ``Store.recover``).
                starting = (
                    0
                    if self._resuming
                    else self.config.concurrency
                    + self.lent
                    - self.running
                    - len(buffer)
                    - len(self._reserved)
                    - self._claimed_at_enqueue
                )
                self._exchanging = True
                self._claiming = max(0, limit)  # claims at enqueue leave room for it
                if limit > 0:
                    self._exchanges += 1
                serial = self._exchanges
                learn, learn_at = False, now
                try:
                    jobs = await store.exchange(
                        writes,
                        self.name,
                        fifo=fifo,
                        limit=limit,
                        now=now,
                        owner=rt.owner,
                        lease_until=now + lease_s,
                        start=max(0, starting),
                    )
                    # A full claim (a drained one takes owed jobs, the only ones there):
                    # drained if it came back short and nothing happened since. It took
                    # every job enqueued here before it was asked for.
                    if self.claims_on_enqueue and not drained and limit > 0:
                        self._drained = len(jobs) < limit and self._generation == generation
                        self._owed = self._queued_here - queued_here
                        learn = self._drained and now >= self._due_at
                    if self._failed_exchanges:
                        self._recovered()
                except StoreError as exc:
                    self._drained = False
                    self._failed(exc, len(settled))
                finally:
                    self._exchanging = False
                    self._claiming = 0
                self.unsettled -= len(settled)
                if settled:
                    rt.jobs_finished(self, settled)
                if jobs:
                    self.unsettled += len(jobs)
                    if self._stopping:  # stopped while claiming: hand them back unstarted
                        now = clock.now()
                        self._outcomes += [(j, self._outcome(j, "released", now)) for j in jobs]
                    else:
                        buffer.extend(jobs)
                        self._spread()
                if self._exchanges_done < serial:
                    self._exchanges_done = serial
                    if self._parked:
                        self._unpark()
                if learn:
                    # Only now that its jobs are in the buffer, where a cancel finds them
                    # (while they were in flight here, one would have been lost).
                    self._exchanging = True  # keeps the store open under the read
                    try:
                        await self._learn_due(learn_at)
                    finally:
                        self._exchanging = False
                if self._outcomes or (jobs and len(jobs) == limit and not drained):
                    continue
            if self._stopping:
                if self.unsettled == 0:
                    rt.notify_activity()
                    return
                await self._wait_for_wake(None, None)
                continue
            deadline: float | None = None
            if self._drained and clock.now() < self._due_at:
                # Nothing else is queued that is available now; the store named the next
                # delayed job's time when the queue drained (``_learn_due``).
                deadline = self._due_at if self._due_at != float("inf") else None
            elif free > 0:
                try:
                    deadline = await store.next_available_at(self.name, now)
                except StoreError:
                    deadline = None
            if self._wake_pending or (deadline is not None and deadline <= clock.now()):
                # Woken, or the next job fell due while the store was read: a test moved
                # a virtual clock past it, and a timer set in the past would wait for the
                # next move (drain would find this queue idle with the job unrun).
                continue
            poll_s = self.config.poll_interval_ms / 1000 if store.shared else None
            await self._wait_for_wake(deadline, poll_s)

    def _failed(self, exc: StoreError, outcomes: int) -> None:
        """An exchange failed. A store that fails every write (a full disk) fails a claim
        per poll for as long as it lasts: the first failure is logged, and then a line a
        minute at most with the count, so that the log (often on that disk) is not
        flooded. One that lost outcomes is always logged: no job is claimed meanwhile, so
        there are at most as many as jobs were claimed before."""
        self._failed_exchanges += 1
        at = time.monotonic()
        if self._failed_exchanges == 1 or outcomes:
            log.error(
                "queue %r: writing %d outcome(s) and claiming failed: %s; jobs whose outcome "
                "was not written run again when their lease expires (failed claims alone are "
                "logged once a minute at most)",
                self.name,
                outcomes,
                exc,
            )
        elif at - self._failure_logged_at >= _FAILURE_LOG_EVERY_S:
            log.error(
                "queue %r: writing outcomes and claiming still fails (%d failures): %s",
                self.name,
                self._failed_exchanges,
                exc,
            )
        else:
            return
        self._failure_logged_at = at

    def _recovered(self) -> None:
        log.warning(
            "queue %r: the store takes writes again, after %d failures",
            self.name,
            self._failed_exchanges,
        )
        self._failed_exchanges = 0

    async def _learn_due(self, now: float) -> None:
        """After a claim found the queue drained at ``now``: ask the store when its next
        delayed job falls due (claims at enqueue stop then)."""
        generation = self._generation
        self._delayed_here = float("inf")
        try:
            deadline = await self.rt.store.next_delayed_at(self.name, now)
        except StoreError:
            self._due_at = float("-inf")
            return
        if self._generation == generation:
            # A delayed job enqueued meanwhile may have been stored after the read.
            answer = float("inf") if deadline is None else deadline
            self._due_at = min(answer, self._delayed_here)

    def _mark_started(self, job: Job, at: float) -> None:
        """A prefetched job's handler starts: the store records it at once if it can (the
        in-memory store), else the next exchange writes it (``_start_marks``)."""
        job.started_at = at
        if not self.rt.store.mark_started(job.id, self.rt.owner, job.attempts, at):
            self._unmarked.append(job)

    def _start_marks(self) -> list[Outcome]:
        """``started`` outcomes for the prefetched jobs started since the last exchange
        that are still running (a finished job's outcome carries its start)."""
        active = self.active
        owner = self.rt.owner
        marks = [
            Outcome(
                job_id=job.id,
                kind="started",
                owner=owner,
                attempt=job.attempts,
                at=job.started_at if job.started_at is not None else self.rt.clock.now(),
                seq=job.seq,
            )
            for job in self._unmarked
            if job.id in active
        ]
        self._unmarked = []
        return marks

    async def _wait_for_wake(self, deadline: float | None, poll_s: float | None) -> None:
        """Sleep until woken, until ``deadline`` on the runtime clock, or ``poll_s`` of real
        time (other processes' jobs are found by polling, in real time even in tests)."""
        self._wake_event = anyio.Event()
        self._wake_pending = False  # a wake from now on sets this new event
        self.idle = True
        self.rt.notify_activity()
        event = self._wake_event
        with anyio.CancelScope(
            deadline=anyio.current_time() + poll_s if poll_s is not None else float("inf")
        ):
            if deadline is None:
                await event.wait()
            else:
                # The timer wakes the runner itself, so it reads busy from the moment a
                # delayed job falls due: a test that advances a virtual clock past it and
                # then drains finds the work, before this task has run again.
                cancel = self.rt.clock.call_at(deadline, self.wake)
                try:
                    await event.wait()
                finally:
                    cancel()
        self.idle = False
        if not event.is_set():  # it is time to poll
            self.wake()

    # --- workers ---------------------------------------------------------------------
    #
    # Claimed jobs wait in ``_buffer``. A worker that finishes a job takes the next one
    # itself, so a queue of handlers that never suspend runs a whole claim in one worker,
    # with no task switch per job. Another worker is woken only when there is a job and
    # a slot for it but no worker free to take it: when jobs arrive, and when a handler
    # suspends (``_spread``).

    def _may_start(self) -> bool:
        return (
            self.running - self.lent < self.config.concurrency
            and not self._resumers  # (``_resuming``, without a property call per job)
            and not self._stopping
        )

    def _spread(self) -> None:
        """Wake an idle worker if a claimed job could start now; with every slot taken,
        give running sync jobs the next claimed ones to run after them (``_chain``).

        Not while a worker woken earlier has yet to resume: it takes the buffer's jobs one
        after another until one of their handlers suspends, which spreads again (jobs
        claimed at enqueue arrive one at a time, and each woke a worker of its own that
        then mostly found the buffer emptied by the first)."""
        if self._buffer or self._reserved:
            if self._may_start():
                if self._idle and not self._woken:
                    self._wake_worker()
            elif self._buffer:
                self._chain()

    def _take_back(self) -> Job | None:
        """For a worker with a free slot and an empty buffer: the oldest job waiting in
        the line, rather than let it wait for a thread to end its handler."""
        with self.threads.lock:
            waiting = self._line.popleft() if self._line else None
        if waiting is None:
            return None
        del self._reserved[waiting.job.id]
        return waiting.job

    def _wake_worker(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1
                return

    async def _worker(self) -> None:
        buffer = self._buffer
        loop = asyncio.get_running_loop()
        check_leases = self._check_leases
        clock_now = self.rt.clock.now
        while True:
            job: Job | None = None
            if (buffer or self._reserved) and self._may_start():
                # The line's jobs were claimed before the buffer's: they go first.
                if self._reserved:
                    job = self._take_back()
                if job is None and buffer:
                    job = buffer.popleft()
            if job is not None:
                now: float | None = None
                if check_leases:  # ``_lease_lost``, inline: it runs for every job
                    lease = job.lease_until
                    now = clock_now()
                    if lease is not None and now >= max(lease, self._renewed_until):
                        self._let_go(job)
                        continue
                spec = self.rt.registry.get(job.function_id)
                if spec is not None and not job.cancel_requested and job.started_at is None:
                    # A prefetched job starts: the store records it now, or its start is
                    # written with the next exchange.
                    self._mark_started(job, clock_now() if now is None else now)
                    if not spec.is_async and self._unmarked:
                        self.poke()  # an async one wakes the dispatcher if it suspends
                if spec is not None and not spec.is_async and not job.cancel_requested:
                    self._start_sync(job, spec.handler)  # returns at once: take the next
                    continue
                await self._run(job, spec)
            elif self._stopping:
                return
            elif not buffer and self._workers > self.config.concurrency + self.lent:
                # Started for a slot lent by a wait that has ended: one worker a slot.
                self._workers -= 1
                return
            else:
                if buffer:  # every slot is taken: the next jobs follow running sync ones
                    self._chain()
                waiter = loop.create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done():
                        waiter.cancel()
                    elif not waiter.cancelled():  # woken by ``_wake_worker``
                        self._woken -= 1

    async def _run(self, job: Job, spec: FunctionSpec | None) -> None:
        """Run one job of an async handler, or settle one that cannot start (cancelled
        before it started, or its function unknown here)."""
        rt = self.rt
        entry = _Active(job)
        self._occupy(job.id, entry)
        self.running += 1
        try:
            if job.cancel_requested:
                # Cancelled while an earlier attempt ran, which then failed (retry) or was
                # released before the stop reached it: the run ends here, unattempted.
                outcome = self._outcome(job, "cancelled", rt.clock.now())
                outcome.started = False
            elif spec is None:
                rt.note_unknown_function(job)
                outcome = self._outcome(job, "held", rt.clock.now())
            else:
                outcome = await self._attempt(job, spec.handler, entry)
            self._outcomes.append((job, outcome))
        finally:
            self._leave(job.id, entry)

    def _occupy(self, job_id: str, entry: _Active) -> None:
        """Register ``entry`` as the job's running attempt. An attempt of the same job
        still running here lost its lease (a stall; another process took the job back,
        and this runner claimed it again): it is stopped as at shutdown (``released``,
        which the store ignores for an attempt no longer its own), not left running
        beside the new one where nothing could reach it."""
        old = self.active.get(job_id)
        if old is not None:
            old.interrupt("shutdown")
        self.active[job_id] = entry

    def _leave(self, job_id: str, entry: _Active) -> None:
        """A job's handler no longer occupies its slot (its outcome is in ``_outcomes``).

        Its entry may have been replaced: after a stall longer than the lease, another
        process (or this one's own recovery) took the job back, and this runner claimed
        it again while the old attempt still ran (at-least-once). The new attempt's entry
        is then the job's, and the old one leaves only its slot."""
        if self.active.get(job_id) is entry:
            del self.active[job_id]
        self.running -= 1
        if self._room is not None:
            self._room_changed()
        self.poke()

    # Sync handlers run in the queue's threads with no task waiting for each (a task's
    # suspension and wake-up, per job, cost the loop more than the rest of the job). The
    # worker that takes a job starts it and goes on; the results come back in batches to
    # ``_settle_sync``. A timeout, a cancellation or a shutdown settles a job at once
    # (``_stop_sync``), as they stop a waiting task in ``_attempt``.

    # The line. With every slot taken, sync results come back to the loop in batches, and
    # the next jobs would start only once the loop has seen the slots free: one round trip
    # through the loop per slot, which on the file store waits for the loop's commit, so a
    # queue ran about ``concurrency`` sync jobs per transaction. Instead, the loop puts
    # the claimed sync jobs in a line (``_chain``); when a handler returns, its thread
    # takes the oldest job in the line and runs it at once, in the same slot
    # (``_follow``), and the loop learns of the start with the result (``_settle_sync``).
    # A slot is still held by one handler at a time: a thread takes a job only when its
    # handler has returned (not when its job was stopped: the thread may still be in the
    # handler), and a worker with a free slot takes the oldest waiting job itself
    # (``_take_back``). Any thread takes from the one line, so a slow handler holds back
    # no job but its own.

    def _chain(self) -> None:
        """Put the claimed sync jobs at the head of the buffer in the line, while a running
        sync handler's thread will take them."""
        if self._stopping or self._resuming:
            return
        if not any(isinstance(e, _SyncActive) and not e.settled for e in self.active.values()):
            return  # no thread would come for them: the workers start them
        buffer = self._buffer
        registry = self.rt.registry
        joining: list[_SyncActive] = []
        while buffer:
            job = buffer[0]
            spec = registry.get(job.function_id)
            if spec is None or spec.is_async or job.cancel_requested:
                break  # it stays first, for a worker
            buffer.popleft()
            waiting = _SyncActive(job, spec.handler, self)
            waiting.context = self._context.copy()
            self._reserved[job.id] = waiting
            joining.append(waiting)
        if joining:
            with self.threads.lock:
                self._line.extend(joining)

    def _follow(self, entry: Any) -> tuple[Any, contextvars.Context, Any, Any] | None:
        """In a pool thread, holding the pool's lock: ``entry``'s handler ended; start the
        oldest job in the line, unless ``entry`` was stopped meanwhile (its slot is no
        longer this thread's) or a handler waits to take its slot back."""
        if not isinstance(entry, _SyncActive) or entry.settled or self._resuming:
            return None
        line = self._line
        if not line or (self._check_leases and self._lease_lost(line[0].job)):
            return None  # a worker takes it back and lets it go
        spec = self.rt.registry.get(line[0].job.function_id)
        if spec is None or spec.handler is not line[0].handler:
            return None  # unregistered (or replaced) since: a worker takes it back
        waiting = line.popleft()
        entry.handed = waiting
        waiting.taken = True
        waiting.started = time.perf_counter()
        waiting.start_at = self.rt.clock.now()
        assert waiting.context is not None
        return (waiting, waiting.context, self._call_sync, waiting)

    def _detach(self, waiting: _SyncActive) -> bool:
        """Take a job out of the line: True if it had not started (it is out of
        ``_reserved`` then, for the caller to start or settle); False if a thread started
        it (it has been registered then, and may have ended too)."""
        with self.threads.lock:
            taken = waiting.taken
            if not taken:
                self._line.remove(waiting)
        if taken:
            self.threads.flush_now()  # the result it followed registers it
            return False
        del self._reserved[waiting.job.id]
        return True

    def _register(self, entry: _SyncActive) -> None:
        """On the loop: a job from the line that a thread started."""
        rt = self.rt
        job = entry.job
        del self._reserved[job.id]
        self._occupy(job.id, entry)
        self.running += 1
        self.chained += 1
        if job.started_at is None:
            self._mark_started(job, entry.start_at)
        if rt.hooks:
            rt.emit("job_started", job)
        if self._timeout_s is not None:
            entry.cancel_timer = rt.clock.call_at(
                entry.start_at + self._timeout_s, lambda: entry.interrupt("timeout")
            )

    def _start_sync(self, job: Job, handler: Any) -> None:
        rt = self.rt
        entry = _SyncActive(job, handler, self)
        self._occupy(job.id, entry)
        self.running += 1
        if rt.hooks:
            rt.emit("job_started", job)
        if self._timeout_s is not None:
            entry.cancel_timer = rt.clock.call_at(
                rt.clock.now() + self._timeout_s, lambda: entry.interrupt("timeout")
            )
        self.threads.submit(entry, self._call_sync, entry)

    def _call_sync(self, entry: _SyncActive) -> str:
        """In a pool thread, in a copy of the worker's context: run the handler, encode its
        output (the encoding's cost stays off the loop too)."""
        job = entry.job
        _current.set(job)  # current_invocation() builds the Invocation if asked
        result = entry.handler(loads(job.payload))
        return "null" if result is None else self._dump_output(job, result)

    def _settle_sync(self, results: list[tuple[Any, bool, Any]]) -> None:
        """On the loop: the results of a batch of sync handlers."""
        now = self.rt.clock.now()
        owner = self.rt.owner
        for entry, ok, value in results:
            waiting = entry.handed
            if waiting is not None:  # its thread went on with a job from the line
                entry.handed = None
                self._register(waiting)
            if entry.settled:  # stopped meanwhile: the job was settled without this result
                continue
            job = entry.job
            duration_ms = (time.perf_counter() - entry.started) * 1000
            if ok:
                outcome = completed_outcome(
                    job.id, owner, job.attempts, now, value, job.seq, job.started_at
                )
                self.completed += 1
                if log.isEnabledFor(logging.DEBUG):
                    self._log_completed(job, duration_ms)
            elif isinstance(value, Exception):
                outcome = self._failure(job, value, now, duration_ms)
            else:  # SystemExit and the like: fatal to a thread, not to the runtime
                outcome = self._failure(job, RuntimeError(repr(value)), now, duration_ms)
            self._end_sync(entry, outcome)
        self._spread()

    def _stop_sync(self, entry: _SyncActive, reason: str) -> None:
        if entry.settled:
            return
        # A result already in settles its job as it ended (and registers the job from the
        # line its thread went on with).
        self.threads.flush_now()
        if entry.settled:
            return
        with self.threads.lock:
            entry.settled = True  # from now on, its thread takes nothing from the line
            handed = entry.handed
        if handed is not None:  # it ended just now, and took a waiting job
            self.threads.flush_now()
        job = entry.job
        now = self.rt.clock.now()
        if reason == "timeout":
            duration_ms = (time.perf_counter() - entry.started) * 1000
            outcome = self._failure(job, self._timed_out(job), now, duration_ms)
        else:
            outcome = self._outcome(job, "released" if reason == "shutdown" else "cancelled", now)
        self._orphan(entry)
        self._resumers.discard(entry)  # its slot is free now: it waits for none
        self._end_sync(entry, outcome)
        self._spread()

    def _end_sync(self, entry: _SyncActive, outcome: Outcome) -> None:
        entry.settled = True
        if entry.cancel_timer is not None:
            entry.cancel_timer()
        self._outcomes.append((entry.job, outcome))
        self._leave(entry.job.id, entry)

    async def _attempt(self, job: Job, handler: Any, entry: _Active) -> Outcome:
        rt = self.rt
        clock = rt.clock
        token = _current.set(job)  # current_invocation() builds the Invocation if asked
        if rt.hooks:
            rt.emit("job_started", job)
        started = time.perf_counter()
        error: BaseException | None = None
        result: Any = None
        stopped: str | None = None
        try:
            payload = loads(job.payload)
            coro = handler(payload)
            # The first step here, not in ``run_handler``: most handlers finish on it, and
            # a coroutine less per job is ~5% of a no-op job (see _fastpath).
            result, yielded = first_step(coro)
            if result is PENDING:
                self._spread()  # this one waits: another worker takes the next job
                if self._unmarked:
                    self.poke()  # write its start soon: it may run a while
                result = await resume_suspended(
                    coro,
                    yielded,
                    call_at=clock.call_at,
                    deadline=clock.now() + self._timeout_s if self._timeout_s is not None else None,
                    interrupter=entry,
                )
        except Interrupted as exc:
            stopped = exc.reason
        except Exception as exc:
            error = exc
        except BaseException as exc:
            if not handler_failed(exc):
                raise  # the engine's own stop: its task group is being cancelled
            # A failed attempt, as any error of the handler's own; SystemExit and the like
            # as from a sync handler's thread (``_settle_sync``).
            is_error = isinstance(exc, (asyncio.CancelledError, BaseExceptionGroup))
            error = exc if is_error else RuntimeError(repr(exc))
        finally:
            _current.reset(token)
        now = clock.now()
        if stopped in ("shutdown", "cancelled"):
            return self._outcome(job, "released" if stopped == "shutdown" else "cancelled", now)
        if stopped == "timeout":
            error = self._timed_out(job)
        if error is None:
            self.completed += 1
            if log.isEnabledFor(logging.DEBUG):  # (no call, nor clock read, per job else)
                self._log_completed(job, (time.perf_counter() - started) * 1000)
            return completed_outcome(
                job.id,
                rt.owner,
                job.attempts,
                now,
                "null" if result is None else self._dump_output(job, result),
                job.seq,
                job.started_at,
            )
        return self._failure(job, error, now, (time.perf_counter() - started) * 1000)

    def _timed_out(self, job: Job) -> TimeoutError:
        return TimeoutError(
            f"handler of {job.function_id!r} timed out after {self.config.timeout_ms} ms"
        )

    def _log_completed(self, job: Job, duration_ms: float) -> None:
        """The debug line of a completed job (the caller counts it, and logs only at
        ``DEBUG``)."""
        log.debug(
            "job %s of %r completed in %.1f ms",
            job.id,
            job.function_id,
            duration_ms,
            extra=self._extra(job, duration_ms),
        )

    def _failure(self, job: Job, error: BaseException, now: float, duration_ms: float) -> Outcome:
        self.failed += 1
        info = error_info(error)
        extra = self._extra(job, duration_ms)
        final = isinstance(error, NonRetryableError) or job.attempts >= job.max_attempts
        if final:
            self.dead_lettered += 1
            log_dead_lettered(job, info, extra)
            return Outcome(
                job_id=job.id,
                kind="dead",
                owner=self.rt.owner,
                attempt=job.attempts,
                at=now,
                error=info,
                started_at=job.started_at,
            )
        if isinstance(error, RetryAfter):
            delay_ms = float(error.delay_ms)
        else:
            delay_ms = float(self.config.backoff_delay_ms(job.attempts))
            if self.config.jitter:
                delay_ms = random.uniform(delay_ms / 2, delay_ms)
        self.retried += 1
        available_at = now + delay_ms / 1000
        # Known before the dispatcher writes it: from then on no enqueue claims ahead of it
        # (``claim_at_enqueue``), though it reaches the store only with the next exchange
        # (and a due time being read meanwhile may not see it: ``_learn_due``).
        self._due_at = min(self._due_at, available_at)
        self._delayed_here = min(self._delayed_here, available_at)
        log.info(
            "job %s of %r failed attempt %d/%d (%s); retrying in %d ms",
            job.id,
            job.function_id,
            job.attempts,
            job.max_attempts,
            info,
            delay_ms,
            extra=extra,
        )
        return Outcome(
            job_id=job.id,
            kind="retry",
            owner=self.rt.owner,
            attempt=job.attempts,
            at=now,
            error=info,
            available_at=available_at,
            started_at=job.started_at,
        )

    def _dump_output(self, job: Job, result: Any) -> str:
        if result is None:
            return "null"
        try:
            return dumps_lenient(result)
        except Exception:  # not JSON (or a container whose own methods raise)
            log.warning(
                "job %s of %r returned a value that is not JSON-serialisable; "
                "its run output is stored as its repr",
                job.id,
                job.function_id,
                extra=self._extra(job, 0.0),
            )
        # The handler has returned, so its run completes whatever the value. A repr that
        # raises (an int past str()'s digit limit, a broken __repr__) gets a placeholder:
        # it used to raise out of an async job's worker, stopping the engine, and to fail
        # a sync job's attempt, running a handler that had succeeded again.
        try:
            text = repr(result)
        except Exception as exc:
            text = f"<{type(result).__name__} object: repr failed with {type(exc).__name__}>"
        return json.dumps(text)

    def _extra(self, job: Job, duration_ms: float) -> dict[str, Any]:
        return {
            "function_id": job.function_id,
            "receipt_id": job.id,
            "queue": self.name,
            "attempt": job.attempts,
            "duration_ms": round(duration_ms, 3),
        }

    def _outcome(
        self, job: Job, kind: Literal["released", "held", "cancelled"], now: float
    ) -> Outcome:
        return Outcome(job_id=job.id, kind=kind, owner=self.rt.owner, attempt=job.attempts, at=now)
