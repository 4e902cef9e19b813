"""What a handler can learn about its own invocation, and the iii-style ``Logger``.

The runtime sets a context variable around every handler call (async handlers inherit it on
the loop; sync handlers run in a thread with a copy of the context), so
:func:`current_invocation` and :class:`Logger` work without being passed anything.
"""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any, Literal, Protocol

import attrs

__all__ = ["Invocation", "current_invocation", "Logger"]


@attrs.define(frozen=True, kw_only=True)
class Invocation:
    """The invocation a handler is running for.

    ``receipt_id``, ``queue``, ``attempt`` and ``group`` are set for queued jobs; for a
    synchronous or Void call ``receipt_id`` and ``queue`` are ``None`` and ``attempt`` is 1.
    """

    function_id: str
    action: Literal["sync", "void", "enqueue", "cron"]
    receipt_id: str | None = None
    queue: str | None = None
    attempt: int = 1
    max_attempts: int = 1
    group: Any = None


class _QueuedJob(Protocol):
    """What a queue worker puts in the context instead of an :class:`Invocation` (a claimed
    job record): the invocation is built from it only if the handler asks."""

    @property
    def id(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def function_id(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def group(self) -> str | None: ...


_current: contextvars.ContextVar[Invocation | _QueuedJob | None] = contextvars.ContextVar(
    "iii_embedded_invocation", default=None
)


def current_invocation() -> Invocation | None:
    """The :class:`Invocation` of the handler calling this, or ``None`` outside handlers."""
    value = _current.get()
    if value is None or isinstance(value, Invocation):
        return value
    # Queue workers store the job itself: most handlers never ask, and building the
    # Invocation for every job would cost more than the no-op handler it wraps.
    return Invocation(
        function_id=value.function_id,
        action="enqueue",
        receipt_id=value.id,
        queue=value.queue,
        attempt=value.attempts,
        max_attempts=value.max_attempts,
        group=json.loads(value.group) if value.group is not None else None,
    )


def _context_fields(inv: Invocation | None) -> dict[str, Any]:
    if inv is None:
        return {}
    return {
        "function_id": inv.function_id,
        "receipt_id": inv.receipt_id,
        "queue": inv.queue,
        "attempt": inv.attempt,
    }


class Logger:
    """iii's ``Logger``: structured logging through stdlib :mod:`logging`.

    Each record carries ``function_id``, ``receipt_id``, ``queue`` and ``attempt`` of the
    current invocation and the ``data`` passed in, as attributes (``record.iii`` holds them
    all as one dict, for JSON formatters). Messages go to the ``iii_embedded.user`` logger
    unless a name is given.
    """

    def __init__(self, name: str = "iii_embedded.user") -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, message: str, data: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        fields = _context_fields(current_invocation())
        if data is not None:
            fields["data"] = data
        suffix = f" {data}" if data is not None else ""
        self._logger.log(level, "%s%s", message, suffix, extra={**fields, "iii": fields})

    def debug(self, message: str, data: Any = None) -> None:
        """Log at DEBUG."""
        self._log(logging.DEBUG, message, data)

    def info(self, message: str, data: Any = None) -> None:
        """Log at INFO."""
        self._log(logging.INFO, message, data)

    def warn(self, message: str, data: Any = None) -> None:
        """Log at WARNING (iii's spelling)."""
        self._log(logging.WARNING, message, data)

    warning = warn

    def error(self, message: str, data: Any = None) -> None:
        """Log at ERROR."""
        self._log(logging.ERROR, message, data)
