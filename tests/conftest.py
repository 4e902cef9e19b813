"""Shared fixtures. The iii-embedded pytest plugin (``iii_clock``, ``iii_app``) is loaded
through its entry point."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The runtime is built on anyio over asyncio."""
    return "asyncio"
