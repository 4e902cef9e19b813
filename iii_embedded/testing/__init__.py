"""Testing support: test *your* functions with the runtime's own tools.

* :class:`VirtualClock`: time that moves only when told, so backoff, delays and timeouts
  take no wall time.
* :func:`drain`: wait until every queue is idle, advancing a virtual clock to each delayed
  job's time as needed.
* Inspection: :func:`queued_jobs`, :func:`running_jobs`, :func:`dead_jobs`.
* A pytest plugin (installed with the package) with the fixtures ``iii_clock`` and
  ``iii_app`` (see :mod:`iii_embedded.testing._plugin`).

Example::

    async def test_payment_retries(iii_clock):
        iii = III(config, clock=iii_clock)
        ...
        async with iii.running():
            await iii.trigger_async("pay", {...}, action=TriggerAction.Enqueue(queue="payment"))
            await drain(iii)
            assert [j.attempts for j in await dead_jobs(iii, "payment")] == [5]
"""

from __future__ import annotations

import math
from typing import Literal

import anyio

from .._app import III
from .._clock import VirtualClock
from .._runs import Run
from .._stats import DeadJob

__all__ = [
    "VirtualClock",
    "drain",
    "drain_blocking",
    "queued_jobs",
    "running_jobs",
    "dead_jobs",
    "DrainTimeout",
]


class DrainTimeout(TimeoutError):
    """``drain()`` gave up: the queues were still busy after ``timeout`` seconds of wall time."""


async def drain(app: III, *, timeout: float = 30.0, max_advance_s: float = math.inf) -> None:
    """Wait until every queue of ``app`` is idle and nothing is running.

    With a :class:`VirtualClock`, time is advanced to each delayed job's availability
    (backoff, ``delay_ms``) until none is left or the next one is more than
    ``max_advance_s`` ahead of the time drain started; also while handlers wait for runs
    that are delayed (``trigger_and_wait`` of a job that retries), when nothing else
    runs. With the system clock, drain waits for delayed jobs in real time. A cron fire
    whose time has come (the clock advanced past it) is waited for; cron schedules and a
    running handler's own timers (``timeout_ms``) are not advanced to (advance the clock
    yourself). Raises :class:`DrainTimeout` after ``timeout`` seconds of wall time.
    """
    rt = app.runtime
    clock = rt.clock
    virtual = isinstance(clock, VirtualClock)
    limit = clock.now() + max_advance_s
    with anyio.move_on_after(timeout) as scope:
        while True:
            waiting = False
            while not rt.is_quiet():
                if virtual and rt.only_waiting():
                    waiting = True
                    break
                with anyio.move_on_after(0.05):
                    await rt.wait_activity()
            due = await rt.next_due()
            if due is None or due > limit:
                if rt.is_quiet():
                    return
                if waiting:  # waiting for something no delayed run here will bring
                    with anyio.move_on_after(0.05):
                        await rt.wait_activity()
                continue
            if isinstance(clock, VirtualClock):
                clock.advance_to(due)
            else:
                await clock.sleep_until(due)
            rt.wake_all()
            await anyio.lowlevel.checkpoint()
    if scope.cancelled_caught:
        busy = {name: r.unsettled for name, r in rt.runners.items() if r.unsettled or not r.idle}
        raise DrainTimeout(
            f"queues still busy after {timeout} s of wall time "
            f"(jobs claimed and not settled, by queue: "
            f"{busy or 'none; a Void call or a cron fire runs'})"
        )


def drain_blocking(app: III, *, timeout: float = 30.0) -> None:
    """:func:`drain` for synchronous code, with the engine started by ``app.start()`` (or
    ``register_worker``): blocks until every queue is idle and no Void call is in flight."""
    portal = app.runtime.portal
    assert portal is not None
    portal.call(lambda: drain(app, timeout=timeout))


async def queued_jobs(app: III, queue: str | None = None) -> list[Run]:
    """Runs waiting (ready or delayed) in ``queue`` (or every queue), in enqueue order,
    with their decoded payloads. An unknown queue is a ``ValueError``."""
    return await _runs_in(app, queue, "queued")


async def running_jobs(app: III, queue: str | None = None) -> list[Run]:
    """Runs running now in ``queue`` (or every queue), with their decoded payloads. An
    unknown queue is a ``ValueError``."""
    return await _runs_in(app, queue, "running")


async def _runs_in(app: III, queue: str | None, state: Literal["queued", "running"]) -> list[Run]:
    rt = app.runtime
    if queue is not None and queue not in rt.runners:
        raise ValueError(f"Queue '{queue}' not found")
    now = rt.clock.now()
    return [Run.from_job(job, now) for job in await rt.store.list_jobs(queue, state)]


async def dead_jobs(app: III, queue: str) -> list[DeadJob]:
    """The dead-letter queue of ``queue``, oldest failure first."""
    return await app.dlq_list_async(queue, limit=1_000_000)
