"""Cron triggers: run a function on a schedule, read from the runtime's clock.

``register_trigger({"type": "cron", "function_id": f, "config": {"expression": e}})`` or
``@iii.function("id", cron=e)``. Expressions use iii's 6-field form (seconds first), its
7-field form (seconds first, year last) or the classic 5-field form, parsed by croniter
(the optional ``cron`` extra, imported only when a cron trigger is registered).

The handler gets ``{"trigger": "cron", "job_id", "scheduled_time", "actual_time"}`` (ISO
8601, UTC). A run still going when the next fire time comes is not started twice: that
fire is skipped and logged. If the process was busy (or a test advanced a virtual clock
far ahead) and several fire times passed, the job fires once, for the latest, rather than
in a burst.

``Trigger.unregister`` stops a schedule: its wait for the next fire is cancelled; a fire
already running finishes (``ScheduleState``).

Processes that share a file store share their schedules too: each fire runs in one of
them, whichever takes it first in the store (``Store.claim_fire``), and a fire still
running in one process stops the next one from starting in any other. The fire is leased
like a job: the runtime's maintenance renews it, and a fire whose process died (or whose
lease ran out) no longer holds the schedule back.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import attrs

from ._context import Invocation, _current
from ._errors import StoreError
from ._fastpath import handler_failed, run_handler
from ._triggers import Binding, register_trigger_type

if TYPE_CHECKING:
    from ._app import III
    from ._runtime import Runtime

__all__ = ["CronJob", "ScheduleState", "install_cron", "start_cron", "parse_expression"]

log = logging.getLogger("iii_embedded.cron")


@attrs.define(frozen=True, kw_only=True)
class CronJob:
    """A scheduled function."""

    job_id: str
    function_id: str
    expression: str
    implicit: bool = False
    """True if the id was made here (the trigger gave none): see ``_add_implicit``."""


def _croniter() -> Any:
    try:
        from croniter import croniter
    except ImportError:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            'cron triggers need croniter: pip install "iii-embedded[cron]"'
        ) from None
    return croniter


_SEARCH_YEARS = 200
"""How far ahead a schedule's next fire time is looked for."""


_SHORTHANDS = {
    "@yearly": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * SUN",
    "@daily": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
"""The shorthands iii's parser (the Rust ``cron`` crate) takes, in its 6-field form."""


def parse_expression(expression: str, start: float) -> Any:
    """A croniter iterator over ``expression`` (5, 6 or 7 fields, or a shorthand such as
    ``@daily``) from ``start``."""
    croniter = _croniter()
    fields = _SHORTHANDS.get(expression.strip(), expression).split()
    if len(fields) not in (5, 6, 7):
        count = f"{len(fields)} field{'' if len(fields) == 1 else 's'}"
        raise ValueError(
            f"invalid cron expression {expression!r}: it has {count}; expected 5 "
            "(min hour day month weekday), 6 (iii: seconds first) or 7 (… and year), or one "
            f"of {', '.join(_SHORTHANDS)}"
        )
    base = dt.datetime.fromtimestamp(start, dt.UTC)
    try:
        # croniter looks 50 years ahead by default: a 7-field schedule for a year further
        # off (croniter's years go to 2099) would read as one that never fires.
        return croniter(
            " ".join(fields),
            base,
            second_at_beginning=len(fields) >= 6,
            max_years_between_matches=_SEARCH_YEARS,
        )
    except (ValueError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expression!r}: {exc}") from None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def _register_cron(app: III, trigger: Mapping[str, Any]) -> Binding:
    function_id = trigger.get("function_id")
    config = trigger.get("config") or {}
    expression = config.get("expression") if isinstance(config, Mapping) else None
    if not isinstance(function_id, str) or not function_id:
        raise ValueError("a cron trigger needs a 'function_id'")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"the cron trigger of {function_id!r} needs config.expression")
    now = app.clock.now()
    try:  # fail now, naming the expression
        parse_expression(expression, now).get_next(float)
    except ValueError as exc:  # croniter's errors are ValueErrors
        if str(exc).startswith("invalid cron expression"):
            raise ValueError(f"the cron trigger of {function_id!r}: {exc}") from None
        raise ValueError(
            f"cron expression {expression!r} of {function_id!r} has no fire time after "
            f"{_iso(now)} ({exc})"
        ) from None
    explicit = trigger.get("id") or config.get("job_id")
    explicit = str(explicit) if explicit else None
    # A schedule is known by these, not by its job id: one without an id of its own is
    # renamed when its function gains another (``_add_implicit``).
    key = ("cron", function_id, expression, explicit)
    binding = Binding(key=key, undo=functools.partial(_unregister_cron, app, *key[1:]))
    if any(_is(job, function_id, expression, explicit) for job in app.cron_jobs):
        return binding  # the same schedule registered again: one schedule
    if explicit:
        job_id = explicit
        taken = next((job for job in app.cron_jobs if job.job_id == job_id), None)
        if taken is not None:
            raise ValueError(
                f"cron trigger id {job_id!r} is already the schedule {taken.expression!r} "
                f"of {taken.function_id!r}: give the cron trigger {expression!r} of "
                f"{function_id!r} an 'id' of its own"
            )
        job = CronJob(job_id=job_id, function_id=function_id, expression=expression)
        app.cron_jobs.append(job)
    else:
        job = _add_implicit(app, function_id, expression)
    if app.is_running:  # registered while running: from the loop's thread or another
        rt = app.runtime
        rt.call_on_loop(start_schedule, rt, job, rt.clock.now(), None)
    return binding


