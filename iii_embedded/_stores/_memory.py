"""The in-memory store: fast, lost on exit, and the reference for the store semantics.

Standard queues keep a heap of ``(available_at, seq, id)``; FIFO queues keep, per group, the
group's live jobs in ``seq`` order and a heap of group heads. Heap entries are validated
lazily when popped (a job whose state or time changed since its entry was pushed is skipped),
so every operation is O(log n) and nothing scans the backlog.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future

from .._errors import StoreClosedError, StoreError
from ._base import (
    LOST_ATTEMPT,
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
)

__all__ = ["MemoryStore"]

_PRUNE_BATCH = 1000
"""Expired runs ``prune`` forgets between two turns of the loop (~4 ms): a million at once
held the loop for seconds."""
_SWEEP_AT = 64
"""The fewest cancelled jobs that make a queue's heaps swept of stale entries (``_sweep``)."""


class _Row:
    __slots__ = (
        "attempts",
        "available_at",
        "cancel_requested",
        "created_at",
        "error",
        "finished_at",
        "first_failed_at",
        "function_id",
        "group",
        "id",
        "idempotency_key",
        "last_failed_at",
        "lease_owner",
        "lease_until",
        "max_attempts",
        "output",
        "payload",
        "queue",
        "seq",
        "started_at",
        "state",
    )

    def __init__(self, job: NewJob, seq: int) -> None:
        self.id = job.id
        self.queue = job.queue
        self.function_id = job.function_id
        self.payload = job.payload
        self.group = job.group
        self.seq = seq
        self.state: JobState = "queued"
        self.attempts = 0
        self.max_attempts = job.max_attempts
        self.created_at = job.created_at
        self.available_at = job.available_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.first_failed_at: float | None = None
        self.last_failed_at: float | None = None
        self.error: ErrorInfo | None = None
        self.output: str | None = None
        self.lease_owner: str | None = None
        self.lease_until: float | None = None
        self.idempotency_key = job.idempotency_key
        self.cancel_requested = False

    def to_job(self) -> Job:
        return make_job(
            self.id,
            self.queue,
            self.function_id,
            self.payload,
            self.group,
            self.seq,
            self.state,
            self.attempts,
            self.max_attempts,
            self.created_at,
            self.available_at,
            self.started_at,
            self.finished_at,
            self.first_failed_at,
            self.last_failed_at,
            self.error,
            self.output,
            self.lease_owner,
            self.lease_until,
            self.idempotency_key,
            self.cancel_requested,
        )

    @property
    def waiting(self) -> bool:
        """Claimed beyond the free slots (prefetched) and its handler not started."""
        return self.state == "running" and self.started_at is None

    def view(self) -> Job:
        """The job as readers see it: a prefetched job that has not started reads as it was
        before its claim (``queued``, attempt not counted, no lease); see ``Store.get``."""
        job = self.to_job()  # a fresh copy: adjusting it leaves the row as it is
        if self.waiting:
            job.state = "queued"
            job.attempts -= 1
            job.lease_owner = job.lease_until = None
        return job


class _QueueIndex:
    """Per-queue indexes of live jobs."""

    __slots__ = ("dead", "group_heads", "groups", "ready", "stale")

    def __init__(self) -> None:
        # Standard queues: (available_at, seq, id) of queued jobs (lazy deletion).
        self.ready: list[tuple[float, int, str]] = []
        # FIFO queues: group -> live job ids (queued/running/held) in seq order.
        self.groups: dict[str, deque[str]] = {}
        # FIFO queues: (available_at, seq, group) of groups whose head is queued.
        self.group_heads: list[tuple[float, int, str]] = []
        # Dead job ids in order of death, each with its place in that order.
        self.dead: OrderedDict[str, int] = OrderedDict()
        # Queued jobs cancelled since the last sweep (``_sweep``): about as many entries
        # of the heaps above are stale, left there until their time comes (at most).
        self.stale = 0


class _Fire:
    """The last fire of a cron job that some owner took."""

    __slots__ = ("lease_until", "owner", "running", "scheduled")

    def __init__(self, scheduled: float, owner: str, lease_until: float) -> None:
        self.scheduled = scheduled
        self.owner = owner
        self.running = True
        self.lease_until = lease_until

    def holds(self, now: float) -> bool:
        """Whether it still holds back the job's next fire (see ``Store.claim_fire``)."""
        return self.running and self.lease_until > now


