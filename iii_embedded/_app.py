"""The app: ``III``, the one object users hold.

It keeps what outlives a run (config, registered functions, triggers, hooks) and starts a
:class:`~iii_embedded._runtime.Runtime` for each lifecycle: ``async with iii.running()``
inside an existing anyio/asyncio program, ``iii.run()`` as the main program, or
``iii.start()``/``iii.shutdown()`` on a background thread for synchronous programs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import inspect
import logging
import os
import signal
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future
from contextlib import AbstractContextManager, asynccontextmanager
from types import FrameType
from typing import Any, TypeVar

import anyio
import attrs
from anyio.from_thread import BlockingPortal

from ._actions import EnqueueAction, VoidAction, parse_action, refuse_unknown_keys
from ._affinity import pinned
from ._clock import Clock, SystemClock
from ._config import Config, QueueConfig
from ._context import Invocation, current_invocation
from ._errors import InvocationError, StoreClosedError, StoreError, engine_stopped
from ._registry import FunctionRef, FunctionSpec, Registry, is_async_callable
from ._runs import BatchResult, RunResult, Runs
from ._runs import batch_trigger as _batch_trigger
from ._runs import batch_trigger_and_wait as _batch_trigger_and_wait
from ._runs import trigger_and_wait as _trigger_and_wait
from ._runtime import DEFAULT_TIMEOUT_MS, Runtime, check_timeout, enqueue_failed
from ._stats import DeadJob, QueueStats
from ._stores import Store, open_store
from ._stores._base import RUNNING_OWNERS
from ._triggers import Bindings, Trigger, trigger_registrar

__all__ = ["III", "HOOK_EVENTS"]

log = logging.getLogger("iii_embedded")


class RunAtImportError(RuntimeError):
    """``III.run()`` (or ``serve_forever``) called while the ``iii-embedded`` command
    imports the app's module, which would serve the app inside the import."""


# Set by the command while it imports an app's module (see ``_cli._import_app``).
_importing_app: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "iii_embedded_importing_app", default=False
)


def _refuse_run_at_import() -> None:
    if _importing_app.get():
        raise RunAtImportError(
            "the module calls iii.run() when it is imported: the command runs the app "
            'itself, so call run() only under `if __name__ == "__main__":`'
        )


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

HOOK_EVENTS = frozenset(
    {
        "job_started",
        "job_succeeded",
        "job_failed",
        "job_retried",
        "job_dead_lettered",
        "job_cancelled",
    }
)


