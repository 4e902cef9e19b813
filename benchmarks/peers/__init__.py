"""The peers, one module each, each run the way its documentation suggests for an
embedded, single-process setup (see each module's docstring for the details):

* :mod:`.huey_bench`: Huey, ``SqliteHuey``, its consumer in threads; immediate mode.
* :mod:`.persistqueue_bench`: persist-queue, ``SQLiteAckQueue``, put/get/ack in threads.
* :mod:`.litequeue_bench`: litequeue, put/pop/done in threads.
* :mod:`.dramatiq_bench`: Dramatiq, ``StubBroker`` with an in-process ``Worker``.

These libraries are benchmark-only dependencies (``benchmarks/requirements.txt``).
"""

from __future__ import annotations

# name → (distribution for its version, how it is run: one line for the table's notes)
PEERS: dict[str, tuple[str, str]] = {
    "huey": (
        "huey",
        "SqliteHuey (WAL, SQLite's default synchronous=FULL, deletes a task at dequeue), "
        "thread consumer in-process (polling 1-10 ms for throughput, defaults for latency); "
        "MemoryHuey(immediate=True) for the inline call",
    ),
    "persist-queue": (
        "persist-queue",
        "SQLiteAckQueue(multithreading=True) (WAL, synchronous=FULL, pickled items), "
        "put / get(block=True) + ack in threads",
    ),
    "litequeue": (
        "litequeue",
        "LiteQueue (WAL, synchronous=NORMAL), one connection per thread, "
        "put / pop + done, consumers poll every 1 ms",
    ),
    "dramatiq": (
        "dramatiq",
        "StubBroker (in memory, not durable), in-process Worker, default middleware",
    ),
}
