"""Runs: every enqueued job is a run whose id is its receipt (Trigger.dev-style triggering).

``batch_trigger`` stores many runs in one transaction; ``trigger_and_wait`` and
``batch_trigger_and_wait`` enqueue (so retries and backoff apply) and wait for the final
outcome; ``iii.runs.get``/``cancel`` inspect and stop runs.

Waiting registers a callback with the runtime (called when this process settles the run)
and then reads the run from the store, so a run that finished in between is not missed; on
a store shared with other processes one watcher per engine also reads the states of all
the runs its waits are waiting for every ``poll_interval_ms`` (``_Watcher``).
``timeout_ms`` counts on the runtime's clock, like every other timeout.

A queued handler that waits lends its concurrency slot to its queue while it waits, and
takes it back when a slot is free (see ``QueueRunner.lend_slot`` and docs/design.md,
"Waiting inside a handler"): a handler on a queue with concurrency 1 can wait for a job of
the same queue. A wait that can never end fails at once with :class:`DeadlockError`: for a
job of the waiter's own FIFO group (directly, or through a chain of waiting runs in this
process), or for the waiter's own run through an idempotency key.
"""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs

from ._actions import EnqueueAction
from ._config import QueueConfig
from ._context import Invocation, current_invocation
from ._errors import (
    DeadlockError,
    InvocationError,
    InvocationTimeoutError,
    RunFailedError,
    StoreClosedError,
    engine_stopped,
)
from ._ids import new_receipt_id
from ._queues import QueueRunner
from ._runtime import Runtime, check_timeout
from ._stores import ErrorInfo, Job, Outcome

if TYPE_CHECKING:
    from ._app import III
    from ._queues import _Active

__all__ = [
    "Run",
    "RunResult",
    "BatchResult",
    "CancelResult",
    "RunStatus",
    "Runs",
    "batch_trigger",
    "trigger_and_wait",
    "batch_trigger_and_wait",
    "wait_for_run",
]

RunStatus = Literal["queued", "delayed", "running", "completed", "failed", "cancelled"]
_FINAL = {"completed", "dead", "cancelled"}


def _status(job: Job, now: float) -> RunStatus:
    if job.state == "queued":
        return "delayed" if job.available_at > now else "queued"
    if job.state == "held":
        return "queued"
    if job.state == "dead":
        return "failed"
    return job.state


def _output(job: Job) -> Any:
    return json.loads(job.output) if job.output is not None else None


@attrs.define(frozen=True, kw_only=True)
class Run:
    """A run as it stands: what it runs, where it is, and how it ended.

    ``status`` is ``queued`` (also while held for a function not registered here),
    ``delayed`` (``delay_ms`` or a retry's backoff), ``running``, ``completed``, ``failed``
    (in the dead-letter queue) or ``cancelled``. ``output`` is the decoded return value of
    a completed run. ``error`` is the last error recorded: why a failed run failed, or why
    a run waiting for its next attempt failed its previous one. Times are epoch seconds.
    ``payload`` is the decoded payload the run was enqueued with.
    """

    id: str
    function_id: str
    queue: str
    status: RunStatus
    attempts: int
    max_attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    output: Any = None
    error: ErrorInfo | None = None
    payload: Any = None

    @classmethod
    def from_job(cls, job: Job, now: float) -> Run:
        """Build from a store record."""
        status = _status(job, now)
        return cls(
            id=job.id,
            function_id=job.function_id,
            queue=job.queue,
            status=status,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            output=_output(job) if status == "completed" else None,
            error=job.error if status != "completed" else None,
            payload=json.loads(job.payload),
        )


@attrs.define(frozen=True, kw_only=True)
class RunResult:
    """The final outcome of a run: ``ok`` with its ``output``, or its ``error``."""

    ok: bool
    id: str
    function_id: str
    status: RunStatus
    output: Any = None
    error: ErrorInfo | None = None

    def unwrap(self) -> Any:
        """The output; raises :class:`RunFailedError` if the run failed or was cancelled."""
        if self.ok:
            return self.output
        raise RunFailedError(self.id, self.function_id, self.status, self.error)