class MemoryStore:
    """A :class:`~iii_embedded._stores.Store` held in this process's memory."""

    shared = False
    claims_on_enqueue = False
    location = ":memory:"

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}
        self._queues: dict[str, _QueueIndex] = {}
        self._seq = itertools.count(1)
        self._keys: dict[tuple[str, str], str] = {}
        # (finished_at, id) of completed and cancelled jobs, for pruning (a heap).
        self._finished: list[tuple[float, str]] = []
        self._fires: dict[str, _Fire] = {}  # cron job id → its last fire taken
        self._closed = False

    async def open(self) -> None:
        """Nothing to open; kept for the protocol."""
        self._closed = False

    async def aclose(self) -> None:
        """Mark the store closed (its contents stay for inspection)."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the in-memory store is closed")

    def _index(self, queue: str) -> _QueueIndex:
        index = self._queues.get(queue)
        if index is None:
            index = self._queues[queue] = _QueueIndex()
        return index

    def own_thread_ids(self) -> Sequence[int]:
        """None: this store runs on the event loop's thread."""
        return ()

    # --- producing -------------------------------------------------------------------

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[str]:
        """Store jobs atomically; see :meth:`Store.enqueue`."""
        self._check_open()
        rows = self._rows
        for job in jobs:
            if job.id in rows:
                raise StoreError(f"job id {job.id} already exists")
        ids: list[str] = []
        batch_keys: dict[tuple[str, str], str] = {}
        seq = self._seq
        for job in jobs:
            if job.idempotency_key is not None:
                key = (job.function_id, job.idempotency_key)
                existing = self._keys.get(key) or batch_keys.get(key)
                if existing is not None:
                    ids.append(existing)
                    continue
                batch_keys[key] = job.id
            row = _Row(job, next(seq))
            rows[row.id] = row
            self._push_live(row)
            ids.append(row.id)
        if batch_keys:
            self._keys.update(batch_keys)
        return ids

    def _push_live(self, row: _Row) -> None:
        index = self._index(row.queue)
        if row.group is None:
            heapq.heappush(index.ready, (row.available_at, row.seq, row.id))
            return
        members = index.groups.get(row.group)
        if members is None:
            members = index.groups[row.group] = deque()
        members.append(row.id)
        if len(members) == 1:
            heapq.heappush(index.group_heads, (row.available_at, row.seq, row.group))

    def _push_ready(self, row: _Row) -> None:
        """Re-index a job that became queued again in place (retry, release, unhold)."""
        index = self._index(row.queue)
        if row.group is None:
            heapq.heappush(index.ready, (row.available_at, row.seq, row.id))
            return
        members = index.groups.get(row.group)
        if members and members[0] == row.id:
            heapq.heappush(index.group_heads, (row.available_at, row.seq, row.group))

    def _remove_live(self, row: _Row) -> None:
        """Take a job out of its group (it completed, died or was cancelled)."""
        if row.group is None:
            return  # the ready heap is cleaned lazily
        index = self._index(row.queue)
        members = index.groups.get(row.group)
        if not members:
            return
        was_head = members[0] == row.id
        try:
            members.remove(row.id)
        except ValueError:
            return
        if not members:
            del index.groups[row.group]
        elif was_head:
            head = self._rows[members[0]]
            if head.state == "queued":
                heapq.heappush(index.group_heads, (head.available_at, head.seq, head.group or ""))

    def enqueue_claimed(self, jobs: Sequence[NewJob], claim: EnqueueClaim) -> Awaitable[list[str]]:
        """Not offered (``claims_on_enqueue`` is false): this store's claim costs little,
        and its enqueue stores nothing until it is awaited; see
        :meth:`Store.enqueue_claimed`."""
        raise StoreError("the in-memory store does not claim jobs as it stores them")

    async def next_delayed_at(self, queue: str, after: float) -> float | None:
        """Not offered (``claims_on_enqueue`` is false); see :meth:`Store.next_delayed_at`."""
        raise StoreError("the in-memory store does not claim jobs as it stores them")

    def enqueue_from_thread(
        self,
        jobs: Sequence[NewJob],
        *,
        inline: bool = False,
        committed: Callable[[], None] | None = None,
    ) -> Future[list[str]] | None:
        """``None``: this store is not thread-safe; see :meth:`Store.enqueue_from_thread`."""
        return None

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
        """Claim available jobs; see :meth:`Store.claim`."""
        self._check_open()
        index = self._queues.get(queue)
        if index is None or limit <= 0:
            return []
        claimed: list[Job] = []
        rows = self._rows
        starting = limit if start is None else start
        if not fifo:
            heap = index.ready
            while heap and len(claimed) < limit and heap[0][0] <= now:
                available_at, _seq, job_id = heapq.heappop(heap)
                row = rows.get(job_id)
                if row is None or row.state != "queued" or row.available_at != available_at:
                    continue
                started_at = now if len(claimed) < starting else None
                claimed.append(self._start(row, started_at, owner, lease_until))
            return claimed
        heads = index.group_heads
        while heads and len(claimed) < limit and heads[0][0] <= now:
            available_at, seq, group = heapq.heappop(heads)
            members = index.groups.get(group)
            if not members:
                continue
            row = rows[members[0]]
            if row.seq != seq or row.state != "queued" or row.available_at != available_at:
                continue
            started_at = now if len(claimed) < starting else None
            claimed.append(self._start(row, started_at, owner, lease_until))
        return claimed

    @staticmethod
    def _start(row: _Row, started_at: float | None, owner: str, lease_until: float) -> Job:
        row.state = "running"
        row.attempts += 1
        row.started_at = started_at
        row.lease_owner = owner
        row.lease_until = lease_until
        return row.to_job()

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
        """Finish then claim; see :meth:`Store.exchange`."""
        await self.finish(outcomes)
        return await self.claim(
            queue,
            fifo=fifo,
            limit=limit,
            now=now,
            owner=owner,
            lease_until=lease_until,
            start=start,
        )

    def mark_started(self, job_id: str, owner: str, attempt: int, at: float) -> bool:
        """Record a prefetched job's start now; see :meth:`Store.mark_started`."""
        row = self._rows.get(job_id)
        if (
            row is not None
            and row.state == "running"
            and row.lease_owner == owner
            and row.attempts == attempt
            and row.started_at is None
        ):
            row.started_at = at
        return True

    async def finish(self, outcomes: Sequence[Outcome]) -> None:
        """Apply outcomes; see :meth:`Store.finish`."""
        self._check_open()
        for outcome in outcomes:
            row = self._rows.get(outcome.job_id)
            if (
                row is None
                or row.state != "running"
                or row.lease_owner != outcome.owner
                or row.attempts != outcome.attempt
            ):
                continue
            self._apply(row, outcome)

    def _apply(self, row: _Row, outcome: Outcome) -> None:
        kind = outcome.kind
        if kind == "started":  # a prefetched job's handler started: it stays running
            if row.started_at is None:
                row.started_at = outcome.at
            return
        if row.started_at is None and kind in ("completed", "retry", "dead"):
            row.started_at = outcome.started_at
        row.lease_owner = None
        row.lease_until = None
        if kind == "completed":
            row.state = "completed"
            row.output = outcome.output
            row.finished_at = outcome.at
            heapq.heappush(self._finished, (outcome.at, row.id))
            self._remove_live(row)
        elif kind == "retry":
            row.error = outcome.error
            if row.first_failed_at is None:  # (a failure at time 0.0 is one)
                row.first_failed_at = outcome.at
            row.last_failed_at = outcome.at
            if row.cancel_requested:
                # Its cancel was asked while the attempt ran, and the attempt failed before
                # the stop reached it: the run ends cancelled now (its failed attempt
                # recorded), not queued again to wait out its backoff (the outcome says so).
                outcome.converted_from = kind
                outcome.kind = "cancelled"
                self._cancel_row(row, outcome.at)
                return
            row.state = "queued"
            row.available_at = (
                outcome.available_at if outcome.available_at is not None else outcome.at
            )
            self._push_ready(row)
        elif kind == "dead":
            self._bury(row, outcome.error, outcome.at)
        elif kind in ("released", "held") and row.cancel_requested:
            # Settled before a cancel's request reached its runner, and never started: it
            # is cancelled, not queued again or held (the outcome says so, for the hooks).
            outcome.converted_from = kind
            outcome.kind = "cancelled"
            outcome.started = False
            row.attempts = max(0, row.attempts - 1)
            self._cancel_row(row, outcome.at)
        elif kind in ("released", "held"):
            row.attempts = max(0, row.attempts - 1)
            row.started_at = None  # it never started (a claim marks the jobs it starts)
            row.state = "queued" if kind == "released" else "held"
            if kind == "released":
                self._push_ready(row)
        else:  # cancelled
            if not outcome.started:
                row.attempts = max(0, row.attempts - 1)
            self._cancel_row(row, outcome.at)

    def _bury(self, row: _Row, error: ErrorInfo | None, at: float) -> None:
        row.state = "dead"
        row.error = error
        if row.first_failed_at is None:
            row.first_failed_at = at
        row.last_failed_at = at
        row.finished_at = at
        self._remove_live(row)
        self._index(row.queue).dead[row.id] = next(self._seq)
        self._release_key(row)

    def _cancel_row(self, row: _Row, at: float) -> None:
        if row.state == "queued":  # its entry in a heap is stale now
            index = self._index(row.queue)
            index.stale += 1
            if index.stale >= _SWEEP_AT and 2 * index.stale > len(index.ready) + len(
                index.group_heads
            ):
                self._sweep(index)
        row.state = "cancelled"
        row.finished_at = at
        heapq.heappush(self._finished, (at, row.id))
        self._remove_live(row)
        self._release_key(row)

    def _release_key(self, row: _Row) -> None:
        if row.idempotency_key is not None:
            key = (row.function_id, row.idempotency_key)
            if self._keys.get(key) == row.id:
                del self._keys[key]

    async def renew(self, owner: str, job_ids: Sequence[str], lease_until: float) -> Renewal:
        """Extend leases; see :meth:`Store.renew`."""
        self._check_open()
        renewal = Renewal()
        for job_id in job_ids:
            row = self._rows.get(job_id)
            if row is not None and row.state == "running" and row.lease_owner == owner:
                row.lease_until = lease_until
                if row.cancel_requested:
                    renewal.cancelled.add(job_id)
            else:
                renewal.lost.add(job_id)
        return renewal

    async def claim_fire(
        self, job_id: str, scheduled: float, *, owner: str, now: float, lease_until: float
    ) -> bool:
        """Take a cron fire; see :meth:`Store.claim_fire`."""
        self._check_open()
        last = self._fires.get(job_id)
        if last is not None and (last.scheduled >= scheduled or last.holds(now)):
            return False
        self._fires[job_id] = _Fire(scheduled, owner, lease_until)
        return True

    async def renew_fires(self, owner: str, job_ids: Sequence[str], lease_until: float) -> None:
        """Extend cron fire leases; see :meth:`Store.renew_fires`."""
        self._check_open()
        for job_id in job_ids:
            last = self._fires.get(job_id)
            if last is not None and last.owner == owner and last.running:
                last.lease_until = lease_until

    async def end_fires(self, owner: str, job_ids: Sequence[str]) -> None:
        """Mark cron fires finished; see :meth:`Store.end_fires`."""
        self._check_open()
        for job_id in job_ids:
            last = self._fires.get(job_id)
            if last is not None and last.owner == owner:
                last.running = False

    async def list_fires(self, now: float) -> list[CronFire]:
        """The last fire of each cron job; see :meth:`Store.list_fires`."""
        self._check_open()
        return [
            CronFire(
                job_id=job_id,
                scheduled=f.scheduled,
                owner=f.owner,
                running=f.running,
                lease_until=f.lease_until,
                holds=f.holds(now),
            )
            for job_id, f in sorted(self._fires.items())
        ]

    async def recover(self, now: float) -> list[Job]:
        """Return expired leases to their queue; see :meth:`Store.recover`."""
        self._check_open()
        moved: list[Job] = []
        for row in list(self._rows.values()):
            if row.state != "running" or row.lease_until is None or row.lease_until > now:
                continue
            row.lease_owner = None
            row.lease_until = None
            refund = never_started(row.started_at, row.error.type if row.error else None)
            error = UNSTARTED_ATTEMPT if refund else LOST_ATTEMPT
            if row.attempts >= row.max_attempts and not refund:
                self._bury(row, error, now)
            else:
                if refund:
                    row.attempts -= 1
                row.state = "queued"
                row.error = error
                row.available_at = now
                self._push_ready(row)
            moved.append(row.to_job())
        return moved

    async def release_held(
        self, function_ids: Sequence[str], queues: Sequence[str] | None = None
    ) -> int:
        """Un-hold jobs of now-registered functions; see :meth:`Store.release_held`."""
        self._check_open()
        wanted = set(function_ids)
        in_queues = None if queues is None else set(queues)
        count = 0
        for row in self._rows.values():
            if (
                row.state == "held"
                and row.function_id in wanted
                and (in_queues is None or row.queue in in_queues)
            ):
                row.state = "queued"
                self._push_ready(row)
                count += 1
        return count

    async def mistyped_queues(self, fifo: Sequence[str], standard: Sequence[str]) -> list[str]:
        """Queues whose live jobs are of the other type; see :meth:`Store.mistyped_queues`."""
        self._check_open()
        fifo_names, standard_names = set(fifo), set(standard)
        found = {
            row.queue
            for row in self._rows.values()
            if row.state in ("queued", "running", "held")
            and (row.queue in fifo_names if row.group is None else row.queue in standard_names)
        }
        return sorted(found)

    def _ready_valid(self, entry: tuple[float, int, str]) -> bool:
        row = self._rows.get(entry[2])
        return row is not None and row.state == "queued" and row.available_at == entry[0]

    def _head_valid(self, index: _QueueIndex, entry: tuple[float, int, str]) -> bool:
        members = index.groups.get(entry[2])
        head = self._rows[members[0]] if members else None
        return (
            head is not None
            and head.seq == entry[1]
            and head.state == "queued"
            and head.available_at == entry[0]
        )

    def _sweep(self, index: _QueueIndex) -> None:
        """Drop the stale entries of ``index``'s heaps: cancelled jobs' entries would
        otherwise stay until their time came (a delay of days: days after the runs were
        pruned). Once they are the majority, so it costs O(1) a cancel, amortised."""
        index.ready[:] = [e for e in index.ready if self._ready_valid(e)]
        heapq.heapify(index.ready)
        index.group_heads[:] = [e for e in index.group_heads if self._head_valid(index, e)]
        heapq.heapify(index.group_heads)
        index.stale = 0

    async def next_available_at(self, queue: str, now: float) -> float | None:
        """Earliest future availability in ``queue``; see :meth:`Store.next_available_at`."""
        index = self._queues.get(queue)
        if index is None:
            return None
        best: float | None = None
        heaps: list[list[tuple[float, int, str]]] = [index.ready, index.group_heads]
        for heap in heaps:
            # Drop stale entries at the top so the answer is exact.
            while heap:
                if (
                    self._ready_valid(heap[0])
                    if heap is index.ready
                    else self._head_valid(index, heap[0])
                ):
                    break
                heapq.heappop(heap)
            if heap and heap[0][0] > now and (best is None or heap[0][0] < best):
                best = heap[0][0]
        return best

    # --- runs ------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        """The job with this id; see :meth:`Store.get`."""
        row = self._rows.get(job_id)
        return row.view() if row is not None else None

    async def states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The states of the runs that exist; see :meth:`Store.states`."""
        rows = self._rows
        found: dict[str, str] = {}
        for job_id in job_ids:
            row = rows.get(job_id)
            if row is not None:
                found[job_id] = row.view().state  # as ``get`` shows it
        return found

    async def key_holders(self, function_id: str, keys: Sequence[str]) -> list[Job]:
        """The runs holding these keys; see :meth:`Store.key_holders`."""
        held = (self._keys.get((function_id, key)) for key in dict.fromkeys(keys))
        return [self._rows[job_id].view() for job_id in held if job_id in self._rows]

    async def cancel(self, job_id: str, now: float, owner: str | None = None) -> Job | None:
        """Cancel a run; see :meth:`Store.cancel`."""
        self._check_open()
        row = self._rows.get(job_id)
        if row is None:
            return None
        if row.waiting and owner is not None and row.lease_owner == owner:
            # Prefetched, not started: cancelled as the queued job it reads as. The runtime
            # has had its runner let go of it first (``Runs._withdraw_prefetched``).
            before = row.view()
            row.attempts -= 1
            row.lease_owner = None
            row.lease_until = None
            self._cancel_row(row, now)
            return before
        # Anything else as it is; a job prefetched by another runtime sharing this store
        # is running for it (its runner settles it when it renews the lease).
        before = row.to_job()
        if row.state in ("queued", "held"):
            self._cancel_row(row, now)
        elif row.state == "running":
            row.cancel_requested = True
        return before

    async def prune(self, finished_before: float) -> int:
        """Forget finished runs; see :meth:`Store.prune`. On the event loop, so it lets
        the loop run after every ``_PRUNE_BATCH`` rows."""
        count = 0
        finished = self._finished
        while finished and finished[0][0] < finished_before:
            for _ in range(_PRUNE_BATCH):
                if not finished or finished[0][0] >= finished_before:
                    break
                _, job_id = heapq.heappop(finished)
                row = self._rows.get(job_id)
                if row is not None and row.state in ("completed", "cancelled"):
                    del self._rows[job_id]
                    self._release_key(row)
                    count += 1
            else:
                await asyncio.sleep(0)
        return count

    # --- dead-letter queue -----------------------------------------------------------

    async def list_dead(self, queue: str, *, offset: int = 0, limit: int = 100) -> list[Job]:
        """Dead jobs, oldest failure first; see :meth:`Store.list_dead`."""
        index = self._queues.get(queue)
        if index is None:
            return []
        ids = list(itertools.islice(index.dead, offset, offset + limit))
        return [self._rows[i].to_job() for i in ids]

    async def dead_ids(self, queue: str) -> list[str]:
        """Every dead job's id, oldest failure first; see :meth:`Store.dead_ids`."""
        return self._dead_ids(queue, None)

    def _dead_ids(self, queue: str, job_ids: Sequence[str] | None) -> list[str]:
        index = self._queues.get(queue)
        if index is None:
            return []
        if job_ids is None:
            return list(index.dead)
        # Oldest failure first, each once, whatever order (and repeats) the caller gave,
        # as the file store does; sorted by place, so one id costs no scan of the DLQ.
        dead = index.dead
        return sorted({i for i in job_ids if i in dead}, key=dead.__getitem__)

    async def redrive(self, queue: str, job_ids: Sequence[str] | None, now: float) -> list[str]:
        """Send dead jobs back; see :meth:`Store.redrive`."""
        self._check_open()
        moved = self._dead_ids(queue, job_ids)
        index = self._index(queue)
        for job_id in moved:
            del index.dead[job_id]
            row = self._rows[job_id]
            if row.idempotency_key is not None:
                key = (row.function_id, row.idempotency_key)
                if self._keys.setdefault(key, row.id) != row.id:
                    # A newer run owns the key now: the redriven run gives it up for good,
                    # as in the file store (it must not take it back once that run ends).
                    row.idempotency_key = None
            row.state = "queued"
            row.attempts = 0
            row.seq = next(self._seq)
            row.available_at = now
            row.started_at = None
            row.finished_at = None
            row.cancel_requested = False  # a new run: a stop asked of the dead one is spent
            self._push_live(row)
        return moved

    async def discard(self, queue: str, job_ids: Sequence[str] | None) -> list[str]:
        """Delete dead jobs; see :meth:`Store.discard`."""
        self._check_open()
        gone = self._dead_ids(queue, job_ids)
        index = self._index(queue)
        for job_id in gone:
            del index.dead[job_id]
            del self._rows[job_id]
        return gone

    # --- inspection ------------------------------------------------------------------

    async def counts(self, now: float) -> dict[str, QueueCounts]:
        """Counts per queue; see :meth:`Store.counts`."""
        acc: dict[str, dict[str, float | int | None]] = {}
        for row in self._rows.values():
            c = acc.setdefault(
                row.queue,
                {
                    "ready": 0,
                    "delayed": 0,
                    "running": 0,
                    "held": 0,
                    "dead": 0,
                    "completed": 0,
                    "oldest": None,
                },
            )
            if row.state == "queued" or row.waiting:
                if row.available_at <= now:
                    c["ready"] = int(c["ready"] or 0) + 1
                    oldest = c["oldest"]
                    if oldest is None or row.available_at < oldest:
                        c["oldest"] = row.available_at
                else:
                    c["delayed"] = int(c["delayed"] or 0) + 1
            elif row.state in ("running", "held", "dead", "completed"):
                c[row.state] = int(c[row.state] or 0) + 1
        result: dict[str, QueueCounts] = {}
        for name, c in acc.items():
            oldest = c["oldest"]
            result[name] = QueueCounts(
                ready=int(c["ready"] or 0),
                delayed=int(c["delayed"] or 0),
                running=int(c["running"] or 0),
                held=int(c["held"] or 0),
                dead=int(c["dead"] or 0),
                completed=int(c["completed"] or 0),
                oldest_ready_at=float(oldest) if oldest is not None else None,
            )
        return result

    async def list_jobs(
        self, queue: str | None = None, state: JobState | None = None, *, limit: int | None = 1000
    ) -> list[Job]:
        """Jobs by queue and state in ``seq`` order; see :meth:`Store.list_jobs`."""
        jobs = [
            job
            for job in map(_Row.view, self._rows.values())
            if (queue is None or job.queue == queue) and (state is None or job.state == state)
        ]
        jobs.sort(key=lambda j: j.seq)
        return jobs if limit is None else jobs[:limit]
