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
import heapq
import itertools
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

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on the event loop when ``now()`` reaches ``deadline``; returns a
        function that cancels the call."""

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

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Schedule ``callback`` on the running asyncio loop at wall time ``deadline``."""
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, deadline - time.time()), callback)
        return handle.cancel

    def deadline_scope(self, deadline: float) -> ContextManager[anyio.CancelScope]:
        """A cancel scope whose deadline is ``deadline`` in wall time."""
        return anyio.CancelScope(deadline=anyio.current_time() + (deadline - time.time()))


class _Timer:
    __slots__ = ("active", "fire")

    def __init__(self, fire: Callable[[], None]) -> None:
        self.fire = fire
        self.active = True


class VirtualClock:
    """A clock that moves only when advanced.

    ``advance(seconds)`` / ``advance_to(t)`` move it and wake every sleeper and cancel scope
    whose deadline has passed. ``next_deadline()`` tells a driver (``drain()``) where the next
    live timer is. Must be used from the event loop thread that runs the runtime.
    """

    is_virtual = True

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, _Timer]] = []

    def now(self) -> float:
        """The current virtual time."""
        return self._now

    def next_deadline(self) -> float | None:
        """The earliest live timer, or ``None``."""
        while self._timers and not self._timers[0][2].active:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def _add_timer(self, deadline: float, fire: Callable[[], None]) -> _Timer:
        timer = _Timer(fire)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and fire the timers that are due."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self.advance_to(self._now + seconds)

    def advance_to(self, when: float) -> None:
        """Move time forward to ``when`` (no-op if it is in the past) and fire due timers."""
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
        timer = self._add_timer(deadline, event.set)
        try:
            await event.wait()
        finally:
            timer.active = False

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when virtual time reaches ``deadline``."""
        timer = self._add_timer(deadline, callback)

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
            timer = self._add_timer(deadline, scope.cancel)
            try:
                yield scope
            finally:
                timer.active = False
