"""The store records: ``make_job`` builds exactly what ``Job(...)`` builds."""

from __future__ import annotations

from typing import Any

import attrs

from iii_embedded._stores._base import ErrorInfo, Job, make_job


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
