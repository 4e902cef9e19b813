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

    def now(self) -> float:
        """Current wall time."""
        return time.time()

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


class _Timer:
    __slots__ = ("active", "fire", "stop")

    def __init__(self, fire: Callable[[], None], stop: bool) -> None:
        self.fire = fire
        self.active = True
        self.stop = stop


class VirtualClock:
    """A clock that moves only when advanced.

    ``advance(seconds)`` / ``advance_to(t)`` move it and wake every sleeper and cancel scope
    whose deadline has passed. ``next_deadline()`` tells a driver (``drain()``) where the next
    live timer is. While a runtime runs on it, advancing it from another thread (a
    synchronous test of an app started with ``iii.start()``) moves it on the runtime's
    event loop and returns once it has moved there.
    """

    is_virtual = True

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The runtime's event loop (the one its timers wake tasks on), from its thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def unbind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The runtime on ``loop`` has stopped."""
        if self._loop is loop:
            self._loop = None
            self._loop_thread = None

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def next_deadline(self) -> float | None:
        """The earliest live timer, or ``None``."""
        while self._timers and not self._timers[0][2].active:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def next_stop(self) -> float | None:
        """The earliest live timer that ``drain`` stops at (a timeout; not a cron fire)."""
        stops = [when for when, _, timer in self._timers if timer.active and timer.stop]
        return min(stops) if stops else None

    def _add_timer(self, deadline: float, fire: Callable[[], None], stop: bool) -> _Timer:
        timer = _Timer(fire, stop)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire the timers that are due."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (no-op if it is in the past) and fire due timers."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            self._advance_on(loop, when)
            return
        self._advance_here(when)

    def _advance_on(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """``advance_to`` from another thread: the timers wake tasks of ``loop``, so they
        fire there; this returns once they have."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def advance() -> None:
            try:
                self._advance_here(when)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        try:
            loop.call_soon_threadsafe(advance)
        except RuntimeError:  # the loop is closed: nothing waits on its timers any more
            self._advance_here(when)
            return
        while not done.done():
            concurrent.futures.wait([done], timeout=0.05)
            if not done.done() and not loop.is_running():  # stopped meanwhile
                self._advance_here(when)
                return
        done.result()

    def _advance_here(self, when: float) -> None:
        if when > self._now:
            self._now = when
        while self._timers and self._timers[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.active:
                timer.active = False
                timer.fire()

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
            timer.active = False

    def call_at(
        self, deadline: float, callback: Callable[[], None], *, drain_stops: bool = True
    ) -> Callable[[], None]:
        """Call ``callback`` when virtual time reaches ``deadline`` (``drain_stops``: see
        :meth:`Clock.call_at`)."""
        timer = self._add_timer(deadline, callback, drain_stops)

        def cancel() -> None:
            timer.active = False

        return cancel

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
                timer.active = False
