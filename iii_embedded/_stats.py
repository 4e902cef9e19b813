"""Values the runtime reports about its queues: statistics and dead-letter entries."""

from __future__ import annotations

import json
from typing import Any

import attrs

from ._stores import ErrorInfo, Job, QueueCounts

__all__ = ["QueueStats", "DeadJob"]


@attrs.define(frozen=True, kw_only=True)
class QueueStats:
    """One queue's state: store counts now, and counters since this process started.

    ``held`` jobs wait for a function that is not registered in this process.
    ``oldest_ready_age_s`` is how long the oldest ready job has been waiting.
    """

    queue: str
    type: str
    concurrency: int
    ready: int
    delayed: int
    running: int
    held: int
    dead: int
    oldest_ready_age_s: float | None
    completed: int
    failed: int
    retried: int
    dead_lettered: int
    prefetched: int = 0
    """Jobs this process has claimed but not started yet (``QueueConfig.prefetch``). On a
    file store they are counted in ``running`` too (they are leased), so ``running -
    prefetched`` is what runs here now (plus other processes' jobs); in memory they read
    ``queued`` and are counted in ``ready``."""

    @classmethod
    def build(
        cls,
        *,
        queue: str,
        type: str,
        concurrency: int,
        counts: QueueCounts,
        now: float,
        completed: int = 0,
        failed: int = 0,
        retried: int = 0,
        dead_lettered: int = 0,
        prefetched: int = 0,
    ) -> QueueStats:
        """Combine store counts with runner counters."""
        age = None if counts.oldest_ready_at is None else max(0.0, now - counts.oldest_ready_at)
        return cls(
            queue=queue,
            type=type,
            concurrency=concurrency,
            ready=counts.ready,
            delayed=counts.delayed,
            running=counts.running,
            held=counts.held,
            dead=counts.dead,
            oldest_ready_age_s=age,
            completed=completed,
            failed=failed,
            retried=retried,
            dead_lettered=dead_lettered,
            prefetched=prefetched,
        )


@attrs.define(frozen=True, kw_only=True)
class DeadJob:
    """A job in a dead-letter queue, with everything needed to decide what to do with it."""

    id: str
    queue: str
    function_id: str
    payload: Any
    attempts: int
    first_failed_at: float | None
    last_failed_at: float | None
    error: ErrorInfo | None
    created_at: float

    @classmethod
    def from_job(cls, job: Job) -> DeadJob:
        """Build from a store record."""
        return cls(
            id=job.id,
            queue=job.queue,
            function_id=job.function_id,
            payload=json.loads(job.payload),
            attempts=job.attempts,
            first_failed_at=job.first_failed_at,
            last_failed_at=job.last_failed_at,
            error=job.error,
            created_at=job.created_at,
        )

    def to_iii(self) -> dict[str, Any]:
        """iii's ``engine::queue::dlq_messages`` item shape."""
        failed_at = self.last_failed_at if self.last_failed_at is not None else self.created_at
        return {
            "id": self.id,
            "payload": self.payload,
            "error": str(self.error) if self.error is not None else "function call failed",
            "failed_at": int(failed_at * 1000),
            "retries": self.attempts,
            "size_bytes": len(json.dumps(self.payload).encode()),
            "function_id": self.function_id,
        }