@attrs.define(frozen=True, kw_only=True)
class BatchResult:
    """The outcomes of a batch, in input order; failed items carry their own error."""

    id: str
    """A fresh id naming this batch (for logs; the store keeps runs, not batches)."""
    runs: list[RunResult]

    @property
    def ok(self) -> bool:
        """True if every run completed."""
        return all(r.ok for r in self.runs)

    @property
    def outputs(self) -> list[Any]:
        """Each run's output (``None`` for runs that did not complete), in input order."""
        return [r.output for r in self.runs]


@attrs.define(frozen=True, kw_only=True)
class CancelResult:
    """What ``runs.cancel`` did. ``cancelled`` is False when there was nothing to cancel."""

    id: str
    cancelled: bool
    status_before: RunStatus | None
    message: str


def _result(job: Job, now: float) -> RunResult:
    status = _status(job, now)
    return RunResult(
        ok=status == "completed",
        id=job.id,
        function_id=job.function_id,
        status=status,
        output=_output(job) if status == "completed" else None,
        error=job.error if status == "failed" else None,
    )


_FINAL_STATUS: dict[str, RunStatus] = {
    "completed": "completed",
    "dead": "failed",
    "cancelled": "cancelled",
}


def _settled_result(job: Job, outcome: Outcome) -> RunResult:
    """The result of ``job`` (as last read) from the final ``outcome`` it was settled with."""
    status = _FINAL_STATUS[outcome.kind]
    completed = status == "completed"
    return RunResult(
        ok=completed,
        id=job.id,
        function_id=job.function_id,
        status=status,
        output=json.loads(outcome.output) if completed and outcome.output is not None else None,
        error=outcome.error if status == "failed" else None,
    )


# --- triggering ------------------------------------------------------------------------


async def batch_trigger(
    rt: Runtime,
    function_id: str,
    payloads: Iterable[Any],
    *,
    queue: str,
    delay_ms: int = 0,
    idempotency_keys: Iterable[str | None] | None = None,
    max_attempts: int | None = None,
) -> list[str]:
    """Store one run per payload in one transaction (all or none); their ids in order."""
    payloads = _payload_list(payloads)  # any iterable, walked once
    idempotency_keys = _key_list(idempotency_keys)
    if idempotency_keys is not None and len(idempotency_keys) != len(payloads):
        raise InvocationError(
            "enqueue_error",
            f"{len(idempotency_keys)} idempotency keys for {len(payloads)} payloads",
        )
    if not payloads:
        return []
    action = EnqueueAction(queue=queue, delay_ms=delay_ms, max_attempts=max_attempts)
    return await rt.enqueue(
        function_id, list(payloads), action, batch=True, idempotency_keys=idempotency_keys
    )


def _payload_list(payloads: Iterable[Any]) -> list[Any]:
    """A batch's payloads as a list (any iterable). One dict, or a string, is refused: it
    would be taken for its keys, or its characters, one run each."""
    if isinstance(payloads, Mapping | str | bytes):
        raise InvocationError(
            "enqueue_error",
            "payloads must be a list (or another iterable) of payloads, one per run, not "
            f"one {type(payloads).__name__}: for a single run, use trigger, or wrap it in a list",
        )
    return list(payloads)


def _key_list(keys: Iterable[str | None] | None) -> list[str | None] | None:
    """A batch's idempotency keys as a list (any iterable, as its payloads); a string is
    refused, not taken for a sequence of one-letter keys."""
    if keys is None:
        return None
    if isinstance(keys, str | bytes):
        raise InvocationError(
            "enqueue_error",
            "idempotency_keys must be a list with one key (or None) per payload, "
            f"not the string {keys!r}",
        )
    return list(keys)


