"""Long-lived worker threads for sync handlers.

``anyio.to_thread.run_sync`` costs 70-140 µs per call on these machines (a thread hop plus
its bookkeeping), more than everything else a job costs. Sync handlers instead go to a
pool of threads that live as long as the runtime. A call puts ``(target, context, fn,
arg)`` on a ``queue.SimpleQueue``; the thread runs ``fn(arg)`` in ``context`` (a copy of
the caller's, so :func:`~iii_embedded.current_invocation` works in it) and hands the
result back through ``loop.call_soon_threadsafe``, one call for all the results that
finish while the loop is busy. Two ways in:

* :meth:`ThreadPool.run` awaits an asyncio future that the result resolves (sync calls,
  cron fires);
* :meth:`ThreadPool.submit` returns at once, and the pool passes every batch of results
  to its ``settle`` callback on the loop. A queue's jobs take this way: no task waits per
  job, so the loop's cost of a sync job is a put and its share of one callback;
* :meth:`ThreadPool.run_from_thread`, from a thread other than the loop's, returns a
  concurrent future that the pool thread resolves itself, with no hop through the loop
  (a blocking sync call from another thread).

A pool made with ``follow`` asks it, each time a submitted call ends, for a next call to
run at once in the same thread: a queue uses it to start the job waiting behind the one
that ended without the round trip through the loop (see ``QueueRunner._chain``).

A pool grows while no thread is idle, up to ``max_threads``: a queue's pool never needs
more than its ``concurrency`` threads, except when handlers that timed out or were
cancelled are still running (a thread cannot be killed; it is abandoned and its result
dropped). A call made from one of the pool's own threads may grow it further: a sync
handler that calls another synchronously waits for it, holding its thread, and with every
thread held by such waiters the pool would otherwise wait for itself forever. Threads are
daemons, so an abandoned handler never keeps the process alive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

from ._affinity import unpin_current_thread

__all__ = ["ThreadPool", "Settle"]

Settle = Callable[[list[tuple[Any, bool, Any]]], None]
"""Receives a batch of ``(token, ok, value)`` results of :meth:`ThreadPool.submit` on the
loop: ``value`` is ``fn``'s return value, or the exception it raised when ``ok`` is
false."""

Follow = Callable[[Any], "tuple[Any, contextvars.Context, Callable[[Any], Any], Any] | None"]
"""Called in a pool thread, with the pool's lock held, when the call of ``token`` (a
:meth:`ThreadPool.submit`) has ended and its result is queued for the loop: returns the
next call for this thread to run at once, as ``(token, context, fn, arg)``, or ``None``.
It must not block, nor take the pool's lock."""

_STOP = None


def _deliver(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller stopped waiting (timeout, cancellation)
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class ThreadPool:
    """Worker threads for sync handlers, owned by one runtime (asyncio backend)."""

    def __init__(
        self,
        name: str,
        max_threads: int,
        settle: Settle | None = None,
        follow: Follow | None = None,
    ) -> None:
        self.name = name
        self._settle = settle
        self._follow = follow
        self.max_threads = max_threads
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self.lock = self._lock
        """Guards the pool's results; ``follow`` runs holding it, so the owner of the
        calls may guard what ``follow`` reads with it too."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._results: list[tuple[Any, bool, Any]] = []
        """Finished calls not yet delivered to the loop, each with its future (``run``) or
        its token (``submit``) (guarded by ``_lock``)."""
        self._flush_scheduled = False
        self._closed = False
        self._held = 0
        """Threads held by handlers that wait for other work of this pool (``hold``):
        the pool may grow past ``max_threads`` by as many (guarded by ``_lock``)."""

    async def run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """Run ``fn(arg)`` on a pool thread and return its result (or raise its error)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._put(future, fn, arg)
        return await future

    def submit(self, token: Any, fn: Callable[[Any], Any], arg: Any) -> None:
        """Start ``fn(arg)`` on a pool thread; its result reaches ``settle`` as
        ``(token, ok, value)``, on the loop, in a batch with the others that finish
        meanwhile. Call on the loop; the pool must have been made with ``settle``."""
        assert self._settle is not None
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._put(token, fn, arg)

    def run_from_thread(
        self, fn: Callable[[Any], Any], arg: Any, context: contextvars.Context
    ) -> concurrent.futures.Future[Any]:
        """From a thread other than the loop's: start ``fn(arg)`` in ``context`` on a pool
        thread, which resolves the returned future itself. ``RuntimeError`` once closed."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._put(future, fn, arg, context)
        return future

    def _put(
        self,
        target: Any,
        fn: Callable[[Any], Any],
        arg: Any,
        context: contextvars.Context | None = None,
    ) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is not running: start it first")
            # A call made from one of this pool's own threads (a sync handler calling
            # another synchronously) may grow it past ``max_threads``: its caller is
            # blocked until it ends, so it adds no work, and waiting for a thread that
            # only such blocked callers hold would never end.
            spawn = self._idle == 0 and (
                len(self._threads) < self.max_threads + self._held or self._is_own_thread()
            )
            if not spawn:
                self._idle -= 1 if self._idle else 0
            if spawn:
                self._spawn()
            self._queue.put((target, context or contextvars.copy_context(), fn, arg))

    def _is_own_thread(self) -> bool:
        return threading.current_thread() in self._threads

    def _spawn(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"iii-{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        unpin_current_thread()  # handlers may release the GIL: let them use every CPU
        get = self._queue.get
        follow = self._follow
        item: Any = None
        while True:
            if item is None:
                item = get()
                if item is _STOP:
                    return
            target, context, fn, arg = item
            item = None
            try:
                value = context.run(fn, arg)
                ok = True
            except BaseException as exc:
                value, ok = exc, False
            if isinstance(target, concurrent.futures.Future):  # its caller is a thread
                with self._lock:
                    self._idle += 1
                if target.set_running_or_notify_cancel():
                    if ok:
                        target.set_result(value)
                    else:
                        target.set_exception(value)
                continue
            # Results finished while the loop is busy share one wake-up of the loop (a
            # write to its self-pipe each): the first schedules a flush, the rest join it.
            with self._lock:
                self._results.append((target, ok, value))
                if follow is not None and not self._closed:
                    item = follow(target)  # the next call, run here with no hop
                if item is None:
                    self._idle += 1
                schedule = not self._flush_scheduled
                self._flush_scheduled = True
            if schedule:
                loop = self._loop
                assert loop is not None
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    loop.call_soon_threadsafe(self._flush)

    def hold(self) -> None:
        """A handler in one of the pool's threads now waits for other calls to run (its
        queue lent its slot): let the pool grow by one thread past ``max_threads``, or
        those calls could find every thread held by such waiters and wait forever."""
        with self._lock:
            self._held += 1

    def release(self) -> None:
        """A wait announced with :meth:`hold` ended."""
        with self._lock:
            self._held -= 1

    def flush_now(self) -> None:
        """On the loop: deliver the results that are in now, without waiting for the
        wake-up they scheduled (which then finds none, or the later ones)."""
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            results, self._results = self._results, []
            self._flush_scheduled = False
        settled: list[tuple[Any, bool, Any]] = []
        for result in results:
            if isinstance(result[0], asyncio.Future):
                _deliver(*result)
            else:
                settled.append(result)
        if settled:
            assert self._settle is not None
            self._settle(settled)

    def close(self) -> None:
        """Ask every thread to exit once it is idle (running handlers are not waited for);
        calls made from now on raise ``RuntimeError``."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)
            self._threads.clear()
