"""A running engine: the store, the queue runners and the three trigger actions.

One :class:`Runtime` exists per lifecycle of an :class:`~iii_embedded.III` app (``running()``,
``run()``, ``start()``). It owns nothing outside the task group it is started in: when the
group ends, everything it started has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import logging
import math
import numbers
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import attrs
from anyio.from_thread import BlockingPortal

from ._actions import EnqueueAction, VoidAction
from ._clock import Clock, SystemClock
from ._codec import dumps_strict
from ._config import COUNT_MAX, Config, QueueConfig
from ._context import Invocation, _current
from ._errors import (
    ConfigError,
    InvocationError,
    InvocationTimeoutError,
    StoreError,
    exception_message,
)
from ._fastpath import (
    PENDING,
    Interrupted,
    first_step,
    handler_failed,
    resume_suspended,
    run_handler,
)
from ._ids import new_receipt_id
from ._queues import QueueRunner, log_dead_lettered
from ._registry import FunctionSpec, Registry
from ._stores import Job, NewJob, Outcome, Store, make_new_job
from ._stores._base import LOST_ATTEMPT, PROCESS_HOST
from ._threads import ThreadPool

if TYPE_CHECKING:
    from ._cron import ScheduleState

__all__ = ["Runtime", "DEFAULT_TIMEOUT_MS", "JobEvent"]

T = TypeVar("T")
log = logging.getLogger("iii_embedded")

STOP_WAIT_S = 5.0
"""How long a shutdown waits for the handlers it cancelled after the grace period before
it says which ones it is still waiting for (it waits for them all the same)."""

DEFAULT_TIMEOUT_MS = 30_000

JobEvent = str
"""One of ``job_started``, ``job_succeeded``, ``job_failed``, ``job_retried``,
``job_dead_lettered``, ``job_cancelled``."""

_FINAL_KINDS = frozenset({"completed", "dead", "cancelled"})

encode_json = dumps_strict
"""Payload serialisation: strict JSON (no NaN/Infinity)."""


class StallGuard:
    """When this process may take back other processes' expired leases (shared stores).

    A lease expires when its owner does not renew it, but an owner may have been unable
    to: the whole machine's writers wait while one process holds SQLite's write lock, and
    a process that was stopped (SIGSTOP, swapped out, its loop blocked) wakes up to find
    every lease expired, its peers' included, though they are alive and ran on. Taking
    those back would run their jobs twice at once. So after this process sees a stall (a
    maintenance pass that began late, one that took long, or failed), it waits one lease
    before it recovers anything: time enough for every live owner to renew. In real time
    (``time.monotonic``), as stalls are; not used under a virtual clock."""

    def __init__(
        self, interval_s: float, lease_s: float, started: float, wall: float | None = None
    ) -> None:
        self.interval_s = interval_s
        self.lease_s = lease_s
        # How long a live owner may go without renewing before its lease can run out:
        # a gap or a pass shorter than that cannot have cost anyone a lease.
        self.threshold_s = max(lease_s - interval_s, interval_s)
        self._last_end: float | None = started  # a stall before the first pass counts
        self._last_wall = wall
        self._began: float | None = None
        self._hold_until = float("-inf")

    def stalled(self, now: float) -> None:
        """Something held this process or the store up: hold recovery for a lease."""
        self._hold_until = max(self._hold_until, now + self.lease_s)

    def pass_began(self, now: float, wall: float | None = None) -> None:
        """A maintenance pass begins; late (a stall in between) if the last one ended
        more than ``threshold_s`` ago. ``wall`` (``time.time()``) catches what the
        monotonic clock does not count: a machine suspended, or its clock moved on."""
        self._began = now
        if self._last_end is not None:
            gap = now - self._last_end
            suspended = (
                wall is not None
                and self._last_wall is not None
                and (wall - self._last_wall) - gap > self.interval_s
            )
            if suspended or gap > self.threshold_s + self.interval_s:
                self.stalled(now)
        self._last_wall = wall

    def pass_ended(self, now: float, wall: float | None = None) -> None:
        """A maintenance pass ended (its prune runs beside the passes, see ``_prune``,
        and may take long without keeping anyone from renewing); a long one (waiting for
        the write lock) is a stall."""
        if self._began is not None and now - self._began > self.threshold_s:
            self.stalled(now)
        self._last_end, self._began = now, None
        if wall is not None:
            self._last_wall = wall

    def may_recover(self, now: float) -> bool:
        """True if no stall was seen in the last lease, or in this pass so far."""
        if self._began is not None and now - self._began > self.threshold_s:
            self.stalled(now)
        return now >= self._hold_until


def make_owner_id() -> str:
    """A lease owner id: ``host:pid:random``, where ``host`` names the PID namespace too
    (``PROCESS_HOST``); the pid lets others in it see we are gone."""
    return f"{PROCESS_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Runtime:
    """The engine while it runs."""

    def __init__(
        self,
        *,
        config: Config,
        registry: Registry,
        clock: Clock,
        store: Store,
        hooks: Mapping[str, Sequence[Callable[..., Any]]],
        shutdown_grace_s: float,
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.store = store
        self.hooks = hooks
        self.shutdown_grace_s = shutdown_grace_s
        self.owner = make_owner_id()
        self.lease_s = config.store.lease_ms / 1000
        self.runners: dict[str, QueueRunner] = {
            name: QueueRunner(self, q) for name, q in config.queues.items()
        }
        self.loop_thread: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.portal: BlockingPortal | None = None
        self._waking: set[str] = set()
        """Queues whose dispatcher a wake from another thread is on its way to."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._void_inflight = 0
        self.pending_work = 0
        """Work under way outside the queues that ``drain`` must wait for: cron fires
        (from the moment their time comes) and releases of held jobs."""
        self.waking_waiters = 0
        """Runs a lending waiter was told are final, until it has its slot back."""
        self.voids_stopping = 0
        """Void calls that are running ``III.shutdown`` (the grace period does not wait
        for them: they wait for it)."""
        self.calls_stopping = 0
        """Synchronous calls that are running ``III.shutdown`` (as ``voids_stopping``)."""
        self._hooks_inflight = 0
        """Async hooks running (``emit``): drain and the grace period wait for them."""
        self.waiting_calls = 0
        """Void calls, cron fires and synchronous calls (counted in ``_void_inflight``,
        ``pending_work`` and ``calls_inflight``) whose handler is waiting for runs (see
        ``only_waiting``)."""
        self.calls_inflight = 0
        """Synchronous calls (no action) whose handler has not returned in its first step."""
        self._activity = anyio.Event()
        self._unknown_warned: set[str] = set()
        self._final_waiters: dict[str, list[Callable[[Job | None, Outcome], None]]] = {}
        self.run_waiters: dict[str, list[Invocation]] = {}
        """Run id → the queued handlers waiting for it (``_runs`` refuses waits that could
        never end, such as one on the waiter's own FIFO group further down a chain)."""
        self.stopping = False
        self.stopped = False
        """The shutdown has closed the store: nothing here settles a run any more, and a
        wait for one ends with ``engine_stopped`` (see ``_runs._wait_one``)."""
        self.cron_fires: set[str] = set()
        """Cron jobs whose fire this runtime took in a shared store and is running."""
        self.cron_schedules: dict[str, ScheduleState] = {}
        """The cron schedules' states, by job id (see ``_cron``)."""
        self._sync_invocations: dict[str, Invocation] = {}
        self._thread_invocations: dict[str, Invocation] = {}
        """The invocations of synchronous calls that skip the loop (``call_in_threads``):
        equal to ``_sync_invocations``' but other objects, which ``stopped_by`` tells
        apart."""
        self._pruning = False
        """A prune of expired runs is under way (``_prune``)."""
        self._activity_waiters = 0
        # Threads for sync handlers of synchronous and Void calls (queues have their own).
        self.threads = ThreadPool("calls", max_threads=64)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, tg: anyio.abc.TaskGroup, portal: BlockingPortal) -> None:
        """Recover what was left running and start the queues (the store is open)."""
        self._tg = tg
        self.portal = portal
        self.loop_thread = threading.get_ident()
        self.loop = asyncio.get_running_loop()
        self._waking = set()
        await self._check_queue_types()
        now = self.clock.now()
        recovered = await self.store.recover(now)
        if recovered:
            log.warning(
                "recovered %d job(s) left running by a process that stopped", len(recovered)
            )
            self._account_recovered(recovered)
        await self.store.release_held(self.registry.user_ids())
        self.registry.on_register(self._on_register)
        for runner in self.runners.values():
            runner.start(tg)
        tg.start_soon(self._maintain, name="iii-maintenance")
        if self.store.shared:
            tg.start_soon(self._say_unserved, now, name="iii-unserved-queues")

    async def _say_unserved(self, now: float) -> None:
        """Jobs stored in queues this app has no config for wait for an app that has
        (a queue renamed or removed by a new version): say so once, at start. Beside the
        queues, so that counting a large store does not hold them back."""
        try:
            counts = await self.store.counts(now)
        except StoreError:
            return  # the queues' own errors say what is wrong
        waiting = {
            queue: c.ready + c.delayed + c.running + c.held
            for queue, c in sorted(counts.items())
            if queue not in self.runners and c.ready + c.delayed + c.running + c.held
        }
        if waiting:
            log.warning(
                "the store has %d waiting job(s) in queue(s) this app does not serve: %s; "
                "they run in an app whose config has the queue (renamed or removed in this "
                "version?)",
                sum(waiting.values()),
                ", ".join(f"{queue!r} ({n})" for queue, n in waiting.items()),
            )

    async def _check_queue_types(self) -> None:
        """Refuse to start if a queue holds live jobs of the other type than its config
        gives it (stored while it had that type, or by a process configured so): a FIFO
        runner never claims jobs without a group, and a standard one's claim of two jobs
        of one group fails, at every poll. See docs/design.md."""
        queues = self.config.queues.values()
        mistyped = await self.store.mistyped_queues(
            [q.name for q in queues if q.is_fifo], [q.name for q in queues if not q.is_fifo]
        )
        if not mistyped:
            return
        name = mistyped[0]
        ours, theirs = ("standard", "fifo")
        if self.config.queues[name].is_fifo:
            ours, theirs = theirs, ours
        raise ConfigError(
            f"queue '{name}' is configured {ours} here, but the store at "
            f"{self.store.location} holds jobs stored while it was {theirs} (by an earlier "
            "version of the app, or by a process that configures it so), which a "
            f"{ours} queue cannot run: give '{name}' the same type in every process that "
            f"shares the store, and change a queue's type only once its jobs have finished",
            path=self.config.source,
        )

    async def shutdown(self) -> None:
        """Graceful stop: claim nothing more, wait up to the grace period for running jobs,
        give the rest back to their queues without spending an attempt, close the store."""
        self.stopping = True
        self.registry.remove_listener(self._on_register)
        for runner in self.runners.values():
            runner.stop_claiming()
        # Void and synchronous calls in flight are running work too: the grace period
        # covers them.
        with anyio.move_on_after(self.shutdown_grace_s):
            while (
                self._void_inflight > self.voids_stopping
                or self.calls_inflight > self.calls_stopping
                or self._hooks_inflight
                or any(r.inflight for r in self.runners.values())
            ):
                await self.wait_activity()
        for runner in self.runners.values():
            runner.interrupt_all("shutdown")
        with anyio.move_on_after(STOP_WAIT_S):
            while any(r.inflight for r in self.runners.values()):
                await self.wait_activity()
        stuck = sorted(
            f"{entry.job.function_id!r} (job {entry.job.id})"
            for runner in self.runners.values()
            for entry in runner.active.values()
        )
        if stuck:
            # The stop cannot end before they do (a task cannot be killed): say whom it
            # waits for, rather than hang without a word.
            log.warning(
                "shutdown: still waiting for %s, cancelled %s s ago and not stopped; an "
                "async handler must let CancelledError propagate",
                ", ".join(stuck),
                STOP_WAIT_S,
            )
        if self.cron_fires:
            # Cron runs still going are abandoned (cancelled, or left in their thread):
            # the next fire need not wait for their leases to run out.
            try:
                await self.store.end_fires(self.owner, list(self.cron_fires))
            except StoreError as exc:
                log.error("ending the running cron fires failed: %s", exc)
            self.cron_fires.clear()
        try:
            await self.store.aclose()
        finally:
            self.stopped = True
            # Waits for runs that are not final would never end (in memory) or read a
            # closed store: wake them, to end with ``engine_stopped``.
            now = self.clock.now()
            for job_id, waiters in list(self._final_waiters.items()):
                stop = Outcome(job_id=job_id, kind="released", owner=self.owner, attempt=0, at=now)
                for waiter in list(waiters):
                    waiter(None, stop)
        self.threads.close()
        for runner in self.runners.values():
            runner.threads.close()

    def stopped_by(self, invocation: Invocation | None) -> None:
        """``III.shutdown`` is called from inside ``invocation``: a Void call, or a
        synchronous call the grace period counts, is not waited for by it (it waits for
        the stop). A synchronous call of a sync handler from another thread is not
        counted: it runs without the loop, and its own ``Invocation`` tells it apart."""
        if invocation is None:
            return
        if invocation.action == "void":
            self.voids_stopping += 1
        elif invocation is self._sync_invocations.get(invocation.function_id):
            self.calls_stopping += 1

    def add_queue(self, queue: QueueConfig) -> None:
        """Start serving a queue added while running, from any thread."""
        portal = self.portal
        if portal is not None and threading.get_ident() != self.loop_thread and not self.stopping:
            # From another thread (a topic subscription made after ``register_worker``):
            # its runner's tasks must be started on the loop.
            with contextlib.suppress(RuntimeError):  # the portal has stopped: see below
                portal.call(self._add_queue, queue)
                return
        self._add_queue(queue)

    def _add_queue(self, queue: QueueConfig) -> None:
        self.config = attrs.evolve(self.config, queues={**self.config.queues, queue.name: queue})
        runner = self.runners[queue.name] = QueueRunner(self, queue)
        if self._tg is not None and not self.stopping:
            runner.start(self._tg)

    def _on_register(self, spec: FunctionSpec) -> None:
        if threading.get_ident() == self.loop_thread:
            self._start_release(spec.id)
        elif self.portal is not None and not self.stopping:
            with contextlib.suppress(RuntimeError):  # the portal has stopped: so has the engine
                self.portal.call(self._start_release, spec.id)

    def _start_release(self, function_id: str) -> None:
        """On the loop: release ``function_id``'s held jobs, counted as pending work (so
        that a ``drain`` right after a registration waits for the jobs it releases)."""
        if self._tg is None or self.stopping:
            return
        self.pending_work += 1
        self._tg.start_soon(self._release_held, function_id)

    def call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop's thread, from any thread (from another, through
        the portal, waiting for it). Does nothing once the engine is stopping."""
        if self._tg is None or self.stopping:
            return
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        elif self.portal is not None:
            with contextlib.suppress(RuntimeError):  # the portal has stopped: so has the engine
                self.portal.call(fn, *args)

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Start ``fn(*args)`` as a task in the running engine's task group, from any
        thread (from another, such as ``register_worker``'s caller, it is started on the
        loop through the portal), so that it is cancelled when the engine stops. Does
        nothing once the engine is stopping. On the loop: whether it started."""
        if self._tg is None or self.stopping:
            return False
        if threading.get_ident() == self.loop_thread:
            self._tg.start_soon(fn, *args)
            return True
        if self.portal is not None:
            with contextlib.suppress(RuntimeError):  # the portal has stopped: so has the engine
                return bool(self.portal.call(self.start_soon, fn, *args))
        return False

    async def _release_held(self, function_id: str) -> None:
        try:
            self.wake_all()  # before as well as after (see ``QueueRunner.wake``)
            if await self.store.release_held([function_id]):
                self.wake_all()
        except StoreError as exc:
            log.error("releasing held jobs of %r failed: %s", function_id, exc)
        finally:
            self.pending_work -= 1
            self.notify_activity()

    async def _maintain(self) -> None:
        """Renew leases, recover expired ones (shared stores), start pruning old results."""
        store = self.store
        interval = max(self.lease_s / 3, 0.05)
        retention_s = self.config.store.result_retention_ms / 1000
        # A fixed cadence: a pass that ends late (a slow store, a clock advanced meanwhile)
        # does not push every later renewal back.
        next_at = self.clock.now() + interval
        guard = (
            None
            if self.clock.is_virtual
            else StallGuard(interval, self.lease_s, started=time.monotonic(), wall=time.time())
        )
        while True:
            # Counted as pending work from its time, for ``drain`` to wait for the pass,
            # and for the prune it starts (``is_quiet``): a test that moves a virtual
            # clock past a run's retention finds it pruned once it has drained.
            await self.until_due(next_at, drain_stops=False)
            now = self.clock.now()
            next_at += interval
            if next_at <= now:
                next_at = now + interval
            if guard is not None:
                guard.pass_began(time.monotonic(), time.time())
            try:
                for runner in self.runners.values():
                    leased = runner.leased_ids()
                    if leased:
                        renewal = await store.renew(self.owner, leased, now + self.lease_s)
                        if store.shared:  # (in memory prefetched jobs are not leased)
                            runner.leases_renewed(now + self.lease_s, renewal.lost)
                        for job_id in renewal.cancelled:
                            runner.stop_job(job_id, "cancelled")
                if self.cron_fires:
                    await store.renew_fires(self.owner, list(self.cron_fires), now + self.lease_s)
                if store.shared:
                    self.wake_all()  # before as well as after (see ``QueueRunner.wake``)
                    # Jobs another process held for want of a function this one has (an
                    # app of another version sharing the store) are this process's to run,
                    # in the queues it serves (else it would release them for the holder
                    # to hold again, every pass).
                    released = await store.release_held(
                        self.registry.user_ids(), list(self.runners)
                    )
                    recovered: list[Job] = []
                    if guard is None or guard.may_recover(time.monotonic()):
                        recovered = await store.recover(now)
                    if recovered:
                        self._account_recovered(recovered)
                    if recovered or released:
                        self.wake_all()
                if guard is not None:
                    guard.pass_ended(time.monotonic(), time.time())
                if not self._pruning:
                    self._pruning = True
                    assert self._tg is not None
                    self._tg.start_soon(self._prune, now - retention_s, name="iii-prune")
            except StoreError as exc:
                if self.stopping:  # the store closed under a last pass: nothing was lost
                    log.debug("store maintenance stopped with the store: %s", exc)
                    return
                log.error("store maintenance failed: %s", exc)
                if guard is not None:
                    guard.stalled(time.monotonic())  # a lock held too long, say
                    guard.pass_ended(time.monotonic(), time.time())
            finally:
                self.pending_work -= 1
                self.notify_activity()

    async def until_due(self, at: float, *, drain_stops: bool = True) -> None:
        """Sleep until ``at`` on the runtime's clock, and count one piece of pending work
        from that moment (the caller ends it: ``pending_work -= 1``, then
        ``notify_activity()``). Counted by the timer itself, so that a test that advances
        a virtual clock past ``at`` sees the work at once (``drain`` waits for it).
        ``drain_stops``: see :meth:`Clock.call_at`."""
        due = anyio.Event()

        def on_due() -> None:
            if not due.is_set():
                self.pending_work += 1
                due.set()

        if at <= self.clock.now():
            on_due()  # no checkpoint: a cancel there would leave the work counted
            return
        cancel = self.clock.call_at(at, on_due, drain_stops=drain_stops)
        try:
            await due.wait()
        except BaseException:
            cancel()
            if due.is_set():  # due, but cancelled before the caller could end the work
                self.pending_work -= 1
            raise

    async def _prune(self, finished_before: float) -> None:
        """Forget the runs whose retention has ended, beside the maintenance passes: a
        large backlog takes many transactions (or turns of the loop, in memory), and
        must not hold back the next passes' lease renewals. One prune at a time."""
        try:
            await self.store.prune(finished_before)
        except StoreError as exc:
            if self.stopping:  # the store closed under it: nothing was lost
                log.debug("store maintenance stopped with the store: %s", exc)
            else:
                log.error("pruning finished runs failed: %s", exc)
        finally:
            self._pruning = False
            self.notify_activity()

    # --- activity (drain and shutdown wait on it) -------------------------------------

    def notify_activity(self) -> None:
        """Wake anything waiting for the runtime's state to change."""
        if self._activity_waiters:
            self._activity.set()
            self._activity = anyio.Event()

    async def wait_activity(self) -> None:
        """Wait for the next state change (a job finished, a queue went idle)."""
        self._activity_waiters += 1
        try:
            await self._activity.wait()
        finally:
            self._activity_waiters -= 1

    def is_quiet(self) -> bool:
        """True when no queue has work it could start and nothing is running (nor a
        prune of expired runs)."""
        if self._void_inflight or self.pending_work or self._hooks_inflight or self.calls_inflight:
            return False
        if self._pruning:
            return False
        return all(r.idle and not r.unsettled for r in self.runners.values())

    def only_waiting(self) -> bool:
        """True when nothing runs but handlers waiting for runs (queued ones, their slots
        lent; Void calls; cron fires) that nothing here will finish until a delayed run
        falls due: ``drain`` may then move a virtual clock on. Not while a waiter has
        been told its runs are final and has not taken its slot back yet."""
        if (
            self.waking_waiters
            or self._hooks_inflight
            or self._void_inflight + self.pending_work + self.calls_inflight > self.waiting_calls
        ):
            return False
        return all(r.idle and r.unsettled == r.lent for r in self.runners.values())

    def wake_all(self) -> None:
        """Wake every queue's dispatcher."""
        for runner in self.runners.values():
            runner.wake()

    async def next_due(self, after: float | None = None) -> float | None:
        """The earliest time a delayed job becomes available, over all queues (after
        ``after``; by default after now)."""
        now = self.clock.now() if after is None else after
        times = [await self.store.next_available_at(name, now) for name in self.runners]
        due = [t for t in times if t is not None]
        return min(due) if due else None

    # --- job events ------------------------------------------------------------------

    def emit(self, event: JobEvent, job: Job, **info: Any) -> None:
        """Call the user's hooks for ``event``; a failing hook is logged, never raised."""
        listeners = self.hooks.get(event)
        if not listeners:
            return
        for listener in listeners:
            try:
                result = listener(job, **info)
            except BaseException as exc:  # SystemExit too: it would end the event loop
                if not handler_failed(exc):
                    raise
                log.exception("event hook %r for %s failed", listener, event)
                continue
            if inspect.isawaitable(result):  # an async hook: run it beside the engine
                if self._tg is not None:
                    self._hooks_inflight += 1
                    self._tg.start_soon(self._await_hook, result, listener, event)
                elif inspect.iscoroutine(result):  # the engine is not running: never awaited
                    result.close()

    async def _await_hook(self, result: Awaitable[Any], listener: Any, event: str) -> None:
        try:
            await result
        except BaseException as exc:
            if not handler_failed(exc):
                raise  # the engine's own stop
            log.exception("event hook %r for %s failed", listener, event)
        finally:
            self._hooks_inflight -= 1
            self.notify_activity()

    def _account_recovered(self, jobs: Sequence[Job]) -> None:
        """Jobs ``recover`` took back from a process that stopped (or whose leases ran
        out): an attempt lost with it counts as a failed one, here, where it is found (its
        process never reported it): counters, the DLQ warning, and the hooks. An attempt
        given back (the job never started) is no failure."""
        for job in jobs:
            if job.error != LOST_ATTEMPT:
                continue
            dead = job.state == "dead"
            runner = self.runners.get(job.queue)
            if runner is not None:
                runner.failed += 1
                if dead:
                    runner.dead_lettered += 1
                else:
                    runner.retried += 1
            if dead:
                extra = {
                    "function_id": job.function_id,
                    "receipt_id": job.id,
                    "queue": job.queue,
                    "attempt": job.attempts,
                }
                log_dead_lettered(
                    job,
                    job.error,
                    extra,
                    " (its last attempt was lost: its process stopped, or stalled past its lease)",
                )
            if self.hooks:  # as its runner would have reported the attempt's outcome
                lost = Outcome(
                    job_id=job.id,
                    kind="dead" if dead else "retry",
                    owner=self.owner,
                    attempt=job.attempts,
                    at=self.clock.now(),
                    error=job.error,
                    available_at=job.available_at,
                )
                self._emit_outcome(job, lost)

    def jobs_finished(self, runner: QueueRunner, settled: list[tuple[Job, Outcome]]) -> None:
        """Bookkeeping after attempts' outcomes were written (one batch of a runner's)."""
        for job, outcome in settled:
            if outcome.converted_from is not None or self.hooks or self._final_waiters:
                self._job_finished(runner, job, outcome)
        self.notify_activity()

    def _job_finished(self, runner: QueueRunner, job: Job, outcome: Outcome) -> None:
        if outcome.converted_from == "retry":
            # The store wrote the retry as a cancel asked during the attempt: not retried.
            runner.retried -= 1
            log.info(
                "job %s of %r is cancelled: its cancel was asked while the attempt that "
                "failed ran, so it is not retried",
                job.id,
                job.function_id,
                extra={"function_id": job.function_id, "receipt_id": job.id, "queue": job.queue},
            )
        if self.hooks:
            self._emit_outcome(job, outcome)
        if outcome.kind in _FINAL_KINDS and self._final_waiters:
            for waiter in self._final_waiters.pop(job.id, ()):
                waiter(job, outcome)

    def _emit_outcome(self, job: Job, outcome: Outcome) -> None:
        kind = outcome.kind
        if kind == "completed":
            self.emit("job_succeeded", job, output=outcome.output)
        elif kind == "retry":
            self.emit("job_failed", job, error=outcome.error)
            self.emit("job_retried", job, error=outcome.error, available_at=outcome.available_at)
        elif kind == "dead":
            self.emit("job_failed", job, error=outcome.error)
            self.emit("job_dead_lettered", job, error=outcome.error)
        elif kind == "cancelled":
            if outcome.converted_from == "retry":  # the attempt failed, then the cancel
                self.emit("job_failed", job, error=outcome.error)
            self.emit("job_cancelled", job)

    def on_final(self, job_id: str, callback: Callable[[Job | None, Outcome], None]) -> None:
        """Call ``callback`` when this process settles the job for good."""
        self._final_waiters.setdefault(job_id, []).append(callback)

    def forget_final(self, job_id: str, callback: Callable[[Job | None, Outcome], None]) -> None:
        """Undo :meth:`on_final` (the waiter stopped waiting)."""
        waiters = self._final_waiters.get(job_id)
        if waiters and callback in waiters:
            waiters.remove(callback)
            if not waiters:
                del self._final_waiters[job_id]

    def cancelled_unclaimed(self, job: Job) -> None:
        """This process cancelled ``job`` while it was queued (or held), so no runner
        settles it: fire ``job_cancelled`` here, as a runner does for a job it stops, and
        wake the run's waiters. ``job`` is the run as it was before the cancel."""
        job_id = job.id
        if self.hooks:
            self.emit("job_cancelled", job)
        # The queue's dispatcher may sleep until this job's due time (a delayed FIFO head
        # holds its group back until then): let it look again now.
        runner = self.runners.get(job.queue)
        if runner is not None:
            runner.wake()
        for waiter in self._final_waiters.pop(job_id, ()):
            waiter(
                None,
                Outcome(
                    job_id=job_id,
                    kind="cancelled",
                    owner=self.owner,
                    attempt=0,
                    at=self.clock.now(),
                ),
            )

    def note_unknown_function(self, job: Job) -> None:
        """A job for a function not registered here: it is held, once logged per function."""
        if job.function_id not in self._unknown_warned:
            self._unknown_warned.add(job.function_id)
            log.warning(
                "queue %r holds job(s) for function %r, which is not registered in this "
                "process; they wait until it is",
                job.queue,
                job.function_id,
            )

    # --- the three trigger actions -------------------------------------------------------

    async def trigger(
        self,
        function_id: str,
        payload: Any,
        action: EnqueueAction | VoidAction | None,
        timeout_ms: int | None,
    ) -> Any:
        """Carry out one ``trigger`` request on the loop thread."""
        if action is None:
            return await self.call(function_id, payload, timeout_ms)
        if isinstance(action, VoidAction):
            self.fire(function_id, payload)
            return None
        ids = await self.enqueue(function_id, [payload], action, batch=False)
        return {"messageReceiptId": ids[0]}

    async def call(self, function_id: str, payload: Any, timeout_ms: int | None) -> Any:
        """A synchronous invocation: run the handler now and return its value."""
        spec = self.registry.get(function_id)
        if spec is None:
            raise InvocationError("function_not_found", f"Function '{function_id}' not found")
        timeout = DEFAULT_TIMEOUT_MS if timeout_ms is None else timeout_ms
        invocation = self._sync_invocations.get(function_id)
        if invocation is None:
            invocation = Invocation(function_id=function_id, action="sync")
            self._sync_invocations[function_id] = invocation
        token = _current.set(invocation)
        try:
            deadline = self.clock.now() + timeout / 1000
            if spec.is_async:  # the first step inline: most calls end in it, with no timer
                coro = spec.handler(payload)
                result, yielded = first_step(coro)
                if result is not PENDING:
                    return result
                suspended = resume_suspended(
                    coro, yielded, call_at=self.clock.call_at, deadline=deadline
                )
            else:
                suspended = run_handler(
                    self.threads.run(spec.handler, payload),
                    call_at=self.clock.call_at,
                    deadline=deadline,
                )
            # In flight: ``drain`` waits for it (and counts it as waiting only while it
            # waits for runs, see ``only_waiting``). A caller that is itself a call
            # (synchronous, Void, cron) does nothing but wait for this one meanwhile: it
            # counts as waiting, so that a wait for runs further down can let the clock move.
            old = token.old_value
            caller = None if old is contextvars.Token.MISSING else old
            nested = caller is not None and caller.action in ("sync", "void", "cron")
            self.calls_inflight += 1
            self.waiting_calls += nested
            try:
                return await suspended
            finally:
                self.calls_inflight -= 1
                self.waiting_calls -= nested
                self.notify_activity()
        except Interrupted:
            raise InvocationTimeoutError(
                f"Function '{function_id}' did not return within {timeout} ms"
            ) from None
        except BaseException as exc:
            if not handler_failed(exc):
                raise  # the caller's task is being cancelled
            if spec.internal and isinstance(exc, InvocationError):
                raise  # the runtime's own functions answer with their own errors
            raise InvocationError(
                "invocation_failed", f"{type(exc).__name__}: {exception_message(exc)}"
            ) from exc
        finally:
            _current.reset(token)

    def fire(self, function_id: str, payload: Any) -> None:
        """A Void invocation: start the handler and return at once."""
        spec = self.registry.get(function_id)
        if spec is None:
            log.error("void trigger of %r dropped: function not found", function_id)
            return
        assert self._tg is not None
        self._void_inflight += 1
        self._tg.start_soon(self._run_void, spec, payload)

    async def _run_void(self, spec: FunctionSpec, payload: Any) -> None:
        token = _current.set(Invocation(function_id=spec.id, action="void"))
        try:
            if spec.is_async:
                await spec.handler(payload)
            else:
                await self.threads.run(spec.handler, payload)
        except BaseException as exc:
            if not handler_failed(exc):
                raise  # the engine's own stop
            log.exception(
                "void trigger of %r failed (the caller is not told)",
                spec.id,
                extra={"function_id": spec.id},
            )
        finally:
            _current.reset(token)
            self._void_inflight -= 1
            self.notify_activity()

    async def enqueue(
        self,
        function_id: str,
        payloads: Sequence[Any],
        action: EnqueueAction,
        *,
        batch: bool,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Validate and store jobs atomically; return their receipt ids.

        Raises ``InvocationError("enqueue_error", ...)`` naming the bad item (by index for
        batches) and stores nothing if any item is invalid.
        """
        try:
            return await self.submit_enqueue(
                function_id, payloads, action, batch=batch, idempotency_keys=idempotency_keys
            )
        except StoreError as exc:
            raise enqueue_failed(exc) from exc

    def submit_enqueue(
        self,
        function_id: str,
        payloads: Sequence[Any],
        action: EnqueueAction,
        *,
        batch: bool,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> Awaitable[list[str]]:
        """``enqueue`` without its coroutine: validate (raising ``InvocationError`` at
        once), hand the jobs to the store, and return the store's awaitable of their ids,
        which raises ``StoreError`` (see :func:`enqueue_failed`). For the hot path, where a
        coroutine frame less is ~2% of a no-op job on the file store."""
        jobs = self.build_jobs(
            function_id, payloads, action, batch=batch, idempotency_keys=idempotency_keys
        )
        return self._hand_to_store(jobs, action.queue)

    def _hand_to_store(self, jobs: list[NewJob], queue: str) -> Awaitable[list[str]]:
        runner = self.runners.get(queue)
        if runner is None:
            return self.store.enqueue(jobs)
        if not runner.claims_on_enqueue:
            # The dispatcher runs once this task suspends, when the store has the jobs.
            runner.poke()
            return self.store.enqueue(jobs)
        # The queue has drained and has room: its jobs are stored already claimed, and
        # reach the runner when their transaction ends (see ``claim_at_enqueue``).
        claim = runner.claim_at_enqueue(jobs)
        claimed = 0 if claim is None else claim.count
        if claimed < len(jobs):
            # Wake the queue's dispatcher before the commit, not after: it runs only once
            # this task suspends, when the enqueue is already in the writer's queue, so its
            # claim usually shares the enqueue's transaction (one commit from enqueue to
            # start).
            runner.queued_here(jobs[claimed:] if claimed else jobs)
        if claim is None:
            return self.store.enqueue(jobs)
        try:
            return self.store.enqueue_claimed(jobs, claim)
        except BaseException:  # the store is closed, say: nothing was stored
            claim.deliver(claim, None)
            raise

    def from_thread(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> Future[T]:
        """From a thread other than the loop's: run ``await fn(*args)`` on the engine's
        loop and return a future of its result. One wake-up of the loop, and one of the
        caller when the result is set (``BlockingPortal.call`` also waits for the task to
        be spawned: ~40 µs more per call here). Cancelling the future cancels the call."""
        loop = self.loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the engine is not running: start it first")
        coro = fn(*args)
        try:
            # In a context of its own, as a task the portal starts: the caller's context
            # variables (another event loop's among them) stay with the caller.
            return contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()
            raise RuntimeError("the engine is not running: start it first") from None

    def call_in_threads(self, function_id: str, payload: Any) -> Future[Any] | None:
        """From a thread other than the loop's: start a synchronous invocation of a sync
        handler on the runtime's threads, with no hop through the loop, and return the
        pool thread's future; the caller waits on it (two thread wake-ups, where the
        loop's way takes four) and maps its end with :meth:`call_failed`.

        ``None`` when the call must go through the loop (:meth:`from_thread` of
        :meth:`trigger`): an async handler, an unknown function, or a clock other than
        the system's, since the caller's wait is the timeout and it runs in real time."""
        spec = self.registry.get(function_id)
        if spec is None or spec.is_async or not isinstance(self.clock, SystemClock):
            return None
        invocation = self._thread_invocations.get(function_id)
        if invocation is None:
            invocation = Invocation(function_id=function_id, action="sync")
            self._thread_invocations[function_id] = invocation
        context = contextvars.Context()  # a context of its own, as the loop's way gives
        context.run(_current.set, invocation)
        return self.threads.run_from_thread(spec.handler, payload, context)

    @staticmethod
    def call_timeout_s(timeout_ms: int | None) -> float:
        """A synchronous invocation's timeout, in seconds (at most what a thread can wait:
        ``float("inf")`` or a huge figure means no practical limit, not an overflow)."""
        seconds = (DEFAULT_TIMEOUT_MS if timeout_ms is None else timeout_ms) / 1000
        return min(seconds, threading.TIMEOUT_MAX)

    @staticmethod
    def call_failed(
        function_id: str, future: Future[Any], timeout_ms: int | None, exc: BaseException
    ) -> InvocationError:
        """The error for a wait on :meth:`call_in_threads`'s future that raised ``exc``:
        ``TIMEOUT`` if the wait ran out (the future is cancelled: the thread cannot be
        stopped, so it is abandoned and its result dropped), else ``invocation_failed``
        with the handler's exception as its ``__cause__`` (a ``TimeoutError`` the handler
        raised is its own). Raise it ``from`` its ``__cause__``."""
        if future.cancel() or future.cancelled():
            timeout = DEFAULT_TIMEOUT_MS if timeout_ms is None else timeout_ms
            return InvocationTimeoutError(
                f"Function '{function_id}' did not return within {timeout} ms"
            )
        error = InvocationError(
            "invocation_failed", f"{type(exc).__name__}: {exception_message(exc)}"
        )
        error.__cause__ = exc  # raised ``from`` it
        return error

    def fire_from_thread(self, function_id: str, payload: Any) -> None:
        """From a thread other than the loop's: a Void invocation, handed to the loop with
        nothing to wait for (its errors are only logged)."""
        loop = self.loop
        coro = self._fire_soon(function_id, payload)
        try:
            if loop is None:
                raise RuntimeError
            # In a task, not a plain callback: starting the handler's task asks anyio which
            # event loop this is, and with sniffio installed it can tell only inside a task.
            # A context of its own, as for ``from_thread``.
            contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, loop)
        except RuntimeError:  # not started, or the loop has closed
            coro.close()
            raise RuntimeError("the engine is not running: start it first") from None

    async def _fire_soon(self, function_id: str, payload: Any) -> None:
        try:
            self.fire(function_id, payload)
        except Exception:  # the engine stopped meanwhile: nobody reads this task's result
            log.exception("void trigger of %r dropped", function_id)

    # An enqueue from another thread (the blocking ``trigger`` of a program whose engine
    # runs on a background thread, or ``trigger_async`` on another event loop) validates
    # and builds its jobs in the caller's thread and hands them to a file store directly:
    # committed in the caller's thread when it may block and the writer is idle (no
    # wake-up), else by the writer (two: caller to writer and back), where going through
    # the loop takes four. The queue's dispatcher is woken once the jobs are committed.

    def enqueue_elsewhere(
        self, function_id: str, payload: Any, action: EnqueueAction, *, inline: bool
    ) -> tuple[list[NewJob], Future[list[str]] | None]:
        """From a thread other than the loop's: validate and build the jobs (raising
        ``InvocationError``) and hand them to the store if it takes them from other threads.
        Returns the jobs and the store's future, ``None`` if the store takes jobs only on
        its loop (then pass the jobs to :meth:`store_jobs` there)."""
        jobs = self.build_jobs(function_id, [payload], action, batch=False)
        queue = action.queue
        try:
            # The queue is woken once the jobs are committed, before the caller resumes:
            # a job the caller's next step enqueues on the loop must not overtake them.
            future = self.store.enqueue_from_thread(
                jobs, inline=inline, committed=lambda: self._wake_from_thread(queue)
            )
        except StoreError as exc:
            raise enqueue_failed(exc) from exc
        return jobs, future

    async def store_jobs(self, jobs: list[NewJob], queue: str) -> list[str]:
        """On the loop: store jobs built by :meth:`enqueue_elsewhere`."""
        try:
            return await self._hand_to_store(jobs, queue)
        except StoreError as exc:
            raise enqueue_failed(exc) from exc

    def _wake_from_thread(self, queue: str) -> None:
        # One wake on its way per queue: a burst of commits from other threads costs the
        # loop one wake-up, not one each. A wake asked for while one is on its way still
        # lands after the commit that asked for it.
        loop = self.loop
        runner = self.runners.get(queue)
        if loop is None or runner is None or not runner.needs_wake or queue in self._waking:
            return
        self._waking.add(queue)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to wake
            loop.call_soon_threadsafe(self._woken, queue)

    def _woken(self, queue: str) -> None:
        self._waking.discard(queue)
        runner = self.runners.get(queue)
        if runner is not None:
            runner.wake()

    def build_jobs(
        self,
        function_id: str,
        payloads: Sequence[Any],
        action: EnqueueAction,
        *,
        batch: bool,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[NewJob]:
        """Turn payloads into :class:`NewJob` records, validating each (see ``enqueue``)."""
        queue = self.config.queues.get(action.queue)
        if queue is None:
            raise InvocationError("enqueue_error", f"Queue '{action.queue}' not found")
        if function_id not in self.registry:
            raise InvocationError("enqueue_error", f"Function '{function_id}' not found")
        return new_jobs(
            queue,
            function_id,
            payloads,
            action,
            self.clock.now(),
            batch=batch,
            idempotency_keys=idempotency_keys,
        )


def enqueue_failed(exc: StoreError) -> InvocationError:
    """The error an enqueue raises when the store could not take its jobs."""
    return InvocationError("enqueue_error", f"could not store the job: {exc}")


def new_jobs(
    queue: QueueConfig,
    function_id: str,
    payloads: Sequence[Any],
    action: EnqueueAction,
    now: float,
    *,
    batch: bool,
    idempotency_keys: Sequence[str | None] | None = None,
) -> list[NewJob]:
    """Validate payloads for ``queue`` and build their jobs (also used by the CLI, which
    enqueues into a store without an app). Raises ``InvocationError("enqueue_error")``
    naming the bad item (by index for batches)."""
    delay = action.delay_ms
    # An int is the usual case; its bound is the one _is_delay checks for other numbers.
    if not 0 <= delay < 2**63 if delay.__class__ is int else not _is_delay(delay):
        raise InvocationError(
            "enqueue_error",
            f"delay_ms must be a number of milliseconds from 0 to 2**63-1, got {delay!r}",
        )
    max_attempts = queue.max_attempts
    if action.max_attempts is not None:
        given = action.max_attempts
        # Any integer type (numpy's among them), not a bool; stored as a plain int.
        if isinstance(given, bool) or not isinstance(given, numbers.Integral) or given < 1:
            raise InvocationError(
                "enqueue_error", f"max_attempts must be an integer >= 1, got {given!r}"
            )
        max_attempts = int(given)
        if max_attempts > COUNT_MAX:
            raise InvocationError(
                "enqueue_error", f"max_attempts must be at most {COUNT_MAX}, got {given!r}"
            )
    key = action.idempotency_key
    if key is not None:
        _check_key(key, "")
    available_at = now + action.delay_ms / 1000
    fifo = queue.is_fifo
    group: str | None = None
    jobs: list[NewJob] = []
    for index, payload in enumerate(payloads):
        where = f"item {index}: " if batch else ""
        if fifo:
            group = _group_of(queue, payload, where)
        try:
            text = encode_json(payload)
        except (TypeError, ValueError) as exc:
            raise InvocationError(
                "enqueue_error", f"{where}payload is not JSON-serialisable: {exc}"
            ) from exc
        key = action.idempotency_key
        if idempotency_keys is not None:
            key = idempotency_keys[index]
            if key is not None:
                _check_key(key, where)
        jobs.append(
            make_new_job(
                new_receipt_id(),
                queue.name,
                function_id,
                text,
                group,
                now,
                available_at,
                max_attempts,
                key,
            )
        )
    return jobs


def _check_key(key: Any, where: str) -> None:
    """An idempotency key is a string both stores can keep: not one with a lone surrogate
    (a bad decode's ``surrogateescape``), which SQLite's UTF-8 cannot encode."""
    if not isinstance(key, str):
        raise InvocationError(
            "enqueue_error", f"{where}idempotency_key must be a string, got {key!r}"
        )
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError:
            raise InvocationError(
                "enqueue_error",
                f"{where}idempotency_key must be valid Unicode text (no lone surrogate), "
                f"got {key!r}",
            ) from None


def check_timeout(timeout_ms: Any) -> None:
    """A call's ``timeout_ms`` is a number of milliseconds, not negative (a string from a
    request dict would otherwise fail deep in the call, not as a bad request). Checked
    before anything is enqueued, so that a refused call runs nothing."""
    if (
        isinstance(timeout_ms, bool)
        or not isinstance(timeout_ms, (int, float))
        or not timeout_ms >= 0  # NaN too
    ):
        raise InvocationError(
            "invalid_request",
            f"timeout_ms must be a number of milliseconds >= 0, got {timeout_ms!r}",
        )


def _is_delay(value: Any) -> bool:
    """A number of milliseconds to wait: real, finite, not negative (not a bool)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    number = float(value)
    return 0 <= number < 2**63  # NaN fails, and so does infinity


def _group_of(queue: QueueConfig, payload: Any, where: str) -> str:
    """The FIFO group key of ``payload`` for ``queue`` (a FIFO queue)."""
    field = queue.message_group_field
    assert field is not None
    if not isinstance(payload, Mapping) or field not in payload:
        raise InvocationError(
            "enqueue_error",
            f"{where}FIFO queue '{queue.name}' requires field '{field}' in data, "
            "but it was not found",
        )
    value = payload[field]
    if value is None:
        raise InvocationError(
            "enqueue_error", f"{where}FIFO queue '{queue.name}': field '{field}' must not be null"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvocationError(
            "enqueue_error", f"{where}FIFO queue '{queue.name}': field '{field}' must be finite"
        )
    try:
        return json.dumps(value if isinstance(value, str) else _one_number(value), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvocationError(
            "enqueue_error",
            f"{where}FIFO queue '{queue.name}': field '{field}' is not JSON-serialisable",
        ) from exc


def _one_number(value: Any) -> Any:
    """``value`` with its integral floats made ints, so that equal JSON numbers (``1`` and
    ``1.0``) give one group key. Other values are left as they are (``true`` is not ``1``)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {key: _one_number(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_one_number(item) for item in value]
    return value
