"""Shared by the file store's own tests: a plain ready job."""

from __future__ import annotations

import json

from iii_embedded._stores import NewJob

T0 = 1_000.0


def new_job(job_id: str, *, queue: str = "q") -> NewJob:
    """A ready standard-queue job of function ``fn``, available at ``T0``."""
    return NewJob(
        id=job_id,
        queue=queue,
        function_id="fn",
        payload=json.dumps({"id": job_id}),
        group=None,
        created_at=T0,
        available_at=T0,
        max_attempts=3,
    )
