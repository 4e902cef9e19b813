"""The error hierarchy of iii-embedded, in one place.

Each error derives from the built-in it resembles too, so that code written against plain
Python exceptions keeps working (``ConfigError`` is a ``ValueError``, ``StoreError`` an
``OSError``).
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._stores._base import ErrorInfo

__all__ = [
    "IIIError",
    "InvocationError",
    "NonRetryableError",
    "AwaitableResultError",
    "RetryAfter",
    "ConfigError",
    "StoreError",
    "StoreVersionError",
    "RunFailedError",
    "DeadlockError",
    "InvocationTimeoutError",
]


class IIIError(Exception):
    """Base class of every error raised by iii-embedded itself."""


class InvocationError(IIIError, RuntimeError):
    """A ``trigger`` call failed.

    Raised to the caller of a synchronous or enqueue ``trigger``. ``code`` is iii's error
    code (``function_not_found``, ``invocation_failed``, ``TIMEOUT``, ``enqueue_error``) and
    ``message`` says what went wrong; ``str(err)`` is ``"{code}: {message}"``. When a handler
    raised, the original exception is the ``__cause__``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"InvocationError(code={self.code!r}, message={self.message!r})"


class InvocationTimeoutError(InvocationError, TimeoutError):
    """A ``trigger`` or a wait for runs ran out of time (code ``TIMEOUT``).

    An :class:`InvocationError` whose ``code`` is ``"TIMEOUT"``, and a ``TimeoutError`` too,
    so code that catches either catches it. The work it waited for is not stopped: a
    synchronous handler runs to its end (its result is dropped), and runs waited for go on.
    """

    def __init__(self, message: str) -> None:
        super().__init__("TIMEOUT", message)


class NonRetryableError(IIIError):
    """Raise from a queued handler to send its job straight to the dead-letter queue.

    No further attempt is made, whatever ``max_retries`` says. Use it for failures a retry
    cannot fix (a malformed payload, a permanently rejected card).
    """


class RetryAfter(IIIError):
    """Raise from a queued handler to retry after ``delay_ms`` instead of the queue's backoff.

    The attempt still counts towards ``max_retries``. Useful when a remote service says when
    to come back (an HTTP 429 with ``Retry-After``).
    """

    def __init__(self, delay_ms: float, message: str = "") -> None:
        # A finite number: NaN or infinity would park the job for ever (and NaN cannot
        # be stored). Raising here fails the attempt like any other error, with backoff.
        if (
            isinstance(delay_ms, bool)
            or not isinstance(delay_ms, numbers.Real)
            or not 0 <= float(delay_ms) <= 2**63 - 1
        ):
            raise ValueError(
                "RetryAfter delay_ms must be a number of milliseconds from 0 to 2**63-1, "
                f"got {delay_ms!r}"
            )
        super().__init__(message or f"retry after {delay_ms} ms")
        self.delay_ms: float = delay_ms


class ConfigError(IIIError, ValueError):
    """A configuration file or value is invalid.

    The message names the file, the line and the key that is wrong, and what was expected.
    Fix the file and start again; nothing has been started or stored.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line
        self.reason = message


class StoreError(IIIError, OSError):
    """The queue store cannot be opened, read or written.

    The message names the store's path and the cause (read-only directory, corrupt or
    foreign database, disk full). Jobs that were already acknowledged are not lost: fix the
    cause and start again, or retry the enqueue that failed.
    """


class StoreClosedError(StoreError):
    """The store was used after it closed (the engine shut down meanwhile)."""


class StoreVersionError(StoreError):
    """The store was written by a newer version of iii-embedded than the one running.

    Upgrade iii-embedded (or point the app at another directory); the store is left as is.
    """


class RunFailedError(IIIError, RuntimeError):
    """Raised by ``RunResult.unwrap()`` when the run did not complete successfully.

    ``run_id`` and ``function_id`` name the run; ``error`` is the last error it recorded
    (an ``ErrorInfo`` with the type, message and traceback), or ``None`` if it was
    cancelled with no attempt failed.
    """

    def __init__(self, run_id: str, function_id: str, status: str, error: ErrorInfo | None) -> None:
        detail = f": {error}" if error is not None else ""
        super().__init__(f"run {run_id} of {function_id!r} ended {status}{detail}")
        self.run_id = run_id
        self.function_id = function_id
        self.status = status
        self.error = error


class DeadlockError(InvocationError, NonRetryableError):
    """A wait that could never end was refused (code ``deadlock``); nothing was waited for.

    Raised by ``trigger_and_wait`` and ``batch_trigger_and_wait`` in a handler of a FIFO
    queue asked to wait for a job of its own group (directly, or through runs that wait
    for it), or for its own run through an idempotency key. A retry cannot help, so a
    queued handler that lets it escape goes straight to the dead-letter queue. Enqueue the
    job without waiting, or put it in another group or queue.
    """

    def __init__(self, message: str) -> None:
        super().__init__("deadlock", message)


class AwaitableResultError(NonRetryableError, TypeError):
    """A plain (not ``async def``) handler returned an awaitable, which nothing awaits.

    Usually a lambda around an async function: ``lambda data: process(data)``. The work
    never ran, and no retry can make it run, so a queued job goes straight to the
    dead-letter queue. Make the handler ``async def``, or register the async function
    itself. A ``TypeError``, so code that catches that catches this too.
    """


def engine_stopped() -> InvocationError:
    """The error of a call, or a wait for runs, that the engine's shutdown ended."""
    return InvocationError(
        "engine_stopped",
        "the engine shut down while this call was waiting on it (a run it enqueued, if "
        "any, is not finished: in a file store it goes on when an engine next serves its "
        "queue)",
    )


def exception_message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder naming the exception's type when its ``__str__``
    raises: a handler's exception is recorded and reported, never a new failure of the
    engine's own (it stopped the engine from an async job's worker)."""
    try:
        return str(exc)
    except Exception as failure:
        return f"<{type(exc).__qualname__}: str() raised {type(failure).__name__}>"
