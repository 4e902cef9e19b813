"""The iii-embedded pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:

* ``iii_clock``: a fresh :class:`~iii_embedded.testing.VirtualClock`.
* ``iii_app``: an ``III`` app with the in-memory store and ``iii_clock``; register your
  functions on it, then ``async with iii_app.running(): ...`` (or ``iii_app.start()``:
  the fixture shuts down an engine the test left started).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .._app import III
from .._clock import VirtualClock


@pytest.fixture
def iii_clock() -> VirtualClock:
    """A virtual clock starting at a fixed time."""
    return VirtualClock()


@pytest.fixture
def iii_app(iii_clock: VirtualClock) -> Iterator[III]:
    """An in-memory app on the virtual clock, with a zero shutdown grace period. An engine
    the test started with ``start()`` and did not shut down is shut down after it."""
    app = III(clock=iii_clock, shutdown_grace_ms=0)
    yield app
    app.shutdown()  # a no-op unless the test left ``app.start()`` running
