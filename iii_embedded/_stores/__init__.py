"""Queue stores: one protocol (:mod:`._base`), one implementation per backend.

The queue logic (:mod:`iii_embedded._queues`) talks only to :class:`Store`; the in-memory and
SQLite stores implement it and are held to it by one conformance suite
(``tests/stores/test_conformance.py``).
"""

from __future__ import annotations

import os

from ._base import (
    CronFire,
    EnqueueClaim,
    ErrorInfo,
    Job,
    JobState,
    NewJob,
    Outcome,
    OutcomeKind,
    QueueCounts,
    Renewal,
    Store,
    completed_outcome,
    make_enqueue_claim,
    make_job,
    make_new_job,
    restore_converted,
)

__all__ = [
    "CronFire",
    "EnqueueClaim",
    "ErrorInfo",
    "Job",
    "JobState",
    "NewJob",
    "Outcome",
    "OutcomeKind",
    "QueueCounts",
    "Renewal",
    "Store",
    "completed_outcome",
    "make_enqueue_claim",
    "make_job",
    "make_new_job",
    "open_store",
    "restore_converted",
]


def open_store(config: object) -> Store:
    """Build (not yet open) the store a :class:`~iii_embedded._config.StoreConfig` describes."""
    from .._config import StoreConfig

    assert isinstance(config, StoreConfig)
    if config.store_method == "in_memory":
        from ._memory import MemoryStore

        return MemoryStore()
    from ._sqlite import SQLiteStore

    assert config.file_path is not None
    return SQLiteStore(
        os.path.expanduser(config.file_path),
        synchronous=config.synchronous,
        commit_on_loop=config.commit_on_loop,
    )