def _is(job: CronJob, function_id: str, expression: str, explicit: str | None) -> bool:
    """Whether ``job`` is the schedule a trigger with these names registers (one without
    an explicit id matches whatever name ``_add_implicit`` gave it)."""
    if (job.function_id, job.expression) != (function_id, expression):
        return False
    return job.implicit if explicit is None else job.job_id == explicit


def _unregister_cron(app: III, function_id: str, expression: str, explicit: str | None) -> None:
    """Remove the schedule, and stop it if it runs (a fire already running finishes)."""
    job = next((j for j in app.cron_jobs if _is(j, function_id, expression, explicit)), None)
    if job is None:
        return
    app.cron_jobs.remove(job)
    rt = app._runtime
    if rt is not None:
        rt.call_on_loop(_stop_schedule, rt, job.job_id)


@attrs.define(kw_only=True, eq=False)
class ScheduleState:
    """A running schedule's state, by job id (``Runtime.cron_schedules``). It outlives
    the schedule's task while a fire of it runs, so that the schedule, registered again,
    does not start a second run beside that one."""

    generation: int = 0
    """Bumped to stop the schedule that runs (a schedule started again bumps it too)."""
    busy: bool = False
    """A fire of this job is running."""
    waiting: anyio.CancelScope | None = None
    """The running schedule's wait for its next fire time."""


def _stop_schedule(rt: Runtime, job_id: str) -> None:
    """On the loop: stop the schedule of ``job_id`` (its wait is cancelled now)."""
    state = rt.cron_schedules.get(job_id)
    if state is not None:
        state.generation += 1
        if state.waiting is not None:
            state.waiting.cancel()


def _add_implicit(app: III, function_id: str, expression: str) -> CronJob:
    """Add a schedule whose trigger gave no id, and name it.

    A function with one such schedule has ``cron::FUNCTION_ID``; with several (as in iii,
    each fires on its own), each has ``cron::FUNCTION_ID::EXPRESSION``, whatever order they
    were registered in, so that processes sharing a store agree on them (the store takes
    each fire time once per id). Before the engine starts, the function's schedules are
    renamed as it gains one; a schedule added while it runs cannot rename the running
    ones, so it takes ``cron::FUNCTION_ID`` only if that is free."""
    single = f"cron::{function_id}"
    own = any(j.implicit and j.function_id == function_id for j in app.cron_jobs)
    named = single if single not in {j.job_id for j in app.cron_jobs} else f"{single}::{expression}"
    job = CronJob(job_id=named, function_id=function_id, expression=expression, implicit=True)
    app.cron_jobs.append(job)
    if own and not app.is_running:  # now several: each is named by its expression
        app.cron_jobs[:] = [
            attrs.evolve(j, job_id=f"{single}::{j.expression}")
            if j.implicit and j.function_id == function_id
            else j
            for j in app.cron_jobs
        ]
        job = app.cron_jobs[-1]
    return job


def start_schedule(rt: Runtime, job: CronJob, start: float, tg: anyio.abc.TaskGroup | None) -> None:
    """On the loop: start ``job``'s schedule in ``tg`` (the engine's task group if
    ``None``). Its state is taken now, not when its task first runs, so that an
    unregister in between stops it (``_stop_schedule``); a schedule of the same job id
    that was stopped but whose task has not ended yet ends now."""
    state = rt.cron_schedules.setdefault(job.job_id, ScheduleState())
    state.generation += 1
    args = (rt, job, start, state, state.generation)
    if tg is None:
        rt.start_soon(run_schedule, *args)
    else:
        tg.start_soon(run_schedule, *args, name=f"iii-cron[{job.job_id}]")


