"""The iii-embedded pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:

* ``iii_clock``: a fresh :class:`~iii_embedded.testing.VirtualClock`.
* ``iii_app``: an ``III`` app with the in-memory store and ``iii_clock``; register your
  functions on it, then ``async with iii_app.running(): ...``.
"""

from __future__ import annotations

import pytest

from .._app import III
from .._clock import VirtualClock


@pytest.fixture
def iii_clock() -> VirtualClock:
    """A virtual clock starting at a fixed time."""
    return VirtualClock()


@pytest.fixture
def iii_app(iii_clock: VirtualClock) -> III:
    """An in-memory app on the virtual clock, with a zero shutdown grace period."""
    return III(clock=iii_clock, shutdown_grace_ms=0)