class III:
    """An embedded iii engine: functions, trigger actions and named queues in one process.

    ``III()`` uses an in-memory store and a ``default`` queue; ``III(config)`` or
    ``III.from_config("iii-config.yaml")`` use the given queues and store. ``clock`` and
    ``store`` are for tests (see :mod:`iii_embedded.testing`). ``invocation_timeout_ms`` is
    the timeout of a synchronous ``trigger`` that gives no ``timeout_ms``.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        shutdown_grace_ms: int = 10_000,
        invocation_timeout_ms: int = DEFAULT_TIMEOUT_MS,
    ) -> None:
        if config is not None and not isinstance(config, Config):
            if isinstance(config, (str, os.PathLike)):
                raise TypeError(
                    f"III() takes a Config, not a path ({os.fspath(config)!r}): to read a "
                    f"config file, use III.from_config({os.fspath(config)!r})"
                )
            raise TypeError(f"III() takes a Config, not {type(config).__name__}")
        self.config = config if config is not None else Config()
        if (
            isinstance(invocation_timeout_ms, bool)
            or not isinstance(invocation_timeout_ms, (int, float))
            or not invocation_timeout_ms > 0  # NaN too
        ):
            raise ValueError(
                "invocation_timeout_ms must be a number of milliseconds > 0, "
                f"got {invocation_timeout_ms!r}"
            )
        self.invocation_timeout_ms = invocation_timeout_ms
        """The ``timeout_ms`` of a synchronous ``trigger`` that gives none (iii's
        ``InitOptions.invocation_timeout_ms``; 30 000 by default)."""
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._store_override = store
        self.shutdown_grace_ms = shutdown_grace_ms
        self.registry = Registry()
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        self._bindings = Bindings(self._on_engine_thread)
        self.triggers: list[dict[str, Any]] = self._bindings.requests
        """The registered triggers' requests (an unregistered one leaves)."""
        self.lifecycle_hooks: list[Callable[[III, anyio.abc.TaskGroup], Any]] = []
        """Called as ``hook(app, task_group)`` once the engine runs (awaited if it returns
        an awaitable): start your own tasks in the engine's task group, or signal
        readiness."""
        self._runtime: Runtime | None = None
        self._thread_cm: AbstractContextManager[Any] | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._shutdown_callbacks: list[Callable[[], Any]] = []
        self._stopping: threading.Event | None = None
        """Set while a :meth:`shutdown` is under way (see ``_stop``)."""
        self._stopping_thread: int | None = None
        self._forked = False
        """This process was forked from one where this app's engine ran (and it has
        started none since): see ``_forget_engines_in_child``."""
        self._unentered = False
        """Started by :meth:`start` and not yet entered by ``with`` (``with iii.start():``)."""
        self._kept_serving = False
        """Started by ``register_worker``, whose keeper thread holds the process: not
        stopped at exit (see ``_stop_at_exit``)."""
        self.runs = Runs(self)
        """Look runs up and cancel them: ``iii.runs.get(id)``, ``iii.runs.cancel(id)``."""
        self.topics: dict[str, list[str]] = {}
        """Topic name → the internal queues of its subscribers (see ``_topics``)."""
        self.topic_queues: dict[str, tuple[str, str]] = {}
        """A subscriber's internal queue → its (topic, function id)."""
        self.unsubscribed: set[str] = set()
        """The internal queues of subscriptions that were unregistered: a publish stores
        no copy for them; the copies stored already are still delivered."""
        self._added_queues: dict[str, QueueConfig] = {}
        """The queues :meth:`add_queue` added (a topic subscription's among them), which
        a config given later (``iii-embedded run --config``) keeps."""
        from ._builtins import register_builtins
        from ._cron import CronJob, install_cron
        from ._http import HttpRouter, HttpServer, install_http
        from ._topics import install_topics

        self.http_router = HttpRouter(self)
        self.http_server: HttpServer | None = None
        register_builtins(self)
        install_topics(self)
        install_http(self)
        install_cron(self)
        self.cron_jobs: list[CronJob] = []

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **kwargs: Any) -> III:
        """Build an app from an ``iii-config.yaml`` file (both of iii's spellings)."""
        from ._config_loader import load_config

        return cls(load_config(path), **kwargs)

    # --- registering -----------------------------------------------------------------

    def function(
        self,
        function_id: str,
        *,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        cron: str | None = None,
    ) -> Callable[[F], F]:
        """Decorator: register the decorated sync or async function under ``function_id``.

        ``cron`` also schedules it (iii's 6- or 7-field form with seconds first, or the
        classic 5-field form); see :mod:`iii_embedded._cron`.
        """

        def decorate(fn: F) -> F:
            self.register_function(
                {"id": function_id, "description": description, "metadata": metadata}, fn
            )
            if cron is not None:
                self.register_trigger(
                    {"type": "cron", "function_id": function_id, "config": {"expression": cron}}
                )
            return fn

        return decorate

    def register_function(
        self, function: str | Mapping[str, Any], handler: Callable[[Any], Any]
    ) -> FunctionRef:
        """Register ``handler`` as ``function`` (an id, or iii's ``{"id": ...}`` dict).

        Returns a :class:`FunctionRef` (``.id``, ``.unregister()``). Raises ``ValueError``
        if the id is empty or blank (iii: ``id is required``) or already registered.
        """
        if isinstance(function, Mapping):
            if "id" not in function:
                raise ValueError("register_function: the function dict needs an 'id'")
            fid = function["id"]
            description = function.get("description")
            metadata = function.get("metadata")
        else:
            fid, description, metadata = function, None, None
        if not callable(handler):
            raise TypeError(f"register_function({fid!r}): handler is not callable")
        spec = FunctionSpec(
            id=fid,
            handler=handler,
            is_async=is_async_callable(handler),
            description=description,
            metadata=metadata,
        )
        return self.registry.add(spec).ref(self.registry)

    def _register_internal(self, function_id: str, handler: Callable[[Any], Any]) -> None:
        self.registry.add(
            FunctionSpec(
                id=function_id,
                handler=handler,
                is_async=is_async_callable(handler),
                internal=True,
            )
        )

    def register_trigger(self, trigger: Mapping[str, Any]) -> Trigger:
        """Bind a trigger (iii's ``{"type", "function_id", "config"}``) to a function.

        Returns a :class:`Trigger` whose ``unregister()`` stops it. Raises ``ValueError``
        for an unknown type or a trigger its type refuses (the error says why)."""
        registrar = trigger_registrar(trigger.get("type"))
        config = trigger.get("config")
        if isinstance(config, Mapping) and config.get("condition_function_id") is not None:
            # iii skips the handler when the condition returns false; ignoring the key
            # would run the handler for everything the condition was there to hold back.
            function_id = trigger.get("function_id")
            raise ValueError(
                f"{trigger.get('type')} trigger of {function_id!r}: condition_function_id "
                "is not supported by iii-embedded; check the condition in "
                f"{function_id!r} itself (return early when it does not hold)"
            )
        return self._bindings.bind(registrar, self, trigger)

    def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the running engine's loop, waiting for it from another thread (so
        that trigger registrations and unregistrations made from several threads run one
        at a time); here and now when the engine is not running, or on its loop."""
        rt = self._runtime
        portal = rt.portal if rt is not None else None
        if rt is None or portal is None or threading.get_ident() == rt.loop_thread:
            return fn()

        def run() -> tuple[bool, Any]:
            try:
                return True, fn()
            except BaseException as exc:  # raised in the caller's thread, not the portal's
                return False, exc

        try:
            ok, value = portal.call(run)
        except RuntimeError:  # the portal has stopped: so has the engine
            return fn()
        if not ok:
            raise value
        result: T = value
        return result

    @property
    def asgi_app(self) -> Any:
        """The ASGI application serving this app's HTTP triggers (mount it anywhere)."""
        return self.http_router

    def add_queue(self, queue: QueueConfig) -> None:
        """Add a named queue (before or while running). Raises ``ValueError`` if a queue
        of that name exists with a different configuration."""
        existing = self.config.queues.get(queue.name)
        if existing is not None:
            if existing != queue:
                raise ValueError(f"queue {queue.name!r} already exists with another config")
            return
        self.config = attrs.evolve(self.config, queues={**self.config.queues, queue.name: queue})
        self._added_queues[queue.name] = queue
        rt = self._runtime
        if rt is not None:
            rt.add_queue(queue)

    def on(self, event: str, callback: Callable[..., Any]) -> None:
        """Subscribe ``callback(job, **info)`` to a job event (see ``HOOK_EVENTS``)."""
        if event not in HOOK_EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {sorted(HOOK_EVENTS)}")
        self.hooks.setdefault(event, []).append(callback)

    # --- triggering ------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        """The running engine; ``RuntimeError`` when the app is not running."""
        rt = self._runtime
        if rt is None:
            if self._forked:
                raise RuntimeError(
                    "the iii-embedded engine runs in the process this one was forked from, "
                    "not here: start it after the fork, in this process (iii.start(), or "
                    "`async with iii.running():`), rather than before it in the parent "
                    "(gunicorn --preload: in a post_fork hook, not at import); see "
                    "docs/design.md, 'Forking'"
                )
            raise RuntimeError(
                "the iii-embedded engine is not running: use `async with iii.running():`, "
                "`iii.run()` or `iii.start()` first"
            )
        return rt

    @property
    def is_running(self) -> bool:
        """True between the start and the end of a lifecycle."""
        return self._runtime is not None

    async def trigger_async(
        self,
        request: str | Mapping[str, Any] | None = None,
        payload: Any = None,
        *,
        function_id: str | None = None,
        action: EnqueueAction | VoidAction | Mapping[str, Any] | None = None,
        timeout_ms: int | None = None,
    ) -> Any:
        """Invoke a function: synchronously (no action), Void, or Enqueue.

        ``request`` is iii's dict (``function_id``, ``payload``, ``action``, ``timeout_ms``)
        or a function id with the other fields as arguments. Returns the handler's value,
        ``None`` (Void) or ``{"messageReceiptId": id}`` (Enqueue); raises
        :class:`InvocationError` as iii does.
        """
        fid, data, act, timeout = _parse_request(request, payload, action, timeout_ms, function_id)
        if timeout is None:
            timeout = self.invocation_timeout_ms
        rt = self.runtime
        if rt.loop_thread == threading.get_ident():
            if isinstance(act, EnqueueAction):  # the hot path, with no coroutine between
                try:  # this one and the store's future
                    ids = await rt.submit_enqueue(fid, (data,), act, batch=False)
                except StoreError as exc:
                    raise enqueue_failed(exc) from exc
                return {"messageReceiptId": ids[0]}
            if act is None:  # a synchronous call, with no coroutine in between either
                return await rt.call(fid, data, timeout)
            return await rt.trigger(fid, data, act, timeout)
        # Called from another event loop (the engine runs in a background thread).
        if isinstance(act, EnqueueAction):
            try:
                # Never committed in this thread: it runs the caller's event loop.
                ids = await _awaited_result(rt, self._enqueue_elsewhere(fid, data, act, False))
            except StoreError as exc:
                raise enqueue_failed(exc) from exc
            return {"messageReceiptId": ids[0]}
        if isinstance(act, VoidAction):
            rt.fire_from_thread(fid, data)
            return None
        future = rt.call_in_threads(fid, data)
        if future is None:
            return await _awaited_result(rt, rt.from_thread(rt.trigger, fid, data, act, timeout))
        with anyio.move_on_after(rt.call_timeout_s(timeout)):
            try:
                return await _wait_elsewhere(future)
            except BaseException as exc:  # the handler's own (SystemExit too), or a stop
                if not _raised_in(future, exc):
                    raise
                error = rt.call_failed(fid, future, timeout, exc)
                raise error from error.__cause__
        # The wait ran out. The handler may have returned at that very moment: then its
        # outcome stands (the blocking path's ``result(timeout)`` sees it the same way).
        try:
            if future.done() and not future.cancelled():
                return future.result()
            error = rt.call_failed(fid, future, timeout, TimeoutError())
        except Exception as exc:
            error = rt.call_failed(fid, future, timeout, exc)
        raise error from error.__cause__

    def trigger(
        self,
        request: str | Mapping[str, Any] | None = None,
        payload: Any = None,
        *,
        function_id: str | None = None,
        action: EnqueueAction | VoidAction | Mapping[str, Any] | None = None,
        timeout_ms: int | None = None,
    ) -> Any:
        """The blocking twin of :meth:`trigger_async`, for sync code and sync handlers.

        Raises ``RuntimeError`` on the engine's event-loop thread (it would deadlock there):
        use ``await iii.trigger_async(...)`` in async code.
        """
        fid, data, act, timeout = _parse_request(request, payload, action, timeout_ms, function_id)
        if timeout is None:
            timeout = self.invocation_timeout_ms
        rt = self.runtime
        if rt.loop_thread == threading.get_ident():
            raise RuntimeError(
                "iii.trigger() blocks, and this is the engine's event-loop thread: "
                "use `await iii.trigger_async(...)` in async code"
            )
        if isinstance(act, EnqueueAction):
            try:
                ids = _blocking_result(rt, self._enqueue_elsewhere(fid, data, act, True))
            except StoreError as exc:
                raise enqueue_failed(exc) from exc
            return {"messageReceiptId": ids[0]}
        if isinstance(act, VoidAction):
            rt.fire_from_thread(fid, data)
            return None
        future = rt.call_in_threads(fid, data)
        if future is None:
            return _blocking_result(rt, rt.from_thread(rt.trigger, fid, data, act, timeout))
        try:
            return future.result(timeout=rt.call_timeout_s(timeout))
        except BaseException as exc:  # the handler's own (SystemExit too), or the timeout
            if not isinstance(exc, Exception) and not _raised_in(future, exc):
                raise  # the caller's own KeyboardInterrupt, say
            error = rt.call_failed(fid, future, timeout, exc)
            raise error from error.__cause__

    def _enqueue_elsewhere(
        self, fid: str, data: Any, act: EnqueueAction, inline: bool
    ) -> Future[list[str]]:
        """An enqueue from a thread other than the engine loop's: the jobs are built here
        and go straight to the store's writer when the store takes them from threads
        (the file store), else to the engine's loop."""
        rt = self.runtime
        jobs, future = rt.enqueue_elsewhere(fid, data, act, inline=inline)
        return rt.from_thread(rt.store_jobs, jobs, act.queue) if future is None else future

    def _call_blocking(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``await fn(*args)`` on the engine's loop, from a thread that blocks meanwhile;
        ``name`` (``iii.stats``) is the blocking call, named if it is made on the loop."""
        rt = self.runtime
        if rt.loop_thread == threading.get_ident():
            raise RuntimeError(
                f"{name}() blocks, and this is the engine's event-loop thread: "
                f"use `await {name}_async(...)` in async code"
            )
        return _blocking_result(rt, rt.from_thread(fn, *args))

    async def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``await fn(*args)`` on the engine's loop, from this loop or another one."""
        rt = self.runtime
        if rt.loop_thread == threading.get_ident():
            return await fn(*args)
        return await _awaited_result(rt, rt.from_thread(fn, *args))

    # --- Trigger.dev-style triggering ------------------------------------------------

    async def batch_trigger_async(
        self,
        function_id: str,
        payloads: Iterable[Any],
        *,
        queue: str = "default",
        delay_ms: int = 0,
        idempotency_keys: Iterable[str | None] | None = None,
        max_attempts: int | None = None,
    ) -> list[str]:
        """Enqueue one run per payload, all in one transaction or none; the run ids in input
        order. A bad item (missing FIFO field, payload not JSON) rejects the whole batch with
        an ``enqueue_error`` naming its index."""

        async def go() -> list[str]:
            return await _batch_trigger(
                self.runtime,
                function_id,
                payloads,
                queue=queue,
                delay_ms=delay_ms,
                idempotency_keys=idempotency_keys,
                max_attempts=max_attempts,
            )

        result: list[str] = await self._on_loop(go)
        return result

    def batch_trigger(
        self,
        function_id: str,
        payloads: Iterable[Any],
        *,
        queue: str = "default",
        delay_ms: int = 0,
        idempotency_keys: Iterable[str | None] | None = None,
        max_attempts: int | None = None,
    ) -> list[str]:
        """Blocking twin of :meth:`batch_trigger_async`."""
        result: list[str] = self._call_blocking(
            "iii.batch_trigger",
            lambda: self.batch_trigger_async(
                function_id,
                payloads,
                queue=queue,
                delay_ms=delay_ms,
                idempotency_keys=idempotency_keys,
                max_attempts=max_attempts,
            ),
        )
        return result

    async def trigger_and_wait_async(
        self,
        function_id: str,
        payload: Any,
        *,
        queue: str = "default",
        timeout_ms: int | None = None,
        delay_ms: int = 0,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
        _invocation: Invocation | None = None,
    ) -> RunResult:
        """Enqueue a run and wait for its final outcome (after its retries).

        Returns a :class:`RunResult` (``ok``, ``output`` or ``error``; ``unwrap()`` raises
        ``RunFailedError``). ``timeout_ms`` bounds the wait (``InvocationError`` with code
        ``TIMEOUT``; the run goes on). Works anywhere, in a handler or not; a waiting queued
        handler lends its concurrency slot while it waits.
        """
        inv = _invocation if _invocation is not None else current_invocation()

        async def go() -> RunResult:
            return await _trigger_and_wait(
                self.runtime,
                function_id,
                payload,
                queue=queue,
                timeout_ms=timeout_ms,
                delay_ms=delay_ms,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
                inv=inv,
            )

        result: RunResult = await self._on_loop(go)
        return result

    def trigger_and_wait(
        self,
        function_id: str,
        payload: Any,
        *,
        queue: str = "default",
        timeout_ms: int | None = None,
        delay_ms: int = 0,
        idempotency_key: str | None = None,
        max_attempts: int | None = None,
    ) -> RunResult:
        """Blocking twin of :meth:`trigger_and_wait_async` (for sync code and handlers)."""
        inv = current_invocation()
        result: RunResult = self._call_blocking(
            "iii.trigger_and_wait",
            lambda: self.trigger_and_wait_async(
                function_id,
                payload,
                queue=queue,
                timeout_ms=timeout_ms,
                delay_ms=delay_ms,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
                _invocation=inv,
            ),
        )
        return result

    async def batch_trigger_and_wait_async(
        self,
        function_id: str,
        payloads: Iterable[Any],
        *,
        queue: str = "default",
        timeout_ms: int | None = None,
        delay_ms: int = 0,
        idempotency_keys: Iterable[str | None] | None = None,
        max_attempts: int | None = None,
        _invocation: Invocation | None = None,
    ) -> BatchResult:
        """Enqueue a batch atomically, then wait for every run; ``BatchResult.runs`` are in
        input order and a failed run carries its own error (this never raises for one).
        ``delay_ms`` and ``max_attempts`` apply to every run, as in :meth:`batch_trigger`."""
        inv = _invocation if _invocation is not None else current_invocation()

        async def go() -> BatchResult:
            return await _batch_trigger_and_wait(
                self.runtime,
                function_id,
                payloads,
                queue=queue,
                timeout_ms=timeout_ms,
                delay_ms=delay_ms,
                idempotency_keys=idempotency_keys,
                max_attempts=max_attempts,
                inv=inv,
            )

        result: BatchResult = await self._on_loop(go)
        return result

    def batch_trigger_and_wait(
        self,
        function_id: str,
        payloads: Iterable[Any],
        *,
        queue: str = "default",
        timeout_ms: int | None = None,
        delay_ms: int = 0,
        idempotency_keys: Iterable[str | None] | None = None,
        max_attempts: int | None = None,
    ) -> BatchResult:
        """Blocking twin of :meth:`batch_trigger_and_wait_async`."""
        inv = current_invocation()
        result: BatchResult = self._call_blocking(
            "iii.batch_trigger_and_wait",
            lambda: self.batch_trigger_and_wait_async(
                function_id,
                payloads,
                queue=queue,
                timeout_ms=timeout_ms,
                delay_ms=delay_ms,
                idempotency_keys=idempotency_keys,
                max_attempts=max_attempts,
                _invocation=inv,
            ),
        )
        return result

    # --- lifecycles ------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, *, serve: bool = True) -> AsyncIterator[III]:
        """Run the engine inside the current anyio/asyncio program for the ``with`` block.

        On exit the engine shuts down gracefully (see ``shutdown_grace_ms``).
        ``serve=False`` leaves out the http server and the cron schedules: for a process
        that only calls functions beside the one that serves them (as ``iii-embedded
        trigger --app`` does), which would otherwise take the port a second time and
        compete for the cron fires.
        """
        if self._runtime is not None:
            raise RuntimeError("this III app is already running")
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # trio, say: the engine needs asyncio's loop
            raise RuntimeError(
                "iii-embedded's engine runs on asyncio (anyio's asyncio backend), and no "
                "asyncio event loop runs here: run it under asyncio (in pytest, "
                "anyio_backend = 'asyncio'), or start it on its own thread with "
                "iii.start() and call it from this loop"
            ) from None
        store = self._store_override or open_store(self.config.store)
        rt = Runtime(
            config=self.config,
            registry=self.registry,
            clock=self.clock,
            store=store,
            hooks=self.hooks,
            shutdown_grace_s=self.shutdown_grace_ms / 1000,
        )
        # Opened before the task group, so that a store that cannot be opened raises its
        # own StoreError rather than an exception group.
        await store.open()
        RUNNING_OWNERS.add(rt.owner)  # its leases are alive while this block runs
        try:
            # Pinned once the store is open (its threads share the loop's CPU), and
            # unpinned before it closes: threads started meanwhile on the loop's thread
            # inherit the pin (see _affinity).
            with pinned(self.config.store.pin_cpu, store.own_thread_ids()):
                async with (
                    _single_errors(),
                    BlockingPortal() as portal,
                    anyio.create_task_group() as tg,
                ):
                    await rt.start(tg, portal)
                    self._runtime = rt
                    self._forked = False
                    _ENGINES.add(self)
                    try:
                        if serve and self.config.http is not None:
                            from ._http import HttpServer

                            http = self.config.http
                            self.http_server = HttpServer(
                                self, http.host, http.port, http.header_timeout_ms
                            )
                            await self.http_server.start(tg)
                        from ._cron import start_cron

                        if serve:
                            start_cron(self, tg)
                        for hook in self.lifecycle_hooks:
                            result = hook(self, tg)
                            if inspect.isawaitable(result):
                                await result
                        yield self
                    finally:
                        with anyio.CancelScope(shield=True):
                            try:
                                if self.http_server is not None:
                                    await self.http_server.stop()
                                    self.http_server = None
                                await rt.shutdown()
                            finally:
                                self._runtime = None
                                _ENGINES.discard(self)
                                tg.cancel_scope.cancel()
        finally:
            RUNNING_OWNERS.discard(rt.owner)
            with anyio.CancelScope(shield=True):
                await store.aclose()

    async def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully (main thread only)."""
        _refuse_run_at_import()
        _require_main_thread("serve_forever()")
        # Listen before starting: a signal that arrives while the engine starts (its
        # lifecycle hooks may already run jobs) is then handled once it is up, instead of
        # killing the process with the default action.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with self.running():
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    return

    def run(self) -> None:
        """Run the engine as the main program (blocking) until SIGINT/SIGTERM. Only in
        the main thread, where Python delivers signals; elsewhere use :meth:`start`."""
        _refuse_run_at_import()
        _require_main_thread("run()")
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop here, as expected
            pass
        else:
            raise RuntimeError(
                "iii.run() runs its own event loop, and this thread already runs one: in "
                "async code use `async with iii.running():`, or `await iii.serve_forever()` "
                "to serve until SIGINT/SIGTERM"
            )
        anyio.run(self.serve_forever)

    def start(self, *, serve: bool = True) -> III:
        """Start the engine on a background thread and return once it is running.
        ``serve=False``: without the http server and cron (see :meth:`running`). Stop it
        with :meth:`shutdown`; a program that ends without doing so gets the same
        graceful shutdown at exit. ``with iii.start():`` (as ``with iii:``) shuts it down at
        the end of the block."""
        self._start(serve)
        self._unentered = True
        return self

    def _start(self, serve: bool) -> None:
        if self._thread_cm is not None:
            raise RuntimeError("this III app is already started")
        portal_cm = anyio.from_thread.start_blocking_portal()
        portal = portal_cm.__enter__()
        try:
            thread_cm = portal.wrap_async_context_manager(self.running(serve=serve))
            thread_cm.__enter__()
        except BaseException:
            portal_cm.__exit__(None, None, None)
            raise
        self._portal_cm = portal_cm
        self._thread_cm = thread_cm
        _STARTED.add(self)
        # A program that ends without shutdown() would kill the engine's thread mid-flight
        # (or, with an anyio whose portal thread is not a daemon, wait for it for ever):
        # stop it gracefully at exit instead.
        _stop_at_exit_too(self._runtime)
        _stop_started_engines_on_sigterm()

    def shutdown(self) -> None:
        """Stop an engine started with :meth:`start` (graceful; waits for it).

        Raises ``RuntimeError`` on the engine's own event-loop thread (an async handler),
        where waiting for the engine to stop would wait for itself. From a sync handler
        of a queue it waits the grace period for that handler too, and then gives its job
        back (``released``). A second call while one is under way waits for it (from
        another thread) or returns at once (a signal handler that interrupted it)."""
        self._stop()

    def _stop_at_exit(self) -> None:
        """At interpreter exit, for an engine :meth:`start` started and nobody shut
        down: the graceful shutdown the program did not ask for. Not for
        ``register_worker``'s, whose keeper thread serves until a signal or shutdown()."""
        if self._thread_cm is None or self._stopping is not None or self._kept_serving:
            return  # stopped, stopping, or a forked child's copy of the parent's engine
        log.info(
            "the program is ending while the engine still runs: shutting it down "
            "gracefully (up to the %s ms grace period); call shutdown() to choose when",
            self.shutdown_grace_ms,
        )
        self._stop()

    def _stop(self) -> bool:
        """:meth:`shutdown`; True if this call stopped the engine (False: it was not
        started, or another call is stopping it)."""
        runtime = self._runtime
        me = threading.get_ident()
        if runtime is not None and runtime.loop_thread == me:
            raise RuntimeError(
                "iii.shutdown() blocks until the engine has stopped, and this is the "
                "engine's event-loop thread: call it from outside the engine (or stop "
                "the program another way, such as a signal)"
            )
        stopping = self._stopping
        if stopping is not None:  # under way
            if self._stopping_thread != me:
                stopping.wait()
            return False
        thread_cm, portal_cm = self._thread_cm, self._portal_cm
        if thread_cm is None and portal_cm is None:
            return False
        self._stopping, self._stopping_thread = threading.Event(), me
        self._thread_cm = self._portal_cm = None
        self._unentered = False
        _STARTED.discard(self)
        if not _STARTED:
            _restore_sigterm()
        if runtime is not None:
            runtime.stopped_by(current_invocation())
        try:
            try:
                if thread_cm is not None:
                    thread_cm.__exit__(None, None, None)
            finally:  # the engine's thread ends even if its shutdown failed
                if portal_cm is not None:
                    portal_cm.__exit__(None, None, None)
        finally:
            try:
                for callback in self._shutdown_callbacks:
                    callback()
            finally:
                done, self._stopping, self._stopping_thread = self._stopping, None, None
                done.set()
        return True

    def on_shutdown(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` after :meth:`shutdown` stopped a started engine."""
        self._shutdown_callbacks.append(callback)

    def __enter__(self) -> III:
        if self._unentered and self._thread_cm is not None:
            # ``with iii.start():``: the engine the call started is the block's.
            self._unentered = False
            return self
        self._start(serve=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- inspection and the dead-letter queue ------------------------------------------

    def _known_queue(self, queue: str) -> str:
        if queue not in self.config.queues:
            raise ValueError(f"Queue '{queue}' not found")
        return queue

    async def stats_async(self) -> dict[str, QueueStats]:
        """Statistics of every configured queue."""
        rt = self.runtime
        now = rt.clock.now()
        counts = await rt.store.counts(now)
        from ._stores import QueueCounts

        out: dict[str, QueueStats] = {}
        for name, runner in rt.runners.items():
            out[name] = QueueStats.build(
                queue=name,
                type=runner.config.type,
                concurrency=runner.config.concurrency,
                counts=counts.get(name, QueueCounts()),
                now=now,
                completed=runner.completed,
                failed=runner.failed,
                retried=runner.retried,
                dead_lettered=runner.dead_lettered,
                prefetched=runner.prefetched_count,
            )
        return out

    def stats(self) -> dict[str, QueueStats]:
        """Blocking twin of :meth:`stats_async`."""
        result: dict[str, QueueStats] = self._call_blocking("iii.stats", self.stats_async)
        return result

    async def queue_stats_async(self, queue: str) -> QueueStats:
        """Statistics of one queue."""
        return (await self.stats_async())[self._known_queue(queue)]

    def queue_stats(self, queue: str) -> QueueStats:
        """Blocking twin of :meth:`queue_stats_async`."""
        result: QueueStats = self._call_blocking("iii.queue_stats", self.queue_stats_async, queue)
        return result

    async def dlq_list_async(
        self, queue: str, *, offset: int = 0, limit: int = 100
    ) -> list[DeadJob]:
        """Dead jobs of ``queue``, oldest failure first; ``offset`` and ``limit`` are
        integers >= 0 (``ValueError`` otherwise)."""
        for name, value in (("offset", offset), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dlq_list {name} must be an integer >= 0, got {value!r}")
        jobs = await self.runtime.store.list_dead(
            self._known_queue(queue), offset=offset, limit=limit
        )
        return [DeadJob.from_job(j) for j in jobs]

    def dlq_list(self, queue: str, *, offset: int = 0, limit: int = 100) -> list[DeadJob]:
        """Blocking twin of :meth:`dlq_list_async`."""
        result: list[DeadJob] = self._call_blocking(
            "iii.dlq_list", lambda: self.dlq_list_async(queue, offset=offset, limit=limit)
        )
        return result

    async def dlq_redrive_async(self, queue: str, ids: Sequence[str] | None = None) -> list[str]:
        """Send dead jobs (``ids``, or all) back to ``queue`` with their attempts reset.

        A redriven job joins the tail of its FIFO group. Returns the ids moved.
        """
        rt = self.runtime
        name = self._known_queue(queue)
        # Before the redrive is stored as well as after: an enqueue between the two
        # must not be claimed at enqueue ahead of the redriven jobs (docs/design.md,
        # "Claims at enqueue").
        rt.runners[name].wake()
        moved = await rt.store.redrive(name, ids, rt.clock.now())
        if moved:
            rt.runners[name].wake()
        return moved

    def dlq_redrive(self, queue: str, ids: Sequence[str] | None = None) -> list[str]:
        """Blocking twin of :meth:`dlq_redrive_async`."""
        result: list[str] = self._call_blocking(
            "iii.dlq_redrive", self.dlq_redrive_async, queue, ids
        )
        return result

    async def dlq_discard_async(self, queue: str, ids: Sequence[str] | None = None) -> list[str]:
        """Delete dead jobs (``ids``, or all) of ``queue``; returns the ids deleted."""
        return await self.runtime.store.discard(self._known_queue(queue), ids)

    def dlq_discard(self, queue: str, ids: Sequence[str] | None = None) -> list[str]:
        """Blocking twin of :meth:`dlq_discard_async`."""
        result: list[str] = self._call_blocking(
            "iii.dlq_discard", self.dlq_discard_async, queue, ids
        )
        return result


_ENGINES: weakref.WeakSet[III] = weakref.WeakSet()
"""The apps whose engine runs in this process (see ``_forget_engines_in_child``)."""

_LEFT_BY_FORK: list[object] = []
"""What a forked child's apps held of the parent's engines: kept, never finalised, so
that the child does not close the parent's SQLite connection or portal in its stead."""


def _forget_engines_in_child() -> None:
    """In a forked child: an engine's threads (its event loop, the store's writer, the
    handlers' pools) stay in the parent, so no app runs one here. A call waiting on the
    parent's loop would wait for ever, and a commit on its SQLite connection from here
    is one SQLite forbids. The apps say they are not running, and may start again."""
    for app in list(_ENGINES):
        _LEFT_BY_FORK.append((app._runtime, app._thread_cm, app._portal_cm, app.http_server))
        app._runtime = None
        app._thread_cm = app._portal_cm = None
        app._stopping = app._stopping_thread = None
        app.http_server = None
        app._forked = True
    _ENGINES.clear()
    _STARTED.clear()
    _restore_sigterm()


os.register_at_fork(after_in_child=_forget_engines_in_child)

_STARTED: weakref.WeakSet[III] = weakref.WeakSet()
"""The apps whose engine :meth:`III.start` started (on a thread of its own) and nobody
has stopped yet: what ``_on_sigterm`` and the exit hook (``_stop_started_engines``) stop."""

_EXIT_HOOKS: set[str] = set()
"""Which exit hooks ``_stop_at_exit_too`` registered: "early", "late", or both."""


def _stop_started_engines() -> None:
    for app in list(_STARTED):
        app._stop_at_exit()


def _stop_at_exit_too(runtime: Runtime | None) -> None:
    """Have the engines :meth:`III.start` started stopped gracefully at interpreter exit.

    ``atexit`` runs after the program's other non-daemon threads have ended, so they may
    still use the engine. But where the engine's thread is itself not a daemon (older
    anyio, 4.4 among them, runs its portal in a ``ThreadPoolExecutor``), Python would wait
    for it before running ``atexit``, for ever: there the stop runs where the executors'
    own exit hook does, before the threads are waited for."""
    thread = None
    if runtime is not None:
        thread = next((t for t in threading.enumerate() if t.ident == runtime.loop_thread), None)
    early = thread is not None and not thread.daemon
    when = "early" if early else "late"
    if when in _EXIT_HOOKS:
        return
    _EXIT_HOOKS.add(when)
    register_early = getattr(threading, "_register_atexit", None)
    if early and register_early is not None:
        with contextlib.suppress(RuntimeError):  # the interpreter is already exiting
            register_early(_stop_started_engines)
            return
    atexit.register(_stop_started_engines)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM to a program that left its default action (``flask run``, Django's
    ``runserver``, a script) and started engines: stop them gracefully (the exit hooks do
    not run when SIGTERM kills a process), then let SIGTERM end the process as it would
    have, with the same status."""
    log.info("received SIGTERM, shutting down the engine before the process ends")
    try:
        for app in list(_STARTED):
            app._stop()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


def _stop_started_engines_on_sigterm() -> None:
    """Make SIGTERM stop the started engines first, where the program leaves it to its
    default action: a server that handles SIGTERM itself (gunicorn, uvicorn) keeps its
    handler, and one that ignores it keeps ignoring it. Signals are set in the main
    thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError):  # not the main interpreter
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _restore_sigterm() -> None:
    """SIGTERM's default action back, once no started engine is left (or in a forked
    child, which has none)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError):
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _require_main_thread(what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"iii.{what} stops on SIGINT/SIGTERM, which Python delivers only to the main "
            "thread, and this is another thread: use iii.start() (and iii.shutdown()) to "
            "run the engine from here, or `async with iii.running():` in async code"
        )


def _blocking_result(rt: Runtime, future: Future[T]) -> T:
    """Wait in this thread for a call on the engine's loop (or the store's writer); a
    call the engine's shutdown ended (its task cancelled, or the store closed under it)
    raises ``engine_stopped``."""
    try:
        return future.result()
    except (FutureCancelled, StoreClosedError) as exc:
        if rt.stopping:
            raise engine_stopped() from exc
        raise


async def _awaited_result(rt: Runtime, future: Future[T]) -> T:
    """:func:`_blocking_result` for a caller on another event loop; the caller's own
    cancellation goes on as itself."""
    try:
        return await _wait_elsewhere(future)
    except (FutureCancelled, asyncio.CancelledError, StoreClosedError) as exc:
        if rt.stopping and not _caller_cancelled():
            raise engine_stopped() from exc
        raise


def _raised_in(future: Future[Any], exc: BaseException) -> bool:
    """Whether ``exc`` is what ``future`` (a handler's call in a pool thread) raised, and
    not the caller's own cancellation or interrupt."""
    return future.done() and not future.cancelled() and future.exception() is exc


def _caller_cancelled() -> bool:
    """True when the current asyncio task is being cancelled (not just a future it
    awaited); False outside asyncio."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    return task is not None and task.cancelling() > 0


async def _wait_elsewhere(future: Future[T]) -> T:
    """Await a concurrent future (the engine's or the store writer's) on the caller's own
    event loop: on asyncio with one wake-up; on another library (trio, through anyio) in a
    worker thread. Either way, cancelling the caller cancels the future."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        try:
            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            future.cancel()
            raise
    return await asyncio.wrap_future(future)


@contextlib.asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Re-raise a lone exception out of the task group's exception group.

    The body of ``async with iii.running():`` runs inside the engine's task group, which
    wraps whatever the user's code raises; a user who raised ``ValueError`` should catch
    ``ValueError``. Groups of several real errors are left as they are.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        errors = group.exceptions
        while len(errors) == 1 and isinstance(errors[0], BaseExceptionGroup):
            errors = errors[0].exceptions
        if len(errors) == 1:
            raise errors[0] from errors[0].__cause__
        raise


_REQUEST_KEYS = ("function_id", "payload", "action", "timeout_ms")
"""The keys of a trigger request dict (iii's ``TriggerRequest``)."""
_REQUEST_KEY_SET = frozenset(_REQUEST_KEYS)


def _parse_request(
    request: str | Mapping[str, Any] | None,
    payload: Any,
    action: EnqueueAction | VoidAction | Mapping[str, Any] | None,
    timeout_ms: int | None,
    function_id: str | None = None,
) -> tuple[str, Any, EnqueueAction | VoidAction | None, int | None]:
    if function_id is not None:  # the keyword form: trigger(function_id="...", ...)
        if request is not None:
            raise InvocationError(
                "invalid_request",
                "give the function id once: as the first argument or as function_id=",
            )
        request = function_id
    if type(request) is str and request:  # the common spelling, decided without an ABC check
        fid = request
    elif isinstance(request, Mapping):
        if not _REQUEST_KEY_SET.issuperset(request):
            refuse_unknown_keys(request, "a trigger request", _REQUEST_KEYS, "invalid_request")
        named = request.get("function_id")
        if not isinstance(named, str) or not named:
            raise InvocationError(
                "invalid_request", "a trigger request needs a 'function_id' string"
            )
        if payload is not None or action is not None or timeout_ms is not None:
            raise InvocationError(
                "invalid_request",
                "a request dict carries its own payload, action and timeout_ms: give them "
                "in it, not as arguments as well (they would be ignored)",
            )
        fid = named
        payload, action = request.get("payload"), request.get("action")
        timeout_ms = request.get("timeout_ms")
    elif not isinstance(request, str) or not request:
        raise InvocationError("invalid_request", f"function id must be a string, got {request!r}")
    else:
        fid = request
    if timeout_ms is not None:
        check_timeout(timeout_ms)
    return fid, payload, parse_action(action), timeout_ms
