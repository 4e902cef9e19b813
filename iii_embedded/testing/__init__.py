"""Testing support: test *your* functions with the runtime's own tools.

* :class:`VirtualClock`: time that moves only when told, so backoff, delays and timeouts
  take no wall time.
* :func:`drain`: wait until every queue is idle, advancing a virtual clock to each delayed
  job's time as needed.
* Inspection: :func:`queued_jobs`, :func:`running_jobs`, :func:`held_jobs`,
  :func:`dead_jobs`.
* :func:`http_request`: call the app's HTTP triggers without a server.
* A pytest plugin (installed with the package) with the fixtures ``iii_clock`` and
  ``iii_app`` (see :mod:`iii_embedded.testing._plugin`).

Example::

    async def test_payment_retries(iii_clock):
        iii = III(config, clock=iii_clock)
        ...
        async with iii.running():
            await iii.trigger_async("pay", {...}, action=TriggerAction.Enqueue(queue="payment"))
            await drain(iii)
            assert [j.attempts for j in await dead_jobs(iii, "payment")] == [5]
"""

from __future__ import annotations

import functools
import json as jsonlib
import math
import threading
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote, unquote

import anyio
import anyio.to_thread
import attrs

from .._app import III
from .._clock import VirtualClock
from .._context import current_invocation
from .._runs import Run
from .._stats import DeadJob

__all__ = [
    "VirtualClock",
    "drain",
    "drain_blocking",
    "queued_jobs",
    "running_jobs",
    "held_jobs",
    "dead_jobs",
    "http_request",
    "HttpResponse",
    "DrainTimeout",
]


class DrainTimeout(TimeoutError):
    """``drain()`` gave up: the queues were still busy after ``timeout`` seconds of wall time."""


async def drain(app: III, *, timeout: float = 30.0, max_advance_s: float = math.inf) -> None:
    """Wait until every queue of ``app`` is idle and nothing is running.

    With a :class:`VirtualClock`, time is advanced to each delayed job's availability
    (backoff, ``delay_ms``) until none is left or the next one is more than
    ``max_advance_s`` ahead of the time drain started; also while handlers wait for runs
    that are delayed (``trigger_and_wait`` of a job that retries), when nothing else
    runs. Past ``max_advance_s``, drain returns once nothing else can happen before it:
    delayed jobs stay queued, and handlers waiting for them stay waiting (a waiter's
    timeout within the limit fires first). With the system clock, drain waits for delayed
    jobs in real time. A cron fire whose time has come (the clock advanced past it) is
    waited for; cron schedules and a running handler's own timers (``timeout_ms``) are not
    advanced to (advance the clock yourself). On the way to a delayed job's time, the clock
    stops at each timeout that falls due before it (a waiter's ``timeout_ms``, a
    handler's), so they fire at their own time. Raises :class:`DrainTimeout` after
    ``timeout`` seconds of wall time.

    From an event loop other than the engine's (an engine started with ``iii.start()``,
    awaited from another asyncio loop or from trio), it runs :func:`drain_blocking` in a
    worker thread. Inside a handler it raises ``RuntimeError``: the handler would wait for
    itself to return.
    """
    _refuse_in_handler("drain")
    rt = app.runtime
    if threading.get_ident() != rt.loop_thread:
        await anyio.to_thread.run_sync(
            functools.partial(drain_blocking, app, timeout=timeout, max_advance_s=max_advance_s)
        )
        return
    clock = rt.clock
    virtual = isinstance(clock, VirtualClock)
    limit = clock.now() + max_advance_s
    with anyio.move_on_after(timeout) as scope:
        while True:
            waiting = False
            while not rt.is_quiet():
                if virtual and rt.only_waiting():
                    waiting = True
                    break
                with anyio.move_on_after(0.05):
                    await rt.wait_activity()
            due = await rt.next_due()
            if due is None or due > limit:
                if rt.is_quiet():
                    if virtual:
                        return
                    # A job may have fallen due on the wall clock before its queue's timer
                    # fired (it runs on the event loop's clock, and fires only when the
                    # loop comes round to it): no longer delayed, not yet claimed.
                    overdue = await rt.next_due(after=-math.inf)
                    if overdue is None or overdue > clock.now():
                        return
                    rt.wake_all()
                    await anyio.lowlevel.checkpoint()
                    continue
                if (
                    waiting
                    and due is not None
                    and isinstance(clock, VirtualClock)
                    and rt.only_waiting()
                ):
                    # Handlers wait for a run due past the limit: a timeout within it
                    # fires at its time; then nothing more can happen before the limit.
                    stop = clock.next_stop()
                    if stop is None or stop > limit:
                        return
                    clock.advance_to(stop)
                    rt.wake_all()
                    await anyio.lowlevel.checkpoint()
                    continue
                if waiting:  # waiting for something no delayed run here will bring
                    with anyio.move_on_after(0.05):
                        await rt.wait_activity()
                continue
            if isinstance(clock, VirtualClock):
                stop = clock.next_stop()  # a timeout before it fires at its own time
                clock.advance_to(due if stop is None or stop >= due else stop)
            else:
                await clock.sleep_until(due)
            rt.wake_all()
            await anyio.lowlevel.checkpoint()
    if scope.cancelled_caught:
        raise DrainTimeout(f"still busy after {timeout} s of wall time: {await _busy(app)}")