def _group_key(value: Any) -> str:
    """A FIFO group value as the store keys it (JSON text, as ``_runtime`` encodes it)."""
    return json.dumps(value, sort_keys=True)


def _waiting_chain(rt: Runtime, inv: Invocation | None) -> list[Invocation]:
    """``inv`` (a queued job's handler) and every queued handler of this process that
    waits for it, directly or through other runs."""
    chain: list[Invocation] = []
    seen: set[str] = set()
    todo = [inv] if inv is not None and inv.action == "enqueue" else []
    while todo:
        waiter = todo.pop()
        if waiter.receipt_id is None or waiter.receipt_id in seen:
            continue
        seen.add(waiter.receipt_id)
        chain.append(waiter)
        todo.extend(rt.run_waiters.get(waiter.receipt_id, ()))
    return chain


def _payload_groups(rt: Runtime, queue: str, payloads: Sequence[Any]) -> set[str]:
    """The FIFO group keys of payloads about to be enqueued on ``queue``."""
    config = rt.config.queues.get(queue)
    if config is None or not config.is_fifo:
        return set()
    field = config.message_group_field
    groups: set[str] = set()
    for payload in payloads:
        if isinstance(payload, Mapping) and payload.get(field) is not None:
            # A value that is not JSON is refused by enqueue with its own message.
            with contextlib.suppress(TypeError, ValueError):
                groups.add(_group_key(payload[field]))
    return groups


def _check_fifo_deadlock(
    rt: Runtime, chain: Sequence[Invocation], queue: str, groups: set[str]
) -> None:
    """Refuse to wait for a job of a FIFO group whose running head is the waiter itself or
    a run waiting for it: that job cannot start before the wait ends."""
    config = rt.config.queues.get(queue)
    if not chain or not groups or config is None or not config.is_fifo:
        return
    for waiter in chain:
        if waiter.queue != queue or _group_key(waiter.group) not in groups:
            continue
        if waiter is chain[0]:
            who = f"a handler of FIFO queue '{queue}' (group {waiter.group!r})"
        else:
            who = (
                f"run {waiter.receipt_id} of FIFO queue '{queue}' (group {waiter.group!r}) "
                "waits for this handler, and so"
            )
        raise DeadlockError(
            f"{who} would wait for a job of its own group, which cannot start until that "
            "handler returns: enqueue it without waiting, or use another group or queue",
        )


def _check_self_wait(chain: Sequence[Invocation], ids: Sequence[str]) -> None:
    """An idempotency key can name the waiter's own run (or one waiting for it)."""
    waiting = {w.receipt_id for w in chain}
    for run_id in ids:
        if run_id in waiting:
            raise DeadlockError(
                f"the idempotency key names run {run_id}, which is this handler's own run "
                "or waits for it: it cannot finish before this wait does",
            )


async def _check_matched_groups(
    rt: Runtime, chain: Sequence[Invocation], ids: Sequence[str]
) -> None:
    """An idempotency key can name an existing run in the waiter's own FIFO group (on
    any queue: a key names one run whatever the queue), which the check on the payloads
    did not see."""
    if not chain:
        return
    for run_id in dict.fromkeys(ids):
        job = await rt.store.get(run_id)
        if job is not None and job.group is not None and job.state not in _FINAL:
            _check_fifo_deadlock(rt, chain, job.queue, {job.group})


def _slot_runner(rt: Runtime, inv: Invocation | None) -> tuple[QueueRunner, _Active] | None:
    """The runner whose slot ``inv``'s handler holds, and its attempt's entry there (if it
    holds one in this runtime: not a handler of another app in this process, nor a stopped
    one whose thread runs on)."""
    if inv is None or inv.action != "enqueue" or inv.queue is None or inv.receipt_id is None:
        return None
    runner = rt.runners.get(inv.queue)
    holder = None if runner is None else runner.holder(inv.receipt_id, inv.attempt)
    return None if runner is None or holder is None else (runner, holder)


