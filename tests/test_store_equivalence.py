"""The two stores side by side: a differential fuzz through the public API.

Two apps, one on the in-memory store and one on a file store, each with its own
``VirtualClock``, get the same random operations: enqueues to a standard and a FIFO queue
(groups, delays, idempotency keys, per-run ``max_attempts``), batch triggers, cancels, time
passing, DLQ redrives and discards (one id, several, all), a function unregistered and
registered again (its jobs held meanwhile), DLQ pages (natively and through iii's
function ids). The handlers (async) do what the payload says, counting how often
they ran for it: succeed, fail N times then succeed, always fail, ``RetryAfter``,
``NonRetryableError``, return a value (or one that is not JSON), enqueue children, cancel
a run (their own or one behind them), look at the queue. After every step both apps must
report the same: each operation's result, every run (``runs.get``), queue statistics,
``queued_jobs`` and ``running_jobs``, the DLQ listings (contents and order), iii's
listings, the clock, the hook events of each run, what handlers saw and got back, and the
handler calls (per FIFO group, and in claim order on the one-worker standard queue).

Normalised: receipt ids (each store generates its own; they are mapped to names in the
order they first appear, which must agree). Every step ends with ``drain`` so that nothing
runs when the apps are compared: what a prefetched job that has not started reads is
documented to differ between the stores (docs/queues.md, "Standard queues": ``running`` on
a file store, ``queued`` in memory), and comparing only settled states keeps it out of the
picture; ``QueueStats.prefetched`` is then zero on both. Where handlers see it (cancelling
or listing the runs behind them), it is normalised (``cancel_view``, ``seen_view``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from iii_embedded import (
    HOOK_EVENTS,
    III,
    Config,
    FunctionRef,
    InvocationError,
    NonRetryableError,
    QueueConfig,
    RetryAfter,
    Run,
    StoreConfig,
    TriggerAction,
    current_invocation,
)
from iii_embedded.testing import VirtualClock, drain_blocking, queued_jobs, running_jobs

QUEUES = {
    # One worker: the order in which its jobs are claimed is observable and must agree.
    "std": QueueConfig(name="std", concurrency=1, max_retries=3, backoff_ms=100),
    "fifo": QueueConfig(
        name="fifo",
        type="fifo",
        message_group_field="g",
        concurrency=2,
        max_retries=2,
        backoff_ms=250,
        max_backoff_ms=400,
    ),
}
GROUPS = ["a", "b", "c"]
KEYS = [None, None, "k0", "k1"]
FUNCTIONS = ["job", "job2"]
"""``job`` has an async handler, ``job2`` a sync one (run in the queue's threads), which
plays the outcomes that need nothing of the app (``Side.sync_handler``). The sync
handler found two differences: a FIFO queue's next due time (the file store woke a drain
for a job behind its group's head) and the start a held job kept in memory; both fixed."""
MISSING = "missing-id"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
children = st.lists(
    st.tuples(
        st.sampled_from(["std", "fifo"]),
        st.sampled_from(GROUPS),
        st.sampled_from([{"mode": "ok"}, {"mode": "fail"}, {"mode": "flaky", "n": 1}]),
        st.sampled_from([0, 0, 200]),
        st.sampled_from(KEYS),
    ),
    min_size=1,
    max_size=2,
)
behaviours = st.one_of(
    st.just({"mode": "ok"}),
    st.builds(lambda v: {"mode": "value", "value": v}, json_values),
    st.just({"mode": "bad_output"}),
    st.builds(lambda c: {"mode": "spawn", "children": c}, children),
    st.builds(lambda d: {"mode": "cancel", "offset": d}, st.sampled_from([0, 1, 2])),
    st.just({"mode": "inspect"}),
    st.builds(lambda n: {"mode": "flaky", "n": n}, st.integers(1, 4)),
    st.just({"mode": "fail"}),
    st.builds(lambda ms: {"mode": "retry_after", "ms": ms}, st.sampled_from([0, 50, 1000])),
    st.just({"mode": "fatal"}),
)


@attrs.define
class Side:
    """One app under test and what its handlers saw."""

    app: III
    clock: VirtualClock
    directory: str | None
    calls: list[tuple[str, str, int, int, float]] = attrs.field(factory=list)
    """(lane, receipt id, payload key, attempt, virtual time) per handler call; the lane
    is the standard queue, or the FIFO queue and group."""
    per_key: dict[int, int] = attrs.field(factory=lambda: defaultdict(int))
    refs: dict[str, FunctionRef] = attrs.field(factory=dict)
    spawned: dict[str, str] = attrs.field(factory=dict)
    """Children enqueued by handlers: ``"c<key>.<call>.<n>"`` -> receipt id."""
    cancels: list[tuple[Any, int, bool, str | None, str]] = attrs.field(factory=list)
    """What handlers' ``runs.cancel`` calls answered: (key, call, cancelled, status
    before, message)."""
    events: list[tuple[str, str]] = attrs.field(factory=list)
    """Hook events: (event, receipt id)."""
    seen: list[tuple[Any, int, list[Run]]] = attrs.field(factory=list)
    """What handlers saw of the standard queue while they ran: (key, call, its runs
    waiting or running behind the handler's own)."""
    names: dict[str, str] = attrs.field(factory=dict)
    """Receipt id -> the name the fuzz gives it (``r0``, ``r1``, ...)."""
    ids: dict[str, str] = attrs.field(factory=dict)
    """The other way round."""

    async def handler(self, data: dict[str, Any]) -> Any:
        """Decide the outcome from the payload and how often this key ran here."""
        inv = current_invocation()
        assert inv is not None and inv.receipt_id is not None
        key = data["key"]
        self.per_key[key] += 1
        call = self.per_key[key]
        lane = f"{inv.queue}/{inv.group}" if inv.group is not None else str(inv.queue)
        self.calls.append((lane, inv.receipt_id, key, inv.attempt, self.clock.now()))
        mode = data["mode"]
        if mode == "value":
            return data["value"]
        if mode == "spawn":
            for n, (queue, group, behaviour, delay_ms, idem) in enumerate(data["children"]):
                child = f"c{key}.{call}.{n}"
                payload = {"key": child, **behaviour, "g": group}
                action = TriggerAction.Enqueue(queue=queue, delay_ms=delay_ms, idempotency_key=idem)
                receipt = await self.app.trigger_async("job", payload, action=action)
                self.spawned[child] = receipt["messageReceiptId"]
            return {"key": key, "spawned": len(data["children"])}
        if mode == "inspect":
            # The runs behind this one that have not started. Not those that ran: a
            # handler that returned reads ``running`` until its queue writes its outcome,
            # which races with the next job's start (in memory a prefetched job starts
            # before the write). Nor this one: on a file store its ``started_at`` is
            # written a little after its start (docs/design.md, "Prefetch"), in memory
            # at once.
            runs = [*await queued_jobs(self.app, "std"), *await running_jobs(self.app, "std")]
            waiting = [
                r
                for r in runs
                if _after(r.payload["key"], key)
                and not (r.status == "running" and r.started_at is not None)
            ]
            self.seen.append((key, call, waiting))
            return {"key": key}
        if mode == "cancel" and isinstance(key, int):
            # The run enqueued ``offset`` keys after this one (itself for 0), found through
            # the inspection API: waiting (ready, delayed, prefetched) or running. (Not
            # one before it: that one may have returned and read ``running`` still, as
            # said above.)
            target = key + data["offset"]
            runs = [*await queued_jobs(self.app), *await running_jobs(self.app)]
            ids = [r.id for r in runs if _same_lane(r.payload, target, data)]
            result = await self.app.runs.cancel_async(ids[0] if ids else MISSING)
            self.cancels.append((key, call, result.cancelled, result.status_before, result.message))
            await anyio.lowlevel.checkpoint()  # a cancelled run stops here
            return {"key": key, "cancelled": result.cancelled}
        return self.plain(key, data)

    def plain(self, key: Any, data: dict[str, Any]) -> Any:
        """The outcomes that need nothing of the app."""
        mode = data["mode"]
        if mode == "bad_output":
            return {1, 2}  # not JSON: stored as its repr
        if mode == "flaky" and self.per_key[key] <= data["n"]:
            raise RuntimeError(f"flaky {key}")
        if mode == "fail":
            raise ValueError(f"always fails {key}")
        if mode == "retry_after" and self.per_key[key] == 1:
            raise RetryAfter(data["ms"])
        if mode == "fatal":
            raise NonRetryableError(f"fatal {key}")
        return {"key": key, "calls": self.per_key[key]}

    def sync_handler(self, data: dict[str, Any]) -> Any:
        """``job2``'s handler, run in a thread: as :meth:`handler` for the outcomes that
        need nothing of the app; the others (spawn, inspect, cancel, value) return a
        plain value."""
        inv = current_invocation()
        assert inv is not None and inv.receipt_id is not None
        key = data["key"]
        self.per_key[key] += 1
        lane = f"{inv.queue}/{inv.group}" if inv.group is not None else str(inv.queue)
        self.calls.append((lane, inv.receipt_id, key, inv.attempt, self.clock.now()))
        if data["mode"] in ("value", "spawn", "inspect", "cancel"):
            return {"key": key, "calls": self.per_key[key]}
        return self.plain(key, data)

    def register(self, function_id: str) -> None:
        """Register ``function_id`` with this side's handler (``job2``: the sync one)."""
        handler = self.sync_handler if function_id == "job2" else self.handler
        self.refs[function_id] = self.app.register_function(function_id, handler)


def _same_lane(payload: dict[str, Any], key: Any, data: dict[str, Any]) -> bool:
    """Whether ``payload`` is the fuzz's run ``key`` of the lane (FIFO group, or the
    standard queue) that ``data``'s handler runs in."""
    return bool(payload["key"] == key and payload.get("g") == data.get("g"))


def _after(other: Any, key: Any) -> bool:
    """Whether payload key ``other`` was enqueued after ``key`` (by the fuzz, or by a
    handler: a child's key is a string)."""
    return not isinstance(other, int) or other > key


def make_side(file_based: bool) -> Side:
    # From zero, as a test may well start it: a time of 0.0 must count as a time.
    clock = VirtualClock(0.0)
    directory = tempfile.mkdtemp(prefix="iii-equiv-") if file_based else None
    store = (
        StoreConfig(store_method="file_based", file_path=directory)
        if directory is not None
        else StoreConfig()
    )
    app = III(Config(queues=dict(QUEUES), store=store), clock=clock, shutdown_grace_ms=0)
    side = Side(app=app, clock=clock, directory=directory)
    for event in sorted(HOOK_EVENTS):
        app.on(event, lambda job, _event=event, **_: side.events.append((_event, job.id)))
    for function_id in FUNCTIONS:
        side.register(function_id)
    app.start()
    return side


def outcome(call: Any) -> tuple[str, Any]:
    """Run ``call()``: ``("ok", result)`` or ``("error", (type, code, message))``."""
    try:
        return "ok", call()
    except InvocationError as exc:
        return "error", ("InvocationError", exc.code, exc.message)
    except ValueError as exc:
        return "error", (type(exc).__name__, None, str(exc))


class StoreEquivalence(RuleBasedStateMachine):
    """Drive a memory app and a file app in lockstep and compare what they report."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = make_side(file_based=False)
        self.file = make_side(file_based=True)
        self.sides = (self.mem, self.file)
        self.next_key = 0
        self.next_name = 0
        self.unregistered: set[str] = set()

    # --- naming -----------------------------------------------------------------------

    def name_pair(self, mem_id: str, file_id: str, name: str | None = None) -> str:
        """The fuzz's name of a run the two apps returned (new ids get a new name)."""
        mem_name, file_name = self.mem.names.get(mem_id), self.file.names.get(file_id)
        if mem_name is None and file_name is None:
            if name is None:
                name = f"r{self.next_name}"
                self.next_name += 1
            for side, run_id in ((self.mem, mem_id), (self.file, file_id)):
                side.names[run_id] = name
                side.ids[name] = run_id
            return name
        assert mem_name == file_name, (mem_id, mem_name, file_id, file_name)
        assert mem_name is not None
        return mem_name

    @staticmethod
    def cancel_view(
        answer: tuple[Any, int, bool, str | None, str],
    ) -> tuple[Any, int, bool, str | None, str]:
        """A handler's cancel answer. A prefetched run that has not started reads
        ``queued`` in memory and ``running`` on a file store (documented: docs/queues.md,
        "Standard queues"), so cancelling it answers differently: named alike here."""
        key, call, cancelled, before, message = answer
        if (before, message) == ("running", "running; asked to stop"):
            before, message = "queued", "cancelled while queued"
        return key, call, cancelled, before, message

    def seen_view(self, side: Side, key: Any, call: int, runs: list[Run]) -> Any:
        """What a handler saw, with prefetching normalised away: a prefetched run that has
        not started reads ``running`` (no ``started_at``, its attempt counted) on a file
        store and ``queued`` in memory (docs/queues.md)."""
        view = []
        for run in runs:
            run = attrs.evolve(run, id=self.named(side, run.id))
            if run.status == "running" and run.started_at is None:
                run = attrs.evolve(run, status="queued", attempts=run.attempts - 1)
            view.append(run)
        view.sort(key=lambda r: (r.status, r.created_at, str(r.payload["key"])))
        return key, call, view

    @staticmethod
    def named(side: Side, run_id: str) -> str:
        return side.names.get(run_id, f"<unnamed {run_id}>")

    def both(self, fn: Any) -> tuple[Any, Any]:
        return fn(self.mem), fn(self.file)

    def settle(self, max_advance_s: float = 0.0) -> None:
        for side in self.sides:
            drain_blocking(side.app, max_advance_s=max_advance_s)
        assert set(self.mem.spawned) == set(self.file.spawned)
        for child in sorted(self.mem.spawned):
            self.name_pair(self.mem.spawned[child], self.file.spawned[child], child)
        mem, file = ([self.cancel_view(c) for c in s.cancels] for s in self.sides)
        assert mem == file
        mem, file = ([self.seen_view(s, *seen) for seen in s.seen] for s in self.sides)
        assert mem == file
        # Each run's events in order (runs of different FIFO groups interleave freely).
        mem_events, file_events = (
            sorted(
                ((self.named(s, run_id), n, event) for n, (event, run_id) in enumerate(s.events)),
                key=lambda e: (e[0], e[1]),
            )
            for s in self.sides
        )
        assert [(n, e) for n, _, e in mem_events] == [(n, e) for n, _, e in file_events]

    def payload(self, queue: str, group: str, behaviour: dict[str, Any]) -> dict[str, Any]:
        key = self.next_key
        self.next_key += 1
        if queue == "fifo" and behaviour["mode"] in ("spawn", "inspect"):
            # Only from the one-worker queue: handlers of two FIFO groups run side by
            # side, and what they enqueue or see would race. (They cancel runs of their
            # own group only, which cannot run meanwhile.)
            behaviour = {"mode": "ok"}
        payload: dict[str, Any] = {"key": key, **behaviour}
        if queue == "fifo":
            payload["g"] = group
        return payload

    # --- operations -------------------------------------------------------------------

    @rule(
        function_id=st.sampled_from(FUNCTIONS),
        queue=st.sampled_from(["std", "fifo"]),
        group=st.sampled_from(GROUPS),
        behaviour=behaviours,
        delay_ms=st.sampled_from([0, 0, 0, 100, 700]),
        idempotency_key=st.sampled_from(KEYS),
        max_attempts=st.sampled_from([None, None, 1, 4]),
    )
    def enqueue(
        self,
        function_id: str,
        queue: str,
        group: str,
        behaviour: dict[str, Any],
        delay_ms: int,
        idempotency_key: str | None,
        max_attempts: int | None,
    ) -> None:
        payload = self.payload(queue, group, behaviour)
        action = TriggerAction.Enqueue(
            queue=queue,
            delay_ms=delay_ms,
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
        )
        got = self.both(
            lambda s: outcome(lambda: s.app.trigger(function_id, payload, action=action))
        )
        self.compare_receipts(got)
        self.settle()

    def compare_receipts(self, got: tuple[Any, Any]) -> None:
        (mem_kind, mem_value), (file_kind, file_value) = got
        assert mem_kind == file_kind, got
        if mem_kind == "error":
            assert mem_value == file_value
            return
        self.name_pair(mem_value["messageReceiptId"], file_value["messageReceiptId"])

    @rule(
        function_id=st.sampled_from(FUNCTIONS),
        queue=st.sampled_from(["std", "fifo"]),
        items=st.lists(
            st.tuples(st.sampled_from(GROUPS), behaviours, st.sampled_from(KEYS)),
            min_size=1,
            max_size=5,
        ),
        delay_ms=st.sampled_from([0, 0, 300]),
    )
    def batch(
        self,
        function_id: str,
        queue: str,
        items: list[tuple[str, dict[str, Any], str | None]],
        delay_ms: int,
    ) -> None:
        payloads = [self.payload(queue, group, behaviour) for group, behaviour, _ in items]
        keys = [key for _, _, key in items]
        mem, file = self.both(
            lambda s: outcome(
                lambda: s.app.batch_trigger(
                    function_id,
                    payloads,
                    queue=queue,
                    delay_ms=delay_ms,
                    idempotency_keys=keys if any(keys) else None,
                )
            )
        )
        assert mem[0] == file[0], (mem, file)
        if mem[0] == "error":
            assert mem[1] == file[1]
        else:
            assert len(mem[1]) == len(file[1])
            for mem_id, file_id in zip(mem[1], file[1], strict=True):
                self.name_pair(mem_id, file_id)
        self.settle()

    @precondition(lambda self: self.next_name > 0)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([*sorted(self.mem.ids), MISSING]))
        got = self.both(lambda s: s.app.runs.cancel(s.ids.get(name, MISSING)))
        mem, file = (
            (r.cancelled, r.status_before, r.message, self.named(s, r.id))
            for s, r in zip(self.sides, got, strict=True)
        )
        assert mem == file
        self.settle()

    @rule(seconds=st.sampled_from([0.1, 0.3, 1.0, 5.0]))
    def let_time_pass(self, seconds: float) -> None:
        """Drain with the clock allowed ``seconds`` ahead (to the due times on the way)."""
        self.settle(max_advance_s=seconds)

    @rule(seconds=st.sampled_from([0.05, 0.2, 2.0]))
    def jump_clock(self, seconds: float) -> None:
        """Move the clock past due times at once, then drain without advancing it."""
        for side in self.sides:
            side.clock.advance(seconds)
        self.settle()

    @rule(queue=st.sampled_from(["std", "fifo"]), data=st.data())
    def redrive(self, queue: str, data: st.DataObject) -> None:
        self.on_dead(queue, data, lambda app: app.dlq_redrive)

    @rule(queue=st.sampled_from(["std", "fifo"]), data=st.data())
    def discard(self, queue: str, data: st.DataObject) -> None:
        self.on_dead(queue, data, lambda app: app.dlq_discard)

    def on_dead(self, queue: str, data: st.DataObject, verb: Callable[[III], Any]) -> None:
        """Redrive or discard (``verb`` picks the app's method) the same dead runs of
        ``queue`` on both sides: the same runs must be moved."""
        chosen = self.pick_dead(queue, data)
        got = self.both(
            lambda s: verb(s.app)(
                queue, None if chosen is None else [s.ids.get(n, MISSING) for n in chosen]
            )
        )
        mem, file = (
            [self.named(s, i) for i in ids] for s, ids in zip(self.sides, got, strict=True)
        )
        assert mem == file
        self.settle()

    def pick_dead(self, queue: str, data: st.DataObject) -> list[str] | None:
        """None (all), or some names: dead ones of ``queue``, and maybe a stranger."""
        dead = [self.named(self.mem, d.id) for d in self.mem.app.dlq_list(queue, limit=1000)]
        return data.draw(
            st.none()
            | st.lists(st.sampled_from([*dead, *sorted(self.mem.ids)[:3], MISSING]), max_size=4)
        )

    @rule(function_id=st.sampled_from(FUNCTIONS))
    def toggle_function(self, function_id: str) -> None:
        """Unregister a function (its queued jobs are held), or register it again."""
        if function_id in self.unregistered:
            self.unregistered.discard(function_id)
            for side in self.sides:
                side.register(function_id)
        else:
            self.unregistered.add(function_id)
            for side in self.sides:
                side.refs[function_id].unregister()
        self.settle()

    @rule(
        queue=st.sampled_from(["std", "fifo"]),
        offset=st.integers(0, 4),
        limit=st.integers(0, 4),
    )
    def dlq_page(self, queue: str, offset: int, limit: int) -> None:
        """A page of a DLQ, natively and through iii's ``engine::queue::dlq_messages``."""
        mem, file = (
            [self.named(s, d.id) for d in s.app.dlq_list(queue, offset=offset, limit=limit)]
            for s in self.sides
        )
        assert mem == file
        request = {"queue": queue, "offset": offset, "limit": limit}
        mem_iii, file_iii = (
            [
                {**m, "id": self.named(s, m["id"])}
                for m in s.app.trigger("engine::queue::dlq_messages", request)
            ]
            for s in self.sides
        )
        assert mem_iii == file_iii

    @rule()
    def iii_listings(self) -> None:
        """iii's queue listings and statistics, through ``trigger``."""
        for function_id, payload in (
            ("engine::queue::dlq_topics", {}),
            ("engine::queue::list_topics", {}),
            ("engine::queue::topic_stats", {"queue": "std"}),
            ("engine::queue::topic_stats", {"queue": "fifo"}),
        ):
            mem, file = (s.app.trigger(function_id, payload) for s in self.sides)
            assert mem == file, function_id

    # --- comparisons ------------------------------------------------------------------

    @invariant()
    def same_clock(self) -> None:
        assert self.mem.clock.now() == self.file.clock.now()

    @invariant()
    def same_runs(self) -> None:
        for name in sorted(self.mem.ids):
            mem, file = (self.run_view(s, s.app.runs.get(s.ids[name])) for s in self.sides)
            assert mem == file, name

    def run_view(self, side: Side, run: Any) -> Any:
        if run is None:
            return None
        return attrs.evolve(run, id=self.named(side, run.id))

    @invariant()
    def same_stats(self) -> None:
        mem, file = self.both(lambda s: s.app.stats())
        assert mem == file

    @invariant()
    def same_listings(self) -> None:
        for queue in (None, "std", "fifo"):
            for listing in (queued_jobs, running_jobs):
                mem, file = (
                    [self.run_view(s, r) for r in self.on_loop(s, listing, queue)]
                    for s in self.sides
                )
                assert mem == file, (listing.__name__, queue)
        for queue in ("std", "fifo"):
            mem, file = (
                [attrs.evolve(d, id=self.named(s, d.id)) for d in s.app.dlq_list(queue, limit=1000)]
                for s in self.sides
            )
            assert mem == file, queue

    @staticmethod
    def on_loop(side: Side, fn: Any, *args: Any) -> Any:
        portal = side.app.runtime.portal
        assert portal is not None
        return portal.call(fn, side.app, *args)

    @invariant()
    def same_calls(self) -> None:
        mem, file = (self.calls_by_lane(s) for s in self.sides)
        assert mem == file

    def calls_by_lane(self, side: Side) -> dict[str, list[tuple[str, int, int, float]]]:
        """Handler calls per standard queue and per FIFO group, in call order."""
        lanes: dict[str, list[tuple[str, int, int, float]]] = defaultdict(list)
        for lane, run_id, key, attempt, at in side.calls:
            lanes[lane].append((self.named(side, run_id), key, attempt, at))
        return dict(lanes)

    def teardown(self) -> None:
        for side in self.sides:
            side.app.shutdown()
            if side.directory is not None:
                shutil.rmtree(side.directory, ignore_errors=True)


TestStoreEquivalence = StoreEquivalence.TestCase
TestStoreEquivalence.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
