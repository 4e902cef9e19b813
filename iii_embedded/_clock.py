"""Clocks: the one place the runtime reads time from.

The runtime never calls ``time.time()`` or ``anyio.sleep()`` for anything a test might want
to control (backoff, delays, timeouts, cron). It asks its ``Clock``. ``SystemClock`` is the
real one; ``VirtualClock`` (public through :mod:`iii_embedded.testing`) moves only when told
to, so a job that backs off for minutes completes in microseconds of wall time.

Times are seconds since the epoch as floats (wall time, so that they mean the same thing in
every process that shares a file store).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock", "VirtualClock"]


class Clock(Protocol):
    """What the runtime needs from a clock."""

    def now(self) -> float:
        """Current time, seconds since the epoch."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (cancellable)."""

    def deadline_scope(self, deadline: float) -> ContextManager[anyio.CancelScope]:
        """A context manager entering a cancel scope that is cancelled when ``now()``
        reaches ``deadline``."""

    def call_at(
        self, deadline: float, callback: Callable[[], None], *, drain_stops: bool = True
    ) -> Callable[[], None]:
        """Call ``callback`` on the event loop when ``now()`` reaches ``deadline``; returns a
        function that cancels the call. ``drain_stops``: a virtual clock's ``drain`` moves
        time to this deadline on its way to a later one, rather than past it (timeouts);
        cron's schedule says no (missed fire times collapse into one)."""

    @property
    def is_virtual(self) -> bool:
        """True for clocks that only move when advanced."""


class SystemClock:
    """The wall clock (``time.time``), with anyio's monotonic clock for sleeping."""

    is_virtual = False

    now = staticmethod(time.time)
    """Current wall time (``time.time`` itself: the runtime reads it several times per
    job, and a Python method around it cost a frame each time)."""

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the wall clock reaches ``deadline``."""
        delay = deadline - time.time()
        if delay > 0:
            await anyio.sleep(delay)

    def call_at(
        self, deadline: float, callback: Callable[[], None], *, drain_stops: bool = True
    ) -> Callable[[], None]:
        """Schedule ``callback`` on the running asyncio loop at wall time ``deadline``."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, deadline - time.time()), callback)
        return handle.cancel

    def deadline_scope(self, deadline: float) -> ContextManager[anyio.CancelScope]:
        """A cancel scope whose deadline is ``deadline`` in wall time."""
        return anyio.CancelScope(deadline=anyio.current_time() + (deadline - time.time()))


_SWEEP_AT = 64
"""The fewest timers cancelled before their time that make a clock sweep its heap."""


class _Timer:
    __slots__ = ("active", "fire", "loop", "stop")

    def __init__(
        self, fire: Callable[[], None], stop: bool, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.fire = fire
        self.active = True
        self.stop = stop
        self.loop = loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _fire_into(timer: _Timer, done: concurrent.futures.Future[None]) -> None:
    """Fire ``timer`` on its loop (handed there by ``advance_to`` from another thread)."""
    try:
        timer.fire()
    except BaseException as exc:
        done.set_exception(exc)
    else:
        done.set_result(None)


class VirtualClock:
    """A clock that moves only when advanced.

    ``advance(seconds)`` / ``advance_to(t)`` move it and wake every sleeper and cancel scope
    whose deadline has passed. ``next_deadline()`` tells a driver (``drain()``) where the next
    live timer is. A timer fires on the event loop it was set on: advancing the clock from
    another thread (a synchronous test of an app started with ``iii.start()``) hands each
    due timer to its loop and returns once they have all fired.
    """

    is_virtual = True

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._lock = threading.Lock()  # the heap, from the loops' and a test's threads
        self._cancelled = 0
        """Timers cancelled before their time since the last sweep (``_cancel``)."""

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def next_deadline(self) -> float | None:
        """The earliest live timer, or ``None``."""
        with self._lock:
            while self._timers and not self._timers[0][2].active:
                heapq.heappop(self._timers)
            return self._timers[0][0] if self._timers else None

    def next_stop(self) -> float | None:
        """The earliest live timer that ``drain`` stops at (a timeout; not a cron fire)."""
        with self._lock:
            stops = [when for when, _, timer in self._timers if timer.active and timer.stop]
        return min(stops) if stops else None

    def _add_timer(self, deadline: float, fire: Callable[[], None], stop: bool) -> _Timer:
        timer = _Timer(fire, stop, _running_loop())
        with self._lock:
            heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def _cancel(self, timer: _Timer) -> None:
        """Cancel ``timer`` (its entry stays in the heap until its time, with what its
        callback holds); sweep the heap once the cancelled outnumber the live."""
        with self._lock:
            if not timer.active:
                return  # fired already, or cancelled
            timer.active = False
            self._cancelled += 1
            if self._cancelled >= _SWEEP_AT and 2 * self._cancelled > len(self._timers):
                self._timers[:] = [entry for entry in self._timers if entry[2].active]
                heapq.heapify(self._timers)
                self._cancelled = 0

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire the timers that are due."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (no-op if it is in the past) and fire due timers,
        each on its own event loop. From a thread that runs no event loop, returns once
        they have fired."""
        due: list[_Timer] = []
        with self._lock:
            if when > self._now:
                self._now = when
            while self._timers and self._timers[0][0] <= self._now:
                _, _, timer = heapq.heappop(self._timers)
                if timer.active:
                    timer.active = False
                    due.append(timer)
        here = _running_loop()
        handed: list[tuple[asyncio.AbstractEventLoop, concurrent.futures.Future[None]]] = []
        for timer in due:
            loop = timer.loop
            if loop is None or loop is here:
                timer.fire()
                continue
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            try:
                loop.call_soon_threadsafe(_fire_into, timer, done)
            except RuntimeError:  # its loop is closed: nothing waits on it any more
                continue
            handed.append((loop, done))
        if here is not None:
            return  # another loop's timers fire there in their turn (its thread may wait on us)
        for loop, done in handed:
            while not done.done() and loop.is_running():
                concurrent.futures.wait([done], timeout=0.05)
            if done.done():
                done.result()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the virtual time reaches ``deadline``."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        timer = self._add_timer(deadline, event.set, False)
        try:
            await event.wait()
        finally:
            self._cancel(timer)

    def call_at(
        self, deadline: float, callback: Callable[[], None], *, drain_stops: bool = True
    ) -> Callable[[], None]:
        """Call ``callback`` when virtual time reaches ``deadline`` (``drain_stops``: see
        :meth:`Clock.call_at`)."""
        timer = self._add_timer(deadline, callback, drain_stops)

        return functools.partial(self._cancel, timer)

    @contextmanager
    def deadline_scope(self, deadline: float) -> Iterator[anyio.CancelScope]:
        """A cancel scope cancelled when virtual time reaches ``deadline``."""
        with anyio.CancelScope() as scope:
            if deadline <= self._now:
                scope.cancel()
                yield scope
                return
            timer = self._add_timer(deadline, scope.cancel, True)
            try:
                yield scope
            finally:
                self._cancel(timer)