async def wait_for_runs(
    rt: Runtime,
    ids: Sequence[str],
    *,
    timeout_ms: int | None,
    inv: Invocation | None,
    chain: Sequence[Invocation] = (),
) -> list[RunResult]:
    """Wait until every run in ``ids`` is final; results in the same order.

    A queued handler lends its slot while it waits and takes it back afterwards (see
    ``QueueRunner.lend_slot``). ``timeout_ms`` counts on the runtime's clock, like every
    other timeout; on expiry ``InvocationError("TIMEOUT")`` is raised and the runs go on.
    """
    held = _slot_runner(rt, inv)
    runner, lender = held if held is not None else (None, None)
    if runner is not None and lender is not None:
        runner.lend_slot(lender)
    # Who waits for whom, so that a wait further down the chain can see a deadlock.
    waiter = chain[0] if chain else None
    if waiter is not None:
        for run_id in ids:
            rt.run_waiters.setdefault(run_id, []).append(waiter)
    failure: BaseException | None = None
    results: list[RunResult | None] = [None] * len(ids)
    # A Void call, a cron fire or a synchronous call that waits is counted as waiting
    # (see ``only_waiting``).
    call = inv is not None and inv.action in ("void", "cron", "sync")
    if call:
        rt.waiting_calls += 1
    # How many of the runs were reported final to this wait (counted in
    # ``rt.waking_waiters`` until the waiter has its slot back, or goes on; see
    # ``only_waiting``).
    woken = [0] if lender is not None or call else None
    last = False
    try:
        try:
            if timeout_ms is None:
                await _wait_all(rt, ids, results, woken)
            else:
                with rt.clock.deadline_scope(rt.clock.now() + timeout_ms / 1000) as scope:
                    await _wait_all(rt, ids, results, woken)
                if scope.cancelled_caught and any(r is None for r in results):
                    # A deadline shorter than one store read expires before the first
                    # one returns: look once more, so a run final by now is reported so.
                    with anyio.CancelScope(shield=True):
                        await _read_final(rt, ids, results)
                if any(r is None for r in results):
                    pending = sum(r is None for r in results)
                    raise InvocationTimeoutError(
                        f"{pending} of {len(ids)} run(s) were not finished after "
                        f"{timeout_ms} ms (they go on)",
                    )
        except Exception as exc:
            failure = exc
    finally:
        if waiter is not None:
            for run_id in ids:
                waiters = rt.run_waiters.get(run_id)
                if waiters is not None:
                    waiters.remove(waiter)
                    if not waiters:
                        del rt.run_waiters[run_id]
        if runner is not None and lender is not None:
            last = runner.reclaim_slot(lender)
        if woken is not None:
            rt.waking_waiters -= woken[0]
        if call:
            rt.waiting_calls -= 1
    if runner is not None and last:
        await runner.wait_for_room(lender)
    if failure is not None:
        raise failure
    return [r for r in results if r is not None]


async def _wait_all(
    rt: Runtime, ids: Sequence[str], results: list[RunResult | None], woken: list[int] | None
) -> None:
    if len(ids) == 1:
        await _wait_one(rt, ids[0], results, 0, woken)
        return
    errors: list[Exception] = []

    async def wait_one(index: int, run_id: str) -> None:
        try:
            await _wait_one(rt, run_id, results, index, woken)
        except Exception as exc:  # raised as itself below, not in an exception group
            errors.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for index, run_id in enumerate(ids):
            tg.start_soon(wait_one, index, run_id)
    if errors:
        raise errors[0]


async def _read_final(rt: Runtime, ids: Sequence[str], results: list[RunResult | None]) -> None:
    """Fill in the runs of ``ids`` still missing from ``results`` that are final now."""
    now = rt.clock.now()
    for index, run_id in enumerate(ids):
        if results[index] is None:
            job = await rt.store.get(run_id)
            if job is not None and job.state in _FINAL:
                results[index] = _result(job, now)