async def _busy(app: III) -> str:
    """What keeps ``app`` from being quiet, for :class:`DrainTimeout`."""
    rt = app.runtime
    parts = [
        f"{r.unsettled} job(s) claimed and not settled in {name!r}"
        + (f" ({r.lent} waiting for other runs)" if r.lent else "")
        for name, r in rt.runners.items()
        if r.unsettled
    ]
    parts += [
        f"{count} {what}"
        for count, what in (
            (rt.calls_inflight, "synchronous call(s) running"),
            (rt.waiting_calls, "call(s) waiting for runs"),
            (len(rt.cron_fires), "cron fire(s) running"),
        )
        if count
    ]
    dispatching = [name for name, r in rt.runners.items() if not r.idle and not r.unsettled]
    if dispatching:
        parts.append(f"queue(s) {dispatching} still dispatching")
    # Held runs are not work, but a handler may be waiting for one.
    try:
        stats = await app.stats_async()
    except OSError:  # a store that fails here must not hide the timeout
        stats = {}
    parts += [
        f"{queue.held} run(s) held in {name!r} (function not registered)"
        for name, queue in stats.items()
        if queue.held
    ]
    return "; ".join(parts) or "a Void call or an async hook runs"


def drain_blocking(app: III, *, timeout: float = 30.0, max_advance_s: float = math.inf) -> None:
    """:func:`drain` for synchronous code, with the engine started by ``app.start()`` (or
    ``register_worker``): blocks until every queue is idle and no Void call is in flight.
    Not on the engine's own event-loop thread (it would wait for itself): ``await
    drain(iii)`` there. Not inside a handler either (``RuntimeError``)."""
    _refuse_in_handler("drain_blocking")
    rt = app.runtime
    if threading.get_ident() == rt.loop_thread:
        raise RuntimeError(
            "drain_blocking() blocks, and this is the engine's event-loop thread: "
            "use `await drain(iii)` in async code"
        )
    portal = rt.portal
    assert portal is not None
    portal.call(lambda: drain(app, timeout=timeout, max_advance_s=max_advance_s))


def _refuse_in_handler(name: str) -> None:
    """``drain`` waits for every handler to return: called inside one, it would wait for
    its caller until ``DrainTimeout``, with a message about something else."""
    invocation = current_invocation()
    if invocation is not None:
        raise RuntimeError(
            f"{name}() waits until every handler has returned, and it was called inside the "
            f"handler of {invocation.function_id!r}, which would wait for itself: call it "
            "from the test"
        )


async def queued_jobs(app: III, queue: str | None = None) -> list[Run]:
    """Runs waiting (ready or delayed) in ``queue`` (or every queue), in enqueue order,
    with their decoded payloads. An unknown queue is a ``ValueError``."""
    return await _runs_in(app, queue, "queued")


async def running_jobs(app: III, queue: str | None = None) -> list[Run]:
    """Runs running now in ``queue`` (or every queue), with their decoded payloads. An
    unknown queue is a ``ValueError``."""
    return await _runs_in(app, queue, "running")


async def held_jobs(app: III, queue: str | None = None) -> list[Run]:
    """Runs held in ``queue`` (or every queue), in enqueue order: jobs whose function is
    not registered here, which wait, unattempted, until it is (their ``status`` reads
    ``queued``, as ``iii.runs.get`` shows them). An unknown queue is a ``ValueError``."""
    return await _runs_in(app, queue, "held")


async def _runs_in(
    app: III, queue: str | None, state: Literal["queued", "running", "held"]
) -> list[Run]:
    rt = app.runtime
    if queue is not None and queue not in rt.runners:
        raise ValueError(f"Queue '{queue}' not found")
    now = rt.clock.now()
    jobs = await rt.store.list_jobs(queue, state, limit=None)
    return [Run.from_job(job, now) for job in jobs]


async def dead_jobs(app: III, queue: str | None = None) -> list[DeadJob]:
    """The dead-letter queue of ``queue``, oldest failure first, or (no ``queue``) those
    of every queue, queue by queue. An unknown queue is a ``ValueError``."""
    names = list(app.runtime.runners) if queue is None else [queue]
    return [job for name in names for job in await app.dlq_list_async(name, limit=1_000_000)]


@attrs.define(frozen=True, kw_only=True)
class HttpResponse:
    """The answer :func:`http_request` got: status, headers (lower-case names; a header
    sent more than once has its values joined with ``", "``) and the body's bytes."""

    status_code: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode()

    def json(self) -> Any:
        """The body parsed as JSON."""
        return jsonlib.loads(self.body)


_NO_JSON: Any = object()


async def http_request(
    app: III,
    method: str,
    path: str,
    *,
    json: Any = _NO_JSON,
    body: bytes | str = b"",
    headers: Mapping[str, str] | None = None,
) -> HttpResponse:
    """Send one request to ``app``'s HTTP triggers (its :attr:`~III.asgi_app`), as a
    client would, with no server: ``path`` is percent-encoded as in a URL and may carry a
    query string (``/orders/a%2Fb?page=2``);
    ``json`` sends a JSON body (with its content type), ``body`` raw bytes or text.
    Await it in the test with ``async with app.running()``; ``drain(app)`` then waits
    for what the handler enqueued."""
    raw = jsonlib.dumps(json).encode() if json is not _NO_JSON else body
    data = raw.encode() if isinstance(raw, str) else raw
    sent = {name.lower(): value for name, value in (headers or {}).items()}
    if json is not _NO_JSON:
        sent.setdefault("content-type", "application/json")
    sent["content-length"] = str(len(data))
    route, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": unquote(route),
        "raw_path": quote(route, safe="/%:@!$&'()*+,;=-._~").encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in sent.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    requests = [{"type": "http.request", "body": data, "more_body": False}]
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return requests.pop() if requests else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app.asgi_app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    got: dict[str, str] = {}
    for name, value in start.get("headers", []):
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        got[key] = f"{got[key]}, {text}" if key in got else text
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return HttpResponse(status_code=start["status"], headers=got, body=content)
