"""The store records: the ``make_`` functions build exactly what the classes build."""

from __future__ import annotations

from typing import Any

import attrs

from iii_embedded._stores._base import (
    EnqueueClaim,
    ErrorInfo,
    Job,
    NewJob,
    Outcome,
    completed_outcome,
    make_enqueue_claim,
    make_job,
    make_new_job,
)


def test_make_job_sets_every_field_in_declaration_order() -> None:
    values: dict[str, Any] = {}
    for index, field in enumerate(attrs.fields(Job)):
        # A distinct value per field, so a field set from its neighbour shows up.
        values[field.name] = f"value-{index}"
    values["error"] = ErrorInfo(type="E", message="m", traceback="t")
    values["cancel_requested"] = True
    built = make_job(*values.values())
    assert built == Job(**values)
    assert attrs.asdict(built, recurse=False) == values


def test_make_new_job_sets_every_field_in_declaration_order() -> None:
    values = {field.name: f"value-{i}" for i, field in enumerate(attrs.fields(NewJob))}
    built = make_new_job(*values.values())
    assert built == NewJob(**values)
    assert attrs.asdict(built, recurse=False) == values


def test_make_enqueue_claim_sets_every_field_and_a_new_stored_list() -> None:
    def deliver(claim: EnqueueClaim, jobs: list[Job] | None) -> None:
        del claim, jobs

    built = make_enqueue_claim("owner-1", 42.5, 3, deliver, 2, 12.5)
    expected = EnqueueClaim(
        owner="owner-1", lease_until=42.5, count=3, deliver=deliver, ahead=2, now=12.5
    )
    assert built == expected
    assert attrs.asdict(built, recurse=False) == attrs.asdict(expected, recurse=False)
    assert built.stored == []
    another = make_enqueue_claim("owner-2", 1.0, 1, deliver, 0, 0.0)
    assert another.stored is not built.stored  # a list of its own, as the factory gives


def test_completed_outcome_is_the_completed_outcome_with_every_other_field_at_its_default() -> None:
    built = completed_outcome("job-1", "owner-1", 3, 12.5, '{"ok": true}', 41)
    expected = Outcome(
        job_id="job-1",
        kind="completed",
        owner="owner-1",
        attempt=3,
        at=12.5,
        output='{"ok": true}',
        seq=41,
    )
    assert built == expected
    assert attrs.asdict(built, recurse=False) == attrs.asdict(expected, recurse=False)