class _Watch:
    __slots__ = ("event", "interval_s")

    def __init__(self, event: anyio.Event, interval_s: float) -> None:
        self.event = event
        self.interval_s = interval_s


class _Watcher:
    """Whether runs that waits in this process are waiting for were settled by another
    process sharing the store: one read of all their states every poll interval (the
    shortest of the waits' queues'), which wakes the waits whose runs are final or gone.
    Without it each wait read its own run every interval: 400 waits on a file store kept
    the event loop about half busy with reads. Runs this process settles wake their
    waits at once, without a read (``Runtime.on_final``)."""

    def __init__(self) -> None:
        # No reference to the runtime: this is the value of a weak mapping keyed by it.
        self._watched: dict[str, list[_Watch]] = {}
        self._polling = False
        self._sleep: anyio.CancelScope | None = None
        """The poll's wait for its next look (its deadline is moved up for a wait with a
        shorter interval)."""
        self.reads = 0
        """Reads of watched runs' states made (for tests)."""

    def watch(
        self, rt: Runtime, run_id: str, interval_s: float, event: anyio.Event
    ) -> _Watch | None:
        """Set ``event`` once ``run_id`` is seen final or gone; ``None`` if no poll can run
        (the engine is stopping): the caller then looks for itself."""
        if not self._polling:
            if rt.loop_thread != threading.get_ident() or not rt.start_soon(self._poll, rt):
                return None
            self._polling = True
        watch = _Watch(event, interval_s)
        self._watched.setdefault(run_id, []).append(watch)
        sleep = self._sleep
        if sleep is not None:  # a look due later than this wait's interval comes sooner
            sleep.deadline = min(sleep.deadline, anyio.current_time() + interval_s)
        return watch

    def unwatch(self, run_id: str, watch: _Watch) -> None:
        """Stop watching for one wait (it ended, or it was woken)."""
        watches = self._watched.get(run_id)
        if watches is not None and watch in watches:
            watches.remove(watch)
            if not watches:
                del self._watched[run_id]

    async def _poll(self, rt: Runtime) -> None:
        try:
            while self._watched:
                interval = min(w.interval_s for ws in self._watched.values() for w in ws)
                with anyio.move_on_after(interval) as self._sleep:
                    await anyio.sleep_forever()
                self._sleep = None
                ids = list(self._watched)
                if not ids:
                    return
                try:
                    states: dict[str, str] | None = await rt.store.states(ids)
                except Exception:  # the waits read the store themselves and see the error
                    states = None
                self.reads += 1
                for run_id in ids:
                    state = None if states is None else states.get(run_id, "gone")
                    if state is None or state == "gone" or state in _FINAL:
                        for watch in self._watched.get(run_id, ()):
                            watch.event.set()
        finally:
            self._sleep = None
            self._polling = False
            # Cancelled, as the engine stops: the waits still watched look for themselves
            # (they see the store closed, or poll it on their own), or they would hang.
            for watches in self._watched.values():
                for watch in watches:
                    watch.event.set()


_watchers: weakref.WeakKeyDictionary[Runtime, _Watcher] = weakref.WeakKeyDictionary()


def _watcher(rt: Runtime) -> _Watcher:
    watcher = _watchers.get(rt)
    if watcher is None:
        watcher = _watchers[rt] = _Watcher()
    return watcher


