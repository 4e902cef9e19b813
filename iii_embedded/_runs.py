"""Runs: every enqueued job is a run whose id is its receipt (Trigger.dev-style triggering).

``batch_trigger`` stores many runs in one transaction; ``trigger_and_wait`` and
``batch_trigger_and_wait`` enqueue (so retries and backoff apply) and wait for the final
outcome; ``iii.runs.get``/``cancel`` inspect and stop runs.

Waiting registers a callback with the runtime (called when this process settles the run)
and then reads the run from the store, so a run that finished in between is not missed; on
a store shared with other processes it also re-reads the run every ``poll_interval_ms``.

A queued handler that waits lends its concurrency slot to its queue while it waits (see
docs/design.md, "Waiting inside a handler"): a handler on a queue with concurrency 1 can
wait for a job of the same queue. Waiting for a job of one's own FIFO group can never end
(the group is blocked by the waiter), so it fails at once with ``InvocationError("deadlock")``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs

from ._actions import EnqueueAction
from ._context import Invocation
from ._errors import InvocationError, RunFailedError
from ._runtime import Runtime
from ._stores import ErrorInfo, Job, Outcome

if TYPE_CHECKING:
    from ._app import III

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
    """A run as it stands: what it runs, where it is, and how it ended."""

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
            error=job.error if status == "failed" else None,
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


# --- triggering ------------------------------------------------------------------------


async def batch_trigger(
    rt: Runtime,
    function_id: str,
    payloads: Sequence[Any],
    *,
    queue: str,
    delay_ms: int = 0,
    idempotency_keys: Sequence[str | None] | None = None,
    max_attempts: int | None = None,
) -> list[str]:
    """Store one run per payload in one transaction (all or none); their ids in order."""
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


def _check_deadlock(
    rt: Runtime, inv: Invocation | None, queue: str, payloads: Sequence[Any]
) -> None:
    if inv is None or inv.action != "enqueue" or inv.queue != queue:
        return
    config = rt.config.queues.get(queue)
    if config is None or not config.is_fifo:
        return
    field = config.message_group_field
    for payload in payloads:
        if isinstance(payload, dict) and field in payload and payload[field] == inv.group:
            raise InvocationError(
                "deadlock",
                f"a handler of FIFO queue '{queue}' (group {inv.group!r}) would wait for a "
                "job of its own group, which cannot start until the handler returns: "
                "enqueue it without waiting, or use another group or queue",
            )


async def wait_for_runs(
    rt: Runtime, ids: Sequence[str], *, timeout_ms: int | None, inv: Invocation | None
) -> list[RunResult]:
    """Wait until every run in ``ids`` is final; results in the same order."""
    runner = rt.runners.get(inv.queue) if inv is not None and inv.queue else None
    lend = runner is not None and inv is not None and inv.action == "enqueue"
    if lend:
        assert runner is not None
        runner.lend_slot()
    try:
        deadline = math.inf if timeout_ms is None else anyio.current_time() + timeout_ms / 1000
        results: list[RunResult | None] = [None] * len(ids)
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())) as scope:
            async with anyio.create_task_group() as tg:
                for index, run_id in enumerate(ids):
                    tg.start_soon(_wait_one, rt, run_id, results, index)
        if scope.cancelled_caught:
            pending = sum(r is None for r in results)
            raise InvocationError(
                "TIMEOUT",
                f"{pending} run(s) were not finished after {timeout_ms} ms (they go on)",
            )
        return [r for r in results if r is not None]
    finally:
        if lend:
            assert runner is not None
            runner.reclaim_slot()


async def _wait_one(rt: Runtime, run_id: str, results: list[RunResult | None], index: int) -> None:
    event = anyio.Event()

    def settled(_job: Job | None, _outcome: Outcome) -> None:
        event.set()

    rt.on_final(run_id, settled)
    try:
        while True:
            job = await rt.store.get(run_id)
            if job is None:
                raise InvocationError("run_not_found", f"run {run_id} does not exist any more")
            if job.state in _FINAL:
                results[index] = _result(job, rt.clock.now())
                return
            poll = rt.config.queues[job.queue].poll_interval_ms / 1000 if rt.store.shared else None
            with anyio.move_on_after(poll if poll is not None else math.inf):
                await event.wait()
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
    _check_deadlock(rt, inv, queue, [payload])
    action = EnqueueAction(
        queue=queue, delay_ms=delay_ms, idempotency_key=idempotency_key, max_attempts=max_attempts
    )
    ids = await rt.enqueue(function_id, [payload], action, batch=False)
    [result] = await wait_for_runs(rt, ids, timeout_ms=timeout_ms, inv=inv)
    return result


async def batch_trigger_and_wait(
    rt: Runtime,
    function_id: str,
    payloads: Sequence[Any],
    *,
    queue: str,
    timeout_ms: int | None = None,
    idempotency_keys: Sequence[str | None] | None = None,
    inv: Invocation | None = None,
) -> BatchResult:
    """Store a batch atomically and wait for all of it; never raises for a failed item."""
    _check_deadlock(rt, inv, queue, payloads)
    ids = await batch_trigger(
        rt, function_id, payloads, queue=queue, idempotency_keys=idempotency_keys
    )
    return BatchResult(runs=await wait_for_runs(rt, ids, timeout_ms=timeout_ms, inv=inv))


# --- iii.runs --------------------------------------------------------------------------


class Runs:
    """``iii.runs``: look runs up and cancel them."""

    def __init__(self, app: III) -> None:
        self._app = app

    async def get_async(self, run_id: str) -> Run | None:
        """The run with this id, or ``None`` (unknown, or pruned after its retention)."""
        rt = self._app.runtime
        job = await rt.store.get(run_id)
        return Run.from_job(job, rt.clock.now()) if job is not None else None

    def get(self, run_id: str) -> Run | None:
        """Blocking twin of :meth:`get_async`."""
        result: Run | None = self._app._call_blocking(self.get_async, run_id)
        return result

    async def cancel_async(self, run_id: str) -> CancelResult:
        """Cancel a run: a queued or delayed run at once; a running one is asked to stop
        (an async handler is cancelled at its next await; a sync handler cannot be
        interrupted, so its result is dropped); a finished run is left as it is."""
        rt = self._app.runtime
        now = rt.clock.now()
        before = await rt.store.cancel(run_id, now)
        if before is None:
            return CancelResult(
                id=run_id, cancelled=False, status_before=None, message="no such run"
            )
        status = _status(before, now)
        if before.state in ("queued", "held"):
            rt.run_settled_elsewhere(run_id)
            return CancelResult(
                id=run_id, cancelled=True, status_before=status, message=f"cancelled while {status}"
            )
        if before.state == "running":
            runner = rt.runners.get(before.queue)
            entry = runner.active.get(run_id) if runner is not None else None
            if runner is not None and entry is not None:
                runner.interrupt(entry, "cancelled")
            return CancelResult(
                id=run_id, cancelled=True, status_before=status, message="running; asked to stop"
            )
        return CancelResult(
            id=run_id,
            cancelled=False,
            status_before=status,
            message=f"nothing to cancel: the run already {status}",
        )

    def cancel(self, run_id: str) -> CancelResult:
        """Blocking twin of :meth:`cancel_async`."""
        result: CancelResult = self._app._call_blocking(self.cancel_async, run_id)
        return result