async def run_schedule(
    rt: Runtime, job: CronJob, start: float, state: ScheduleState, generation: int
) -> None:
    """Fire ``job`` at each time of its schedule after ``start`` until the runtime stops
    or the schedule is stopped (``state.generation`` is no longer ``generation``).

    ``start`` is taken when the schedule is started, not when this task first runs, so
    no fire time is lost in between."""
    clock = rt.clock
    store = rt.store
    schedule = parse_expression(job.expression, start)

    async def fire(scheduled: float) -> None:
        spec = rt.registry.get(job.function_id)
        token = _current.set(Invocation(function_id=job.function_id, action="cron"))
        try:
            if spec is None:
                log.error("cron job %r: function %r is not registered", job.job_id, job.function_id)
                return
            payload = {
                "trigger": "cron",
                "job_id": job.job_id,
                "scheduled_time": _iso(scheduled),
                "actual_time": _iso(clock.now()),
            }
            coro = spec.handler(payload) if spec.is_async else rt.threads.run(spec.handler, payload)
            await run_handler(coro, call_at=clock.call_at, deadline=None)
        except BaseException as exc:
            if not handler_failed(exc):
                raise  # the engine's own stop
            log.exception("cron job %r (%s) failed", job.job_id, job.function_id)
        finally:
            _current.reset(token)
            if store.shared:
                with anyio.CancelScope(shield=True):
                    try:
                        await store.end_fires(rt.owner, [job.job_id])
                    except StoreError as exc:  # closed: the shutdown ended it already
                        log.debug("cron job %r: could not end its fire: %s", job.job_id, exc)
                rt.cron_fires.discard(job.job_id)
            state.busy = False
            rt.pending_work -= 1
            rt.notify_activity()

    async with anyio.create_task_group() as tg:
        while not rt.stopping and state.generation == generation:
            try:
                scheduled = float(schedule.get_next(float))
            except ValueError:  # croniter found no later time (a year that has passed)
                log.warning(
                    "cron job %r (%s): its schedule %r has no fire time after %s; "
                    "it will not fire again",
                    job.job_id,
                    job.function_id,
                    job.expression,
                    _iso(clock.now()),
                )
                break
            with anyio.CancelScope() as waiting:
                state.waiting = waiting  # cancelled by ``_stop_schedule``
                await rt.until_due(scheduled, drain_stops=False)  # fires collapse
            if state.waiting is waiting:
                state.waiting = None
            if waiting.cancelled_caught:
                break  # unregistered while it waited
            # Counted as pending work from the moment the time came (``drain`` waits for
            # the fire it leads to) until the fire has started or been skipped.
            try:
                if rt.stopping or state.generation != generation:
                    break
                now = clock.now()
                if scheduled < now:
                    # Fire times may have been missed: fire once, for the latest that has
                    # passed (the one every process that shares the store agrees on),
                    # then continue from now.
                    scheduled = _latest(job.expression, scheduled, now)
                    schedule = parse_expression(job.expression, now)
                if state.busy:
                    log.info(
                        "cron job %r skipped at %s: its previous run is still going",
                        job.job_id,
                        _iso(scheduled),
                    )
                    continue
                if store.shared and not await _take(rt, job, scheduled):
                    continue
                state.busy = True
                rt.pending_work += 1  # until the fire ends
                tg.start_soon(fire, scheduled)
            finally:
                rt.pending_work -= 1
                rt.notify_activity()


def _latest(expression: str, scheduled: float, now: float) -> float:
    """The latest fire time of ``expression`` at or before ``now`` (``scheduled`` is one)."""
    try:
        before = float(parse_expression(expression, now).get_prev(float))  # strictly before
    except ValueError:  # no earlier time: ``scheduled`` is the latest known
        return scheduled
    try:
        at_now = float(parse_expression(expression, before).get_next(float))
    except ValueError:  # ``before`` is the schedule's last time (a year field ended)
        return max(scheduled, before)
    return max(scheduled, at_now if at_now <= now else before)


async def _take(rt: Runtime, job: CronJob, scheduled: float) -> bool:
    """Take the fire at ``scheduled`` in a shared store; False if another process has it
    (or still runs the previous one)."""
    now = rt.clock.now()
    try:
        taken = await rt.store.claim_fire(
            job.job_id, scheduled, owner=rt.owner, now=now, lease_until=now + rt.lease_s
        )
    except StoreError as exc:
        log.error("cron job %r skipped at %s: %s", job.job_id, _iso(scheduled), exc)
        return False
    if taken:
        rt.cron_fires.add(job.job_id)
    else:
        log.debug("cron job %r at %s runs in another process", job.job_id, _iso(scheduled))
    return taken


def start_cron(app: III, tg: anyio.abc.TaskGroup) -> None:
    """Start every registered schedule in the engine's task group."""
    rt = app.runtime
    now = rt.clock.now()
    for job in app.cron_jobs:
        start_schedule(rt, job, now, tg)


def install_cron(app: III) -> None:
    """Register the ``cron`` trigger type."""
    register_trigger_type("cron", _register_cron)