async def _wait_one(
    rt: Runtime,
    run_id: str,
    results: list[RunResult | None],
    index: int,
    woken: list[int] | None,
) -> None:
    # Set when this process settles the run, or when the watcher sees it final or gone in
    # a store shared with other processes; a new one after a wake that found it live.
    event = [anyio.Event()]
    final: list[Outcome] = []

    def settled(_job: Job | None, outcome: Outcome) -> None:
        if rt.stopped:  # the engine shut down with the run not final: see below
            event[0].set()
            return
        if woken is not None and not final:
            woken[0] += 1
            rt.waking_waiters += 1
        final.append(outcome)
        event[0].set()

    # Registered before the store is read: a run settled in between is seen by the read,
    # one settled after it sets the event (settling writes the store, then calls back).
    rt.on_final(run_id, settled)
    seen: Job | None = None
    try:
        while True:
            if rt.stopped:
                raise engine_stopped()
            try:
                job = await rt.store.get(run_id)
            except StoreClosedError:
                if not rt.stopping:
                    raise
                raise engine_stopped() from None
            if job is None:
                if seen is not None and final:
                    # Pruned (its retention ended) before this wait could read it: the
                    # outcome it was settled with tells how it ended.
                    results[index] = _settled_result(seen, final[0])
                    return
                raise InvocationError("run_not_found", f"run {run_id} does not exist any more")
            seen = job
            if job.state in _FINAL:
                results[index] = _result(job, rt.clock.now())
                return
            if event[0].is_set():  # woken, and it is live again (a dead run redriven)
                event[0] = anyio.Event()
                if final:
                    # Settled, which took this wait off the run's list: back on it, to
                    # hear of its new end, and no longer counted as woken.
                    if woken is not None:
                        woken[0] -= 1
                        rt.waking_waiters -= 1
                    final.clear()
                    rt.on_final(run_id, settled)
            if not rt.store.shared:  # only this process can settle it
                await event[0].wait()
                continue
            # Another process may settle it: the watcher looks every poll interval (its
            # queue's, or the default's for a queue this process does not serve).
            queue = rt.config.queues.get(job.queue) or QueueConfig()
            poll = queue.poll_interval_ms / 1000
            watcher = _watcher(rt)
            watch = watcher.watch(rt, run_id, poll, event[0])
            if watch is None:  # no watcher in a stopping engine: look again after a poll
                with anyio.move_on_after(poll):
                    await event[0].wait()
                continue
            try:
                await event[0].wait()
            finally:
                watcher.unwatch(run_id, watch)
    finally:
        rt.forget_final(run_id, settled)


async def trigger_and_wait(
    rt: Runtime,
    function_id: str,
    payload: Any,
    *,
    queue: str,
    timeout_ms: int | None = None,
    delay_ms: int = 0,
    idempotency_key: str | None = None,
    max_attempts: int | None = None,
    inv: Invocation | None = None,
) -> RunResult:
    """Enqueue one run and wait for its final outcome."""
    if timeout_ms is not None:
        check_timeout(timeout_ms)
    chain = _waiting_chain(rt, inv)
    _check_fifo_deadlock(rt, chain, queue, _payload_groups(rt, queue, [payload]))
    action = EnqueueAction(
        queue=queue, delay_ms=delay_ms, idempotency_key=idempotency_key, max_attempts=max_attempts
    )
    ids = await rt.enqueue(function_id, [payload], action, batch=False)
    _check_self_wait(chain, ids)
    if idempotency_key is not None:
        await _check_matched_groups(rt, chain, ids)
    [result] = await wait_for_runs(rt, ids, timeout_ms=timeout_ms, inv=inv, chain=chain)
    return result


async def wait_for_run(
    rt: Runtime, run_id: str, *, timeout_ms: int | None, inv: Invocation | None
) -> RunResult:
    """Wait for a run started earlier (``iii.runs.wait``)."""
    if timeout_ms is not None:
        check_timeout(timeout_ms)
    chain = _waiting_chain(rt, inv)
    _check_self_wait(chain, [run_id])
    job = await rt.store.get(run_id)
    if job is None:
        raise InvocationError("run_not_found", f"run {run_id} does not exist")
    if job.group is not None and job.state not in _FINAL:
        _check_fifo_deadlock(rt, chain, job.queue, {job.group})
    [result] = await wait_for_runs(rt, [run_id], timeout_ms=timeout_ms, inv=inv, chain=chain)
    return result


