"""Clocks: the one place the runtime reads time from.

The runtime never calls ``time.time()`` or ``anyio.sleep()`` for anything a test might want
to control (backoff, delays, timeouts, cron). It asks its ``Clock``. ``SystemClock`` is the
real one; ``VirtualClock`` (public through :mod:`iii_embedded.testing`) moves only when told
to, so a job that backs off for minutes completes in microseconds of wall time.

Times are seconds since the epoch as floats (wall time, so that they mean the same thing in
every process that shares a file store).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol

import anyio

__all__ = ["Clock", "SystemClock", "VirtualClock"]


class Clock(Protocol):
    """What the runtime needs from a clock."""

    def now(self) -> float:
        """Current time, seconds since the epoch."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (cancellable)."""

    def cancel_scope_until(self, deadline: float) -> anyio.CancelScope:
        """A cancel scope that is cancelled when ``now()`` reaches ``deadline``."""

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

    def cancel_scope_until(self, deadline: float) -> anyio.CancelScope:
        """A cancel scope whose deadline is ``deadline`` in wall time."""
        return anyio.CancelScope(deadline=anyio.current_time() + (deadline - time.time()))


class VirtualClock:
    """A clock that moves only when advanced.

    ``advance(seconds)`` / ``advance_to(t)`` move it and wake every sleeper and cancel scope
    whose deadline has passed. ``next_deadline()`` tells a driver (``drain()``) where the next
    timer is. Must be used from the event loop thread that runs the runtime.
    """

    is_virtual = True

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def next_deadline(self) -> float | None:
        """The earliest pending timer, or ``None``."""
        while self._timers:
            return self._timers[0][0]
        return None

    def _add_timer(self, deadline: float, fire: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (deadline, next(self._seq), fire))

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire the timers that are due."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (no-op if it is in the past)."""
        if when > self._now:
            self._now = when
        while self._timers and self._timers[0][0] <= self._now:
            _, _, fire = heapq.heappop(self._timers)
            fire()
        for listener in list(self._listeners):
            listener()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every advance (the runtime re-checks due jobs)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Undo ``add_listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the virtual time reaches ``deadline``."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        self._add_timer(deadline, event.set)
        await event.wait()

    def cancel_scope_until(self, deadline: float) -> anyio.CancelScope:
        """A cancel scope cancelled when virtual time reaches ``deadline``."""
        scope = anyio.CancelScope()
        if deadline <= self._now:
            scope.cancel()
        else:
            self._add_timer(deadline, scope.cancel)
        return scope
