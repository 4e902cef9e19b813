"""Long-lived worker threads for sync handlers.

``anyio.to_thread.run_sync`` costs 70-140 µs per call on these machines (a thread hop plus
its bookkeeping), more than everything else a job costs. Sync handlers instead go to a
pool of threads that live as long as the runtime. A call queues ``(target, context, fn,
arg)`` for the pool's threads; a thread runs ``fn(arg)`` in ``context`` (a copy of the
caller's, so :func:`~iii_embedded.current_invocation` works in it) and hands the result
back through ``loop.call_soon_threadsafe``, one call for all the results that finish
while the loop is busy. Two ways in:

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

Waking a thread costs ~65 µs here (an idle vCPU halts), and every thread that runs
takes turns with the loop for the GIL. A thread that ends a call takes the next one
waiting before it sleeps, so a pool wakes a thread only for calls that none already on
its way or busy will take: without ``fan_out_s``, one at a time, each woken thread
waking the next while calls wait (``_next``). With ``fan_out_s`` (a queue's pool), calls
made while a thread is busy are left to it: a burst of short handlers runs in one
thread, with one wake-up. A call that takes ``_SLOW_S`` or more, or calls that wait
``fan_out_s`` for a busy thread (a handler that blocks: ``_watch``), switch the pool to
waking threads as above until it is idle again, so slow handlers still run side by side.
The thread woken is the last to fall idle: its CPU's caches are the warmest.

A pool grows while no thread is idle, up to ``max_threads``: a queue's pool never needs
more than its ``concurrency`` threads, except when handlers that timed out or were
cancelled are still running (a thread cannot be killed; it is abandoned and its result
dropped). A call made from one of the pool's own threads may grow it further: a sync
handler that calls another synchronously waits for it, holding its thread, and with every
thread held by such waiters the pool would otherwise wait for itself forever. Threads are
daemons, so an abandoned handler never keeps the process alive. A thread that has waited
``_IDLE_EXIT_S`` for a call ends, so a pool grown by a burst shrinks back; since the pool
wakes the thread that fell idle last, the threads a steady load does not need are the ones
that wait that long.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import queue
import threading
import time
from collections import deque
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
_WAKE = True
_IDLE_EXIT_S = 60.0
"""A pool thread that waited this long for a call ends (the pool starts one again when a
call finds none idle)."""
_SLOW_S = 0.0002
"""A call that took this long makes the pool wake threads for calls at once (``_eager``):
running the next ones beside it is then worth a thread's wake-up (~65 µs here)."""


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
        fan_out_s: float | None = None,
    ) -> None:
        self.name = name
        self._settle = settle
        self._follow = follow
        self.max_threads = max_threads
        self._calls: deque[tuple[Any, contextvars.Context, Callable[[Any], Any], Any]] = deque()
        """Calls made and not yet taken by a thread, oldest first (guarded by ``_lock``)."""
        self._threads: list[threading.Thread] = []
        self._spawned = 0
        """Threads started so far (each is named by its number)."""
        self._inboxes: list[queue.SimpleQueue[Any]] = []
        """Each thread's own: ``_WAKE`` sends it for calls, ``_STOP`` ends it."""
        self._sleepers: list[queue.SimpleQueue[Any]] = []
        """The inboxes of the threads that wait for a wake-up, none on its way to them,
        the last to fall idle last (guarded by ``_lock``). The pool wakes that one: it
        ran last, so its CPU's caches still hold what a call needs."""
        self._waking = 0
        """Threads woken or started that have not yet come for a call (guarded by
        ``_lock``)."""
        self._fan_out_s = fan_out_s
        """For a pool that takes only :meth:`submit` calls: how long a call left to a busy
        thread may wait before the pool wakes others (``_watch``); ``None``: at once."""
        self._eager = False
        """A call took ``_SLOW_S`` or more, or waited ``fan_out_s`` for a busy thread
        (``_watch``): until every thread is idle again, calls get threads at once, as in
        a pool without ``fan_out_s`` (guarded by ``_lock``)."""
        self._taken = 0
        """Calls taken by threads so far (guarded by ``_lock``)."""
        self._watch_at: asyncio.TimerHandle | None = None
        """The scheduled ``_watch`` (loop only)."""
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

    @property
    def idle(self) -> int:
        """Threads waiting for a call."""
        return len(self._sleepers)

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
        thread, which resolves the returned future itself. ``RuntimeError`` once closed.
        Not for a pool made with ``fan_out_s``, whose calls are made on the loop."""
        assert self._fan_out_s is None
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
        item = (target, context or contextvars.copy_context(), fn, arg)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is not running: start it first")
            self._calls.append(item)
            watch = -1
            if self._fan_out_s is not None and not self._eager:  # (``submit``: the loop)
                # Left to the busy threads, which take it when their calls return
                # (``_work``), unless none is busy; ``_watch`` checks that they do.
                if not self._waking and len(self._sleepers) == len(self._threads):
                    self._wake()
                if len(self._calls) > self._waking and self._watch_at is None:
                    watch = self._taken + len(self._calls)
            elif (self._waking or not self._sleepers) and self._is_own_thread():
                # A call made from one of this pool's own threads (a sync handler calling
                # another synchronously) gets a thread of its own, past ``max_threads`` if
                # need be: its caller is blocked until it ends, so it adds no work, and
                # waiting for a thread that only such blocked callers hold would never end.
                self._wake(grow=True)
            elif not self._waking:  # those on their way fan out further (``_next``)
                self._wake()
        if watch >= 0:
            assert self._loop is not None and self._fan_out_s is not None
            self._watch_at = self._loop.call_later(self._fan_out_s, self._watch, watch)

    def _watch(self, due: int) -> None:
        """On the loop, ``fan_out_s`` after a call was left to busy threads: if it still
        waits (fewer than ``due`` calls taken), their handlers are slow or held up:
        every call waiting gets a thread, and so do the next ones until the pool is idle
        again (``_eager``). Else the calls waiting now are watched in turn."""
        self._watch_at = None
        with self._lock:
            if not self._calls or self._closed:
                return
            if self._taken < due:
                self._eager = True
                for _ in range(len(self._calls) - self._waking):
                    self._wake()
                return
            due = self._taken + len(self._calls)
        assert self._loop is not None and self._fan_out_s is not None
        self._watch_at = self._loop.call_later(self._fan_out_s, self._watch, due)

    def _wake(self, grow: bool = False) -> None:
        """Send an idle thread for the calls, or start one if none is idle and the pool may
        grow (with ``_lock`` held)."""
        if self._closed:  # the threads are told to stop: they run what is left
            return
        if self._sleepers:
            self._waking += 1
            self._sleepers.pop().put(_WAKE)
        elif grow or len(self._threads) < self.max_threads + self._held:
            self._waking += 1
            self._spawn()

    def _next(self) -> tuple[Any, contextvars.Context, Callable[[Any], Any], Any] | None:
        """The oldest call waiting, for the calling thread to run (with ``_lock`` held).
        While more wait, one more thread is on its way to them, so that a call never waits
        for another to end while a thread could run it."""
        calls = self._calls
        if not calls:
            return None
        item = calls.popleft()
        self._taken += 1
        if calls and not self._waking and (self._fan_out_s is None or self._eager):
            self._wake()
        return item

    def _rest(self, inbox: queue.SimpleQueue[Any]) -> None:
        """The thread of ``inbox`` found no call to take and waits for a wake-up (with
        ``_lock`` held)."""
        self._sleepers.append(inbox)
        if len(self._sleepers) == len(self._threads):
            self._eager = False

    def _is_own_thread(self) -> bool:
        return threading.current_thread() in self._threads

    def _spawn(self) -> None:
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._spawned += 1
        thread = threading.Thread(
            target=self._work,
            args=(inbox,),
            name=f"iii-{self.name}-{self._spawned - 1}",
            daemon=True,
        )
        self._threads.append(thread)
        self._inboxes.append(inbox)
        thread.start()

    def _work(self, inbox: queue.SimpleQueue[Any]) -> None:
        unpin_current_thread()  # handlers may release the GIL: let them use every CPU
        get = inbox.get
        lock = self._lock
        follow = self._follow
        clock = time.perf_counter
        with lock:  # started as a wake-up
            self._waking -= 1
            item = self._next()
            if item is None:
                self._rest(inbox)
        while True:
            if item is None:
                try:
                    message = get(timeout=_IDLE_EXIT_S)
                except queue.Empty:
                    with lock:
                        if self._closed:  # told to stop (``close``): nothing to undo
                            return
                        if inbox in self._sleepers:  # idle all along: end this thread
                            self._sleepers.remove(inbox)
                            self._inboxes.remove(inbox)
                            self._threads.remove(threading.current_thread())
                            return
                    continue  # a wake-up is on its way to it: take it
                if message is _STOP:
                    return
                with lock:
                    self._waking -= 1
                    item = self._next()
                    if item is None:
                        self._rest(inbox)
                continue
            target, context, fn, arg = item
            start = clock()
            try:
                value = context.run(fn, arg)
                ok = True
            except BaseException as exc:
                value, ok = exc, False
            slow = clock() - start >= _SLOW_S
            if isinstance(target, concurrent.futures.Future):  # its caller is a thread
                with lock:
                    if slow:
                        self._eager = True
                    item = self._next()
                    if item is None:
                        self._rest(inbox)
                if target.set_running_or_notify_cancel():
                    if ok:
                        target.set_result(value)
                    else:
                        target.set_exception(value)
                continue
            # Results finished while the loop is busy share one wake-up of the loop (a
            # write to its self-pipe each): the first schedules a flush, the rest join it.
            with lock:
                if slow:
                    self._eager = True
                self._results.append((target, ok, value))
                item = self._next()
                if item is None and follow is not None and not self._closed:
                    item = follow(target)  # the next job of the line, run here with no hop
                if item is None:
                    self._rest(inbox)
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
            drained = not self._calls
        if drained and self._watch_at is not None:  # every call was taken: no need
            self._watch_at.cancel()
            self._watch_at = None
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
            for inbox in self._inboxes:
                inbox.put(_STOP)
            self._threads.clear()
            self._inboxes.clear()