async def batch_trigger_and_wait(
    rt: Runtime,
    function_id: str,
    payloads: Iterable[Any],
    *,
    queue: str,
    timeout_ms: int | None = None,
    delay_ms: int = 0,
    idempotency_keys: Iterable[str | None] | None = None,
    max_attempts: int | None = None,
    inv: Invocation | None = None,
) -> BatchResult:
    """Store a batch atomically and wait for all of it; never raises for a failed item."""
    if timeout_ms is not None:
        check_timeout(timeout_ms)
    payloads = _payload_list(payloads)  # walked twice: the deadlock check, then the enqueue
    idempotency_keys = _key_list(idempotency_keys)
    chain = _waiting_chain(rt, inv)
    _check_fifo_deadlock(rt, chain, queue, _payload_groups(rt, queue, payloads))
    keys = [key for key in idempotency_keys or () if key is not None]
    if chain and keys:
        # Before anything is stored: a key naming a run this wait could never outlast
        # would otherwise fail the wait after the batch's other runs were stored (and ran,
        # their ids never handed back). Checked again after the enqueue, for a key taken
        # in between.
        holders = [job.id for job in await rt.store.key_holders(function_id, keys)]
        _check_self_wait(chain, holders)
        await _check_matched_groups(rt, chain, holders)
    ids = await batch_trigger(
        rt,
        function_id,
        payloads,
        queue=queue,
        delay_ms=delay_ms,
        idempotency_keys=idempotency_keys,
        max_attempts=max_attempts,
    )
    _check_self_wait(chain, ids)
    if idempotency_keys is not None and any(k is not None for k in idempotency_keys):
        await _check_matched_groups(rt, chain, ids)
    runs = await wait_for_runs(rt, ids, timeout_ms=timeout_ms, inv=inv, chain=chain)
    return BatchResult(id=new_receipt_id(), runs=runs)


# --- iii.runs --------------------------------------------------------------------------


def _run_id(run: str | Mapping[str, Any]) -> str:
    """The id of the run ``run`` names: its id, or the receipt ``trigger`` returned for it
    (``{"messageReceiptId": id}``, the run's handle). Anything else is refused by name:
    ``None`` would read as "no such run" and hide a misspelt key, and a value a store
    cannot look up would fail differently in each store."""
    if isinstance(run, str):
        return run
    if isinstance(run, Mapping):
        run_id = run.get("messageReceiptId")
        if isinstance(run_id, str):
            return run_id
    raise InvocationError(
        "invalid_request",
        "a run is named by its id (a string) or by the receipt trigger returned for it "
        f"({{'messageReceiptId': id}}), not {type(run).__name__} {run!r:.100}",
    )


