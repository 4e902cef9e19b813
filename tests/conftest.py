"""Shared fixtures. The iii-embedded pytest plugin (``iii_clock``, ``iii_app``) is loaded
through its entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from iii_embedded import StoreConfig


@pytest.fixture
def anyio_backend() -> str:
    """The runtime is built on anyio over asyncio."""
    return "asyncio"


@pytest.fixture(params=["in_memory", "file_based"])
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """Each store: the test runs once in memory and once on a file store in ``tmp_path``."""
    if request.param == "in_memory":
        return StoreConfig(store_method="in_memory")
    return StoreConfig(store_method="file_based", file_path=str(tmp_path / "store"))
