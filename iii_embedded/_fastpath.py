"""Run a handler without paying for a cancel scope, and stop it when asked.

A cancel scope costs ~7 µs on asyncio (more than a whole no-op job), and most handlers
never suspend. So a handler's coroutine is first stepped by hand: if it finishes on that
first step there was nothing to time out or interrupt. If it suspends, the rest of it is
handed to the event loop through :func:`resume`, a trampoline that passes every value and
exception through unchanged, exactly as ``await`` would (the protocol ``yield from``
implements).

A suspended handler is stopped (timeout, shutdown, run cancellation) with asyncio's own
task cancellation rather than a cancel scope entered *after* its first step: the handler
may have entered scopes of its own during that step, and a scope entered later would nest
the wrong way round. The cancellation we cause is recognised by the :class:`Interrupter`
that caused it, and taken back with ``Task.uncancel()``; any other cancellation passes
through untouched. This ties the runtime to the asyncio backend, which it is built on
(see docs/design.md).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any

__all__ = [
    "Interrupted",
    "Interrupter",
    "run_handler",
    "resume_suspended",
    "resume",
    "first_step",
    "PENDING",
    "raised_by_handler",
    "handler_failed",
]


class _Pending:
    __slots__ = ()

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Any = _Pending()
"""Marker: the coroutine suspended on its first step."""


class Interrupted(Exception):
    """A handler was stopped by its :class:`Interrupter` (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Interrupter:
    """Lets the runtime stop one handler that is suspended."""

    __slots__ = ("reason", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.reason: str | None = None

    def interrupt(self, reason: str) -> None:
        """Stop the handler at its current (or next) suspension point."""
        if self.reason is None:
            self.reason = reason
        task = self.task
        if task is None:
            return
        if task is asyncio.current_task():
            # The handler stops its own run (``runs.cancel`` of its own id): its task is
            # running, so a cancel now would stay pending until the task's next
            # suspension, which, if the handler returns first, is the queue worker's own
            # wait for work, and the worker would die with a CancelledError that cancels
            # the engine's task group (Python < 3.13 keeps it past ``uncancel()``). It is
            # cancelled from the loop instead, only if it is still in the handler then.
            task.get_loop().call_soon(self._cancel_suspended)
        else:
            task.cancel()

    def _cancel_suspended(self) -> None:
        if self.task is not None:
            self.task.cancel()


def first_step(coro: Coroutine[Any, Any, Any]) -> tuple[Any, Any]:
    """Step ``coro`` once: ``(result, None)`` if it finished, else ``(PENDING, yielded)``."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value, None
    return PENDING, yielded


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Continue a coroutine that :func:`first_step` left suspended on ``yielded``."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and anything else thrown in
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def run_handler(
    coro: Coroutine[Any, Any, Any],
    *,
    call_at: Callable[[float, Callable[[], None]], Callable[[], None]],
    deadline: float | None,
    interrupter: Interrupter | None = None,
    on_suspend: Callable[[], None] | None = None,
) -> Any:
    """Await ``coro``; raise :class:`Interrupted` with reason ``"timeout"`` at ``deadline``
    (on the runtime clock, through ``call_at``), or with the reason given to
    ``interrupter.interrupt``. ``on_suspend`` is called once if the handler does not finish
    on its first step (the queue then hands its other jobs to another worker)."""
    if interrupter is not None and interrupter.reason is not None:
        coro.close()
        raise Interrupted(interrupter.reason)
    result, yielded = first_step(coro)
    if result is not PENDING:
        return result
    if on_suspend is not None:
        on_suspend()
    return await resume_suspended(
        coro, yielded, call_at=call_at, deadline=deadline, interrupter=interrupter
    )


async def resume_suspended(
    coro: Coroutine[Any, Any, Any],
    yielded: Any,
    *,
    call_at: Callable[[float, Callable[[], None]], Callable[[], None]],
    deadline: float | None,
    interrupter: Interrupter | None = None,
) -> Any:
    """The rest of :func:`run_handler`, for a coroutine :func:`first_step` left suspended on
    ``yielded`` (callers on the hot path take the first step themselves)."""
    stopper = interrupter if interrupter is not None else Interrupter()
    task = asyncio.current_task()
    assert task is not None
    stopper.task = task
    if stopper.reason is not None:
        # Asked to stop during its first step, before there was a task to cancel (the
        # handler cancelled its own run, and the store answered without suspending):
        # it stops at this suspension, as it would have at any later one.
        task.cancel()
    cancel_timer = (
        call_at(deadline, lambda: stopper.interrupt("timeout")) if deadline is not None else None
    )
    try:
        result = await resume(coro, yielded)
    except asyncio.CancelledError:
        if stopper.reason is None:
            raise
        task.uncancel()
        raise Interrupted(stopper.reason) from None
    except BaseException:
        if stopper.reason is not None and task.cancelling():
            # The handler turned our cancellation into an error of its own (a cleanup
            # that raised): take it back too. The task is a queue's long-lived worker,
            # and a count left behind made every later handler in it look cancelled.
            task.uncancel()
        raise
    finally:
        stopper.task = None
        if cancel_timer is not None:
            cancel_timer()
    if stopper.reason is not None and task.cancelling():
        task.uncancel()  # the handler swallowed our cancellation and returned
    return result


def raised_by_handler() -> bool:
    """In an ``except CancelledError`` around a handler: whether the handler raised it
    itself, not a stop of the engine's. Nothing is cancelling the current task, so the
    handler awaited work that someone else cancelled: that is its own error, to record
    as any other. Raised on, it would cancel the engine's task group, which ends the
    program's ``running()`` block silently."""
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


def handler_failed(exc: BaseException) -> bool:
    """In an ``except BaseException`` around a handler: whether ``exc`` is the handler's
    own error, to record as a failure, rather than a stop to pass on. Any ``Exception``; a
    ``CancelledError`` (or a group) when :func:`raised_by_handler` says so; and any other
    ``BaseException`` a handler raises itself, ``sys.exit()``'s ``SystemExit`` and a
    ``KeyboardInterrupt`` raised by hand among them (raised on, out of the engine's task
    they would stop its event loop at once, with no graceful shutdown). Not
    ``GeneratorExit``: a coroutine being closed."""
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, (asyncio.CancelledError, BaseExceptionGroup)):
        return raised_by_handler()
    return not isinstance(exc, GeneratorExit)
