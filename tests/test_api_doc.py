"""docs/api.md names every public name, so nothing exported goes undocumented."""

from __future__ import annotations

import re
from pathlib import Path

import iii_embedded
import iii_embedded.testing

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_every_exported_name_is_in_the_api_reference() -> None:
    text = API_DOC.read_text()
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", text))
    exported = set(iii_embedded.__all__) | set(iii_embedded.testing.__all__)
    assert sorted(exported - documented) == []
