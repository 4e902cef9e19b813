"""Pinning the engine to one CPU (``pin_cpu``, Linux only).

The file store's hot path is a ping-pong between two threads: the event loop hands a
turn's requests to the writer thread and sleeps; the writer runs them, wakes the loop and
sleeps. Under the GIL the two seldom run at once, but the scheduler still puts them on
different CPUs, and on a virtual machine waking a thread on another, idle CPU is a trip
through the hypervisor (~60 µs here, twice per transaction). On one CPU the same wake-up
is a context switch. Measured on the 2-CPU VMs here (docs/performance.md), at
``synchronous: normal``: single enqueues 2.2–2.7× as fast, end to end 1.3–1.4×.

Pinning is opt-in because it is rigid: a pinned thread never moves to an idle CPU, and
threads started from a pinned one inherit its CPU. So two threads are pinned, once the
store is open: the engine's event-loop thread and the store's writer (the store's
checkpointer is not). Sync-handler threads, started from the loop's thread, give the pin
back at once (:func:`unpin_current_thread`): their handlers may release the GIL and run
in parallel. The loop's thread gets its CPUs back when the engine stops.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

from ._errors import ConfigError

__all__ = ["PinCpu", "current_cpu", "pinned", "unpin_current_thread"]

PinCpu = int | Literal["auto"] | None
"""A CPU number, ``"auto"`` (the CPU the engine starts on), or ``None`` (no pinning)."""

_lock = threading.Lock()
_original: set[int] | None = None
"""The CPUs the engine's thread could use before it was pinned (while one is pinned)."""
_pins = 0


def current_cpu() -> int:
    """The CPU the calling thread runs on (Linux: ``/proc/thread-self/stat``)."""
    with open("/proc/thread-self/stat", encoding="ascii") as f:
        stat = f.read()
    # Fields after the command name, which is in parentheses and may contain spaces:
    # the 39th field of the line ("processor") is the 37th after it.
    return int(stat.rsplit(")", 1)[1].split()[36])


def _resolve(pin: PinCpu, allowed: set[int]) -> int:
    cpu = current_cpu() if pin == "auto" else pin
    assert isinstance(cpu, int)
    if cpu not in allowed:
        raise ConfigError(
            f"pin_cpu: CPU {cpu} is not available to this process "
            f"(it may run on CPUs {', '.join(map(str, sorted(allowed)))})"
        )
    return cpu


@contextmanager
def pinned(pin: PinCpu, others: Sequence[int] = ()) -> Iterator[int | None]:
    """Pin the calling thread (the engine's event loop) and the threads ``others`` (native
    ids: the store's writer) to one CPU for the block; give the calling thread its CPUs
    back afterwards. Yields the CPU, or ``None`` when ``pin`` is ``None``. Raises
    ``ConfigError`` where pinning is not possible (not Linux, a CPU this process may not
    use)."""
    global _original, _pins
    if pin is None:
        yield None
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("pin_cpu needs Linux (os.sched_setaffinity); remove it here")
    before = os.sched_getaffinity(0)
    cpu = _resolve(pin, before)
    try:
        os.sched_setaffinity(0, {cpu})
        for tid in others:
            os.sched_setaffinity(tid, {cpu})
    except OSError as exc:  # a sandbox that forbids it, say
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
        raise ConfigError(f"pin_cpu: cannot pin to CPU {cpu}: {exc.strerror or exc}") from None
    with _lock:
        if _pins == 0:
            _original = before
        _pins += 1
    try:
        yield cpu
    finally:
        with _lock:
            _pins -= 1
            if _pins == 0:
                _original = None
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def unpin_current_thread() -> None:
    """In a thread started from a pinned engine thread: run on the CPUs the engine had
    before it was pinned (no-op when nothing is pinned)."""
    original = _original
    if original is not None:
        with contextlib.suppress(OSError):  # best effort: the thread still works pinned
            os.sched_setaffinity(0, original)