class Runs:
    """``iii.runs``: look runs up, wait for them and cancel them.

    Finished runs (completed or cancelled, with their outputs) are kept for the store's
    ``result_retention_ms`` (a day by default) and then pruned; failed runs stay in their
    dead-letter queue until redriven or discarded.
    """

    def __init__(self, app: III) -> None:
        self._app = app

    async def get_async(self, run_id: str | Mapping[str, Any]) -> Run | None:
        """The run with this id (or receipt), or ``None`` (unknown, or pruned after its
        retention)."""
        result: Run | None = await self._app._on_loop(self._get, _run_id(run_id))
        return result

    def get(self, run_id: str | Mapping[str, Any]) -> Run | None:
        """Blocking twin of :meth:`get_async`."""
        result: Run | None = self._app._call_blocking("iii.runs.get", self._get, _run_id(run_id))
        return result

    async def _get(self, run_id: str) -> Run | None:
        rt = self._app.runtime
        job = await rt.store.get(run_id)
        return Run.from_job(job, rt.clock.now()) if job is not None else None

    async def wait_async(
        self, run_id: str | Mapping[str, Any], *, timeout_ms: int | None = None
    ) -> RunResult:
        """Wait until the run (named by its id or receipt) is final (after its retries)
        and return its outcome, as ``trigger_and_wait`` does for a run it starts. Raises
        ``InvocationError`` with code ``run_not_found`` for an unknown (or pruned) run,
        ``TIMEOUT`` when ``timeout_ms`` passes (the run goes on) and
        :class:`DeadlockError` for a wait that could never end."""
        inv = current_invocation()
        run = _run_id(run_id)
        result: RunResult = await self._app._on_loop(
            lambda: wait_for_run(self._app.runtime, run, timeout_ms=timeout_ms, inv=inv)
        )
        return result

    def wait(self, run_id: str | Mapping[str, Any], *, timeout_ms: int | None = None) -> RunResult:
        """Blocking twin of :meth:`wait_async`."""
        inv = current_invocation()
        run = _run_id(run_id)
        result: RunResult = self._app._call_blocking(
            "iii.runs.wait",
            lambda: wait_for_run(self._app.runtime, run, timeout_ms=timeout_ms, inv=inv),
        )
        return result

    async def cancel_async(self, run_id: str | Mapping[str, Any]) -> CancelResult:
        """Cancel a run (named by its id or receipt): a queued or delayed run at once (it
        never starts); a running one is asked to stop (an async handler is cancelled at
        its next await; a sync handler cannot be interrupted, so its thread is abandoned
        and its result dropped; a handler that returns before the request reaches it keeps
        its outcome); a finished run, or a running one an earlier cancel already asked to
        stop, is left as it is (``cancelled`` is false)."""
        result: CancelResult = await self._app._on_loop(self._cancel, _run_id(run_id))
        return result

    def cancel(self, run_id: str | Mapping[str, Any]) -> CancelResult:
        """Blocking twin of :meth:`cancel_async`."""
        result: CancelResult = self._app._call_blocking(
            "iii.runs.cancel", self._cancel, _run_id(run_id)
        )
        return result

    async def _withdraw_prefetched(self, run_id: str) -> bool:
        """In memory, a prefetched job that has not started reads ``queued``, and the
        store cancels it at once, as any queued job, when this runtime holds its lease
        and says so (``Store.cancel``'s ``owner``). First its runner lets go of it, so
        that no worker or thread starts it (``QueueRunner.withdraw``). True if it did. If
        a thread started it meanwhile, it is registered as running; if its runner has
        already settled it (a cancel that reached it earlier, its outcome not written
        yet), the runner no longer holds it. Either way the store must then treat it as
        the running job it is, for the runner's outcome to settle it (and fire the hooks,
        once)."""
        rt = self._app.runtime
        job = await rt.store.get(run_id)
        if job is not None and job.state == "queued":
            runner = rt.runners.get(job.queue)
            if runner is not None:
                return runner.withdraw(run_id)
        return False

    async def _cancel(self, run_id: str) -> CancelResult:
        rt = self._app.runtime
        now = rt.clock.now()
        withdrawn = not rt.store.shared and await self._withdraw_prefetched(run_id)
        before = await rt.store.cancel(run_id, now, owner=rt.owner if withdrawn else None)
        if before is None:
            return CancelResult(
                id=run_id, cancelled=False, status_before=None, message="no such run"
            )
        status = _status(before, now)
        if before.state in ("queued", "held"):
            rt.cancelled_unclaimed(before)
            return CancelResult(
                id=run_id, cancelled=True, status_before=status, message=f"cancelled while {status}"
            )
        if before.state == "running":
            # Running here: stop it now. Elsewhere (a shared store): its process sees the
            # request when it renews its lease; a later attempt is never started.
            runner = rt.runners.get(before.queue)
            if runner is not None:
                runner.stop_job(run_id, "cancelled")
            if before.cancel_requested:  # an earlier cancel asked already: nothing new
                return CancelResult(
                    id=run_id,
                    cancelled=False,
                    status_before=status,
                    message="running; already asked to stop",
                )
            return CancelResult(
                id=run_id, cancelled=True, status_before=status, message="running; asked to stop"
            )
        return CancelResult(
            id=run_id,
            cancelled=False,
            status_before=status,
            message=f"nothing to cancel: the run already {status}",
        )
