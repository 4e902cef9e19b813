"""The packaging promises: the core needs only its four libraries, and ``make test`` runs
part of the suite on the oldest version of each that ``pyproject.toml`` allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = {"anyio", "attrs", "ruamel.yaml", "sqlite-utils"}


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", requirement.replace(" ", ""))
        assert match, f"core requirement without a plain lower bound: {requirement!r}"
        bounds[match[1].lower()] = match[2]
    return bounds


def _pinned_oldest() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "tests" / "oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_the_core_needs_only_its_four_libraries() -> None:
    assert set(_lower_bounds()) == CORE


def test_the_oldest_run_pins_each_core_library_at_its_lower_bound() -> None:
    bounds, pins = _lower_bounds(), _pinned_oldest()
    assert set(pins) == set(bounds)
    for name, version in bounds.items():
        assert _release(pins[name]) == _release(version), (name, pins[name], version)
