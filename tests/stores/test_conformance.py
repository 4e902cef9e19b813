"""One conformance suite for every store: the rules of ``_stores/_base.py``, checked against
the in-memory store and the SQLite store alike, so they cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

from iii_embedded._stores import (
    CronFire,
    ErrorInfo,
    NewJob,
    Outcome,
    QueueCounts,
    Renewal,
    Store,
    _memory,
    completed_outcome,
)
from iii_embedded._stores._memory import MemoryStore
from iii_embedded._stores._sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

T0 = 1_000.0
OWNER = "test-host:1:abc"
ERR = ErrorInfo(type="ValueError", message="boom", traceback="Traceback ...")


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "store")
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


def job(
    job_id: str,
    *,
    queue: str = "q",
    group: str | None = None,
    at: float = T0,
    function_id: str = "fn",
    key: str | None = None,
    max_attempts: int = 3,
    payload: Any = None,
) -> NewJob:
    return NewJob(
        id=job_id,
        queue=queue,
        function_id=function_id,
        payload=json.dumps(payload if payload is not None else {"id": job_id}),
        group=json.dumps(group) if group is not None else None,
        created_at=T0,
        available_at=at,
        max_attempts=max_attempts,
        idempotency_key=key,
    )


async def claim(
    store: Store,
    queue: str = "q",
    *,
    fifo: bool = False,
    limit: int = 10,
    now: float = T0,
    owner: str = OWNER,
) -> list[str]:
    jobs = await store.claim(
        queue, fifo=fifo, limit=limit, now=now, owner=owner, lease_until=now + 30
    )
    return [j.id for j in jobs]


def done(
    job_id: str, attempt: int = 1, *, at: float = T0, owner: str = OWNER, output: str = '"ok"'
) -> Outcome:
    return Outcome(
        job_id=job_id, kind="completed", owner=owner, attempt=attempt, at=at, output=output
    )


def retry(job_id: str, attempt: int, available_at: float, *, at: float = T0) -> Outcome:
    return Outcome(
        job_id=job_id,
        kind="retry",
        owner=OWNER,
        attempt=attempt,
        at=at,
        error=ERR,
        available_at=available_at,
    )


async def state_of(store: Store, job_id: str) -> tuple[str, int]:
    j = await store.get(job_id)
    assert j is not None
    return j.state, j.attempts


# --- enqueue -------------------------------------------------------------------------------


async def test_enqueue_stores_jobs_and_returns_their_ids_in_order(store: Store) -> None:
    assert await store.enqueue([job("a"), job("b"), job("c")]) == ["a", "b", "c"]
    stored = await store.list_jobs("q")
    assert [(j.id, j.state, j.attempts, json.loads(j.payload)) for j in stored] == [
        ("a", "queued", 0, {"id": "a"}),
        ("b", "queued", 0, {"id": "b"}),
        ("c", "queued", 0, {"id": "c"}),
    ]
    assert stored[0].seq < stored[1].seq < stored[2].seq


async def test_a_call_made_while_an_enqueue_is_in_flight_sees_its_jobs(store: Store) -> None:
    """Store calls take effect in the order they were made, even before the enqueue has
    returned: the runtime wakes a queue's dispatcher before the enqueue commits, and its
    claim must find the job."""
    async with anyio.create_task_group() as tg:
        receipts: list[list[str]] = []

        async def produce() -> None:
            receipts.append(await store.enqueue([job("a"), job("b")]))

        tg.start_soon(produce)
        await anyio.wait_all_tasks_blocked()  # the enqueue has started (or finished)
        assert await claim(store) == ["a", "b"]
    assert receipts == [["a", "b"]]


async def test_a_claim_made_before_enqueues_of_the_same_turn_does_not_see_them(
    store: Store,
) -> None:
    """The other way round: enqueues made after a claim, in the same turn of the loop (so
    in the same transaction of the file store), take effect after it, and the claim does
    not take their jobs, however the store groups the enqueues."""
    results: dict[str, Any] = {}

    async def claiming() -> None:
        results["claim"] = await claim(store)

    async def producing(name: str) -> None:
        results[name] = await store.enqueue([job(name)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(claiming)  # these three run, in this order, in the next turn
        tg.start_soon(producing, "a")
        tg.start_soon(producing, "b")
    assert results == {"claim": [], "a": ["a"], "b": ["b"]}
    assert await claim(store) == ["a", "b"]


async def test_completions_that_carry_the_jobs_seq_complete_those_jobs(store: Store) -> None:
    """The runtime sends each completion with its job's ``seq`` (the file store finds the
    row by it); the result is the same as a completion by id alone."""
    await store.enqueue([job("a"), job("b"), job("c")])
    claimed = await store.claim("q", fifo=False, limit=2, now=T0, owner=OWNER, lease_until=T0 + 30)
    assert [j.id for j in claimed] == ["a", "b"]
    await store.finish(
        [completed_outcome(j.id, OWNER, j.attempts, T0 + 1, f'"{j.id}!"', j.seq) for j in claimed]
    )
    jobs = {j.id: j for j in await store.list_jobs("q")}
    assert [(i, jobs[i].state, jobs[i].output, jobs[i].finished_at) for i in "abc"] == [
        ("a", "completed", '"a!"', T0 + 1),
        ("b", "completed", '"b!"', T0 + 1),
        ("c", "queued", None, None),
    ]


async def test_a_batch_is_atomic(store: Store) -> None:
    await store.enqueue([job("a")])
    with pytest.raises(Exception):  # noqa: B017 - each store names its own error
        await store.enqueue([job("b"), job("a")])  # "a" exists: the whole batch fails
    assert [j.id for j in await store.list_jobs()] == ["a"]


async def test_idempotency_key_returns_the_live_job_and_stores_nothing(store: Store) -> None:
    assert await store.enqueue([job("a", key="k")]) == ["a"]
    assert await store.enqueue([job("b", key="k")]) == ["a"]
    assert await store.enqueue([job("c", key="k", function_id="other")]) == ["c"]
    assert await store.enqueue([job("d", key="k2"), job("e", key="k2")]) == ["d", "d"]
    assert sorted(j.id for j in await store.list_jobs()) == ["a", "c", "d"]


async def test_a_dead_or_cancelled_job_releases_its_key(store: Store) -> None:
    await store.enqueue([job("a", key="k", max_attempts=1), job("b", key="k2")])
    await claim(store)
    await store.finish([Outcome(job_id="a", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)])
    assert await store.enqueue([job("a2", key="k")]) == ["a2"]
    await store.cancel("b", T0)  # b is running: cancel only flags it
    assert await store.enqueue([job("b2", key="k2")]) == ["b"]


async def test_a_redriven_run_whose_key_was_taken_meanwhile_gives_it_up_for_good(
    store: Store,
) -> None:
    """Dead with key k, then a new run takes k, then the dead run is redriven: the new run
    keeps k, and the redriven one has no key, also once the new run has ended (a later
    enqueue with k is a new run, not the redriven one). Until 2026-12-03 the in-memory
    store gave the key back to the redriven run at its next redrive."""
    await store.enqueue([job("d1", key="k", max_attempts=1)])
    await claim(store)
    await store.finish(
        [Outcome(job_id="d1", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)]
    )
    assert await store.enqueue([job("d2", key="k", at=T0 + 100)]) == ["d2"]
    assert await store.redrive("q", ["d1"], T0) == ["d1"]
    redriven = await store.get("d1")
    assert redriven is not None and redriven.idempotency_key is None
    assert await store.enqueue([job("d3", key="k")]) == ["d2"]
    await claim(store, limit=1)
    await store.finish(
        [Outcome(job_id="d1", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)]
    )
    await store.cancel("d2", T0)
    assert await store.redrive("q", ["d1"], T0) == ["d1"]
    assert await store.enqueue([job("d4", key="k")]) == ["d4"]


async def test_key_holders_are_the_runs_an_enqueue_with_the_key_would_return(
    store: Store,
) -> None:
    await store.enqueue(
        [
            job("live", key="k1"),
            job("other-fn", key="k1", function_id="other"),
            job("gone", key="k2", max_attempts=1),
            job("plain"),
        ]
    )
    await claim(store, limit=10)
    await store.finish(
        [Outcome(job_id="gone", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)]
    )
    holders = await store.key_holders("fn", ["k1", "k2", "k1", "k3"])
    assert [(j.id, j.idempotency_key) for j in holders] == [("live", "k1")]
    assert await store.key_holders("fn", []) == []


async def test_states_reads_many_runs_at_once_as_get_shows_them(store: Store) -> None:
    await store.enqueue([job(c) for c in "abcd"])
    claimed = await store.claim(
        "q", fifo=False, limit=3, now=T0, owner=OWNER, lease_until=T0 + 30, start=2
    )
    assert [j.id for j in claimed] == ["a", "b", "c"]
    await store.finish([done("a")])
    ids = ["a", "b", "c", "d", "missing", "a"]
    shown = {i: j.state for i in ids if (j := await store.get(i)) is not None}
    assert await store.states(ids) == shown
    # c is prefetched, not started: leased on the file store, as before its claim in memory.
    assert shown == {
        "a": "completed",
        "b": "running",
        "c": "running" if store.shared else "queued",
        "d": "queued",
    }
    assert await store.states([]) == {}
    many = [f"id-{i}" for i in range(1_200)]  # more than one statement's worth of ids
    await store.enqueue([job(i) for i in many])
    assert await store.states(many) == dict.fromkeys(many, "queued")


async def test_a_completed_job_keeps_its_key_until_pruned(store: Store) -> None:
    await store.enqueue([job("a", key="k")])
    await claim(store)
    await store.finish([done("a", at=T0 + 1)])
    assert await store.enqueue([job("b", key="k")]) == ["a"]
    assert await store.prune(T0 + 2) == 1
    assert await store.enqueue([job("c", key="k")]) == ["c"]


# --- claiming standard queues ----------------------------------------------------------


async def test_claims_oldest_available_first_and_increments_attempts(store: Store) -> None:
    await store.enqueue([job("late", at=T0 + 5), job("a"), job("b"), job("early", at=T0 - 5)])
    jobs = await store.claim("q", fifo=False, limit=2, now=T0, owner=OWNER, lease_until=T0 + 30)
    assert [
        (j.id, j.state, j.attempts, j.started_at, j.lease_owner, j.lease_until) for j in jobs
    ] == [
        ("early", "running", 1, T0, OWNER, T0 + 30),
        ("a", "running", 1, T0, OWNER, T0 + 30),
    ]
    assert await claim(store) == ["b"]
    assert await claim(store, now=T0 + 5) == ["late"]
    assert await claim(store, now=T0 + 100) == []


async def test_claims_only_the_named_queue(store: Store) -> None:
    await store.enqueue([job("a", queue="q1"), job("b", queue="q2")])
    assert await claim(store, "q2") == ["b"]
    assert await claim(store, "nope") == []


async def test_finish_is_ignored_for_a_wrong_owner_or_attempt(store: Store) -> None:
    await store.enqueue([job("a")])
    await claim(store)
    await store.finish([done("a", owner="someone-else"), done("a", attempt=2)])
    assert await state_of(store, "a") == ("running", 1)
    await store.finish([done("a")])
    completed = await store.get("a")
    assert completed is not None
    assert (completed.state, completed.output, completed.finished_at) == ("completed", '"ok"', T0)


async def test_retry_sets_error_and_availability(store: Store) -> None:
    await store.enqueue([job("a")])
    await claim(store)
    await store.finish([retry("a", 1, T0 + 10, at=T0 + 1)])
    j = await store.get("a")
    assert j is not None
    assert (j.state, j.attempts, j.available_at, j.error, j.first_failed_at, j.last_failed_at) == (
        "queued",
        1,
        T0 + 10,
        ERR,
        T0 + 1,
        T0 + 1,
    )
    assert await claim(store, now=T0 + 9) == []
    assert await store.next_available_at("q", T0 + 9) == T0 + 10
    assert await claim(store, now=T0 + 10) == ["a"]
    await store.finish([retry("a", 2, T0 + 20, at=T0 + 11)])
    j = await store.get("a")
    assert j is not None and (j.first_failed_at, j.last_failed_at, j.attempts) == (
        T0 + 1,
        T0 + 11,
        2,
    )


async def test_dead_moves_to_the_dlq_with_the_error(store: Store) -> None:
    await store.enqueue([job("a"), job("b")])
    await claim(store)
    for job_id in ("b", "a"):
        await store.finish(
            [Outcome(job_id=job_id, kind="dead", owner=OWNER, attempt=1, at=T0 + 2, error=ERR)]
        )
    dead = await store.list_dead("q")
    assert [(d.id, d.state, d.error, d.last_failed_at) for d in dead] == [
        ("b", "dead", ERR, T0 + 2),
        ("a", "dead", ERR, T0 + 2),
    ]
    assert [d.id for d in await store.list_dead("q", offset=1, limit=5)] == ["a"]
    assert [d.id for d in await store.list_dead("q", offset=0, limit=1)] == ["b"]
    assert await store.dead_ids("q") == ["b", "a"]
    assert await store.dead_ids("other") == []
    assert (await store.counts(T0))["q"].dead == 2


async def test_released_and_held_give_the_attempt_back(store: Store) -> None:
    await store.enqueue([job("a"), job("b", function_id="unknown")])
    await claim(store)
    await store.finish(
        [
            Outcome(job_id="a", kind="released", owner=OWNER, attempt=1, at=T0),
            Outcome(job_id="b", kind="held", owner=OWNER, attempt=1, at=T0),
        ]
    )
    assert await state_of(store, "a") == ("queued", 0)
    assert await state_of(store, "b") == ("held", 0)
    # Neither started: the start their claim marked is taken back with the attempt.
    assert [(await store.get(i)).started_at for i in ("a", "b")] == [None, None]  # type: ignore[union-attr]
    assert await claim(store) == ["a"]
    assert await store.release_held(["unknown"]) == 1
    assert await claim(store) == ["b"]


async def test_release_held_can_keep_to_some_queues(store: Store) -> None:
    await store.enqueue([job("a", function_id="f"), job("b", queue="r", function_id="f")])
    for queue, job_id in (("q", "a"), ("r", "b")):
        await store.claim(queue, fifo=False, limit=1, now=T0, owner=OWNER, lease_until=T0 + 30)
        await store.finish([Outcome(job_id=job_id, kind="held", owner=OWNER, attempt=1, at=T0)])
    assert await store.release_held(["f"], ["r", "elsewhere"]) == 1
    assert await store.release_held(["f"], []) == 0
    assert (await state_of(store, "a"), await state_of(store, "b")) == (
        ("held", 0),
        ("queued", 0),
    )


async def test_a_standard_claim_leaves_jobs_of_fifo_groups_alone(store: Store) -> None:
    # Jobs of groups in a queue a process claims as standard: stored by a process that
    # configures the queue FIFO. Only FIFO claims take them, in order, one at a time.
    # (The file store's standard claim took them: two of a group failed the claim, and
    # one ran outside its group's bookkeeping, so the group never ran again in FIFO.)
    await store.enqueue([job("a1", group="A"), job("p1"), job("a2", group="A"), job("p2")])
    assert await claim(store, fifo=False) == ["p1", "p2"]
    assert await claim(store, fifo=True) == ["a1"]


async def test_mistyped_queues_are_those_whose_live_jobs_are_of_the_other_type(
    store: Store,
) -> None:
    await store.enqueue(
        [
            job("f1", queue="fifo", group="A"),
            job("f2", queue="fifo"),  # no group: stored while "fifo" was standard
            job("s1", queue="std", group="A"),  # a group: stored while "std" was FIFO
            job("ok", queue="fine", group="A"),
            job("done", queue="finished", group="A"),
        ]
    )
    assert await store.mistyped_queues(["fifo", "fine"], ["std"]) == ["fifo", "std"]
    assert await claim(store, queue="finished", fifo=True) == ["done"]
    await store.finish([completed_outcome("done", OWNER, 1, T0, "null")])
    # Only live jobs count: a finished one of the other type is history.
    assert await store.mistyped_queues([], ["finished"]) == []
    assert await claim(store, queue="std", fifo=True) == ["s1"]
    assert await store.mistyped_queues([], ["std"]) == ["std"]  # a running job counts too


async def test_recover_returns_expired_leases_or_buries_exhausted_jobs(store: Store) -> None:
    await store.enqueue([job("a"), job("b", max_attempts=1)])
    await claim(store)
    assert await store.recover(T0 + 29) == []
    moved = {j.id: j for j in await store.recover(T0 + 31)}
    assert set(moved) == {"a", "b"}
    assert (moved["a"].state, moved["a"].attempts, moved["a"].available_at) == (
        "queued",
        1,
        T0 + 31,
    )
    assert moved["a"].error is not None and moved["a"].error.type == "LeaseExpired"
    assert moved["b"].state == "dead"
    assert await claim(store, now=T0 + 31) == ["a"]


async def test_a_claim_stamps_only_the_jobs_that_start_at_once(store: Store) -> None:
    await store.enqueue([job(c) for c in "abcde"])
    claimed = await store.claim(
        "q", fifo=False, limit=4, now=T0 + 1, owner=OWNER, lease_until=T0 + 31, start=2
    )
    assert [(j.id, j.attempts, j.started_at) for j in claimed] == [
        ("a", 1, T0 + 1),
        ("b", 1, T0 + 1),
        ("c", 1, None),
        ("d", 1, None),
    ]
    stored = [await store.get(c) for c in "abcde"]
    # Prefetched and not started: leased on the file store (other processes must not take
    # it); in memory, where no one else can, it reads as before its claim.
    waiting = ("running", 1, None) if store.shared else ("queued", 0, None)
    assert [(j.state, j.attempts, j.started_at) for j in stored if j is not None] == [
        ("running", 1, T0 + 1),
        ("running", 1, T0 + 1),
        waiting,
        waiting,
        ("queued", 0, None),
    ]
    assert store.mark_started("c", OWNER, 1, T0 + 2) is not store.shared
    started = await store.get("c")
    assert started is not None
    assert (started.state, started.attempts, started.started_at) == (
        ("running", 1, None) if store.shared else ("running", 1, T0 + 2)
    )
    # start=0: everything claimed is prefetched.
    [e] = await store.claim(
        "q", fifo=False, limit=4, now=T0 + 1, owner=OWNER, lease_until=T0 + 31, start=0
    )
    assert (e.id, e.started_at) == ("e", None)


async def test_outcomes_record_when_a_prefetched_job_started(store: Store) -> None:
    await store.enqueue([job(c) for c in "abc"])
    await store.claim("q", fifo=False, limit=3, now=T0, owner=OWNER, lease_until=T0 + 30, start=1)
    started = Outcome(job_id="b", kind="started", owner=OWNER, attempt=1, at=T0 + 2)
    late = Outcome(job_id="b", kind="started", owner=OWNER, attempt=1, at=T0 + 9)
    await store.finish([started, late, completed_outcome("c", OWNER, 1, T0 + 5, "1", None, T0 + 4)])
    await store.finish([completed_outcome("a", OWNER, 1, T0 + 6, "1", None, T0 + 3)])
    jobs = {c: await store.get(c) for c in "abc"}
    assert {c: (j.state, j.started_at) for c, j in jobs.items() if j is not None} == {
        "a": ("completed", T0),  # stamped by its claim: the outcome does not move it
        "b": ("running", T0 + 2),  # still leased, still running; the first start counts
        "c": ("completed", T0 + 4),
    }
    assert await store.renew(OWNER, ["b"], T0 + 60) == Renewal()
    j = await store.get("b")
    assert j is not None and j.lease_until == T0 + 60


async def test_recover_gives_a_never_started_job_its_attempt_back_once_in_a_row(
    store: Store,
) -> None:
    await store.enqueue([job("run", max_attempts=1), job("pre", max_attempts=1), job("marked")])
    await store.claim("q", fifo=False, limit=3, now=T0, owner=OWNER, lease_until=T0 + 30, start=1)
    await store.finish([Outcome(job_id="marked", kind="started", owner=OWNER, attempt=1, at=T0)])
    moved = {j.id: j for j in await store.recover(T0 + 31)}
    # "run" started: its lost attempt counts (and was its last). "pre" never started: its
    # attempt is given back. "marked" started as a prefetched job: it counts.
    assert {i: (j.state, j.attempts) for i, j in moved.items()} == {
        "run": ("dead", 1),
        "pre": ("queued", 0),
        "marked": ("queued", 1),
    }
    pre = moved["pre"].error
    assert pre is not None and pre.type == "LeaseExpired" and "given back" in pre.message
    lost = moved["marked"].error
    assert lost is not None and lost.type == "LeaseExpired" and "given back" not in lost.message
    # Claimed as prefetched again and lost again before any start was written: this time
    # it counts, so a job that kills its process as it starts still reaches the DLQ.
    [again] = await store.claim(
        "q", fifo=False, limit=1, now=T0 + 40, owner=OWNER, lease_until=T0 + 70, start=0
    )
    assert (again.id, again.attempts) == ("pre", 1)
    moved = {j.id: j for j in await store.recover(T0 + 71)}
    assert (moved["pre"].state, moved["pre"].attempts) == ("dead", 1)


async def test_renew_extends_leases_and_reports_cancel_requests(store: Store) -> None:
    await store.enqueue([job("a"), job("b")])
    await claim(store)
    await store.cancel("b", T0)
    await store.enqueue([job("c")])  # queued: not leased by anyone
    assert await store.renew(OWNER, ["a", "b", "c"], T0 + 100) == Renewal(
        cancelled={"b"}, lost={"c"}
    )
    assert await store.renew("other", ["a"], T0 + 500) == Renewal(lost={"a"})
    assert await store.recover(T0 + 99) == []
    j = await store.get("a")
    assert j is not None and j.lease_until == T0 + 100


async def test_cancel_queued_held_running_and_finished(store: Store) -> None:
    await store.enqueue([job("q1"), job("run"), job("h", function_id="x")])
    assert await claim(store, limit=1) == ["q1"]
    await store.finish([done("q1")])
    await store.enqueue([job("queued")])
    before = await store.cancel("queued", T0 + 1)
    assert before is not None and before.state == "queued"
    assert await state_of(store, "queued") == ("cancelled", 0)
    assert await store.cancel("missing", T0) is None
    finished = await store.cancel("q1", T0)
    assert finished is not None and finished.state == "completed"
    assert await state_of(store, "q1") == ("completed", 1)
    assert await claim(store) == ["run", "h"]
    await store.cancel("run", T0)
    j = await store.get("run")
    assert j is not None and (j.state, j.cancel_requested) == ("running", True)
    await store.finish([Outcome(job_id="h", kind="held", owner=OWNER, attempt=1, at=T0)])
    await store.cancel("h", T0)
    assert await state_of(store, "h") == ("cancelled", 0)


@pytest.mark.parametrize("kind", ["held", "released"])
async def test_an_unstarted_outcome_of_a_job_whose_cancel_was_asked_cancels_it(
    store: Store, kind: Literal["held", "released"]
) -> None:
    """Held for an unknown function, or handed back at shutdown, after a cancel flagged
    it: it ends cancelled, its attempt given back, and the outcome says so (the runner's
    hooks read it). In a FIFO group it stops blocking the group."""
    await store.enqueue([job("h", function_id="x", group="A"), job("next", group="A")])
    assert await claim(store, fifo=True) == ["h"]
    await store.cancel("h", T0)
    outcome = Outcome(job_id="h", kind=kind, owner=OWNER, attempt=1, at=T0 + 2)
    await store.finish([outcome])
    cancelled = await store.get("h")
    assert cancelled is not None
    assert (cancelled.state, cancelled.attempts, cancelled.finished_at) == ("cancelled", 0, T0 + 2)
    assert (outcome.kind, outcome.started) == ("cancelled", False)
    assert await claim(store, fifo=True, now=T0 + 2) == ["next"]


async def test_a_retry_of_a_job_whose_cancel_was_asked_cancels_it(store: Store) -> None:
    """The attempt failed before the cancel's stop reached it: the job ends cancelled
    when its retry is written (its attempt kept, its error recorded), not queued again
    until its backoff ends; the outcome says so, and its FIFO group moves on at once.
    A retry of a job nobody asked to cancel is queued again as always."""
    await store.enqueue([job("r", group="A"), job("next", group="A"), job("plain", group="B")])
    assert await claim(store, fifo=True) == ["r", "plain"]
    await store.cancel("r", T0)
    retries = [
        Outcome(
            job_id=job_id,
            kind="retry",
            owner=OWNER,
            attempt=1,
            at=T0 + 2,
            error=ERR,
            available_at=T0 + 1000,
        )
        for job_id in ("r", "plain")
    ]
    await store.finish(retries)
    cancelled = await store.get("r")
    assert cancelled is not None
    assert (cancelled.state, cancelled.attempts, cancelled.finished_at) == ("cancelled", 1, T0 + 2)
    assert (cancelled.error, cancelled.last_failed_at) == (ERR, T0 + 2)
    assert [(o.kind, o.started, o.converted_from) for o in retries] == [
        ("cancelled", True, "retry"),
        ("retry", True, None),
    ]
    assert await state_of(store, "plain") == ("queued", 1)
    assert await claim(store, fifo=True, now=T0 + 2) == ["next"]


async def test_a_cancelled_outcome_gives_the_attempt_back_only_if_unstarted(
    store: Store,
) -> None:
    await store.enqueue([job("ran", group="a"), job("prefetched", group="b")])
    assert await claim(store, fifo=True) == ["ran", "prefetched"]
    cancelled = [
        Outcome(job_id="ran", kind="cancelled", owner=OWNER, attempt=1, at=T0 + 1),
        Outcome(
            job_id="prefetched", kind="cancelled", owner=OWNER, attempt=1, at=T0, started=False
        ),
    ]
    await store.finish(cancelled)
    assert await state_of(store, "ran") == ("cancelled", 1)
    assert await state_of(store, "prefetched") == ("cancelled", 0)


async def test_prune_deletes_only_old_completed_and_cancelled_jobs(store: Store) -> None:
    await store.enqueue([job("a"), job("b"), job("c", max_attempts=1), job("d")])
    await claim(store, limit=3)
    await store.finish([done("a", at=T0 + 1), done("b", at=T0 + 5)])
    await store.finish([Outcome(job_id="c", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)])
    await store.cancel("d", T0)
    assert await store.prune(T0 + 2) == 2  # a and d
    assert sorted(j.id for j in await store.list_jobs()) == ["b", "c"]


async def test_a_memory_prune_lets_the_loop_run_between_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memory store prunes on the event loop: a million expired runs in one go held
    it for seconds. It yields after every ``_PRUNE_BATCH`` rows."""
    monkeypatch.setattr(_memory, "_PRUNE_BATCH", 10, raising=False)
    store = MemoryStore()
    await store.open()
    await store.enqueue([job(f"j{i}") for i in range(35)])
    await claim(store, limit=35)
    await store.finish([done(f"j{i}", at=T0 + 1) for i in range(35)])
    turns = 0
    pruning = True
    started = anyio.Event()

    async def meanwhile() -> None:
        nonlocal turns
        started.set()
        while pruning:
            await anyio.lowlevel.checkpoint()
            turns += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(meanwhile)
        await started.wait()
        before = turns
        pruned = await store.prune(T0 + 2)
        during = turns - before
        pruning = False
    assert (pruned, during) == (35, 3)  # a turn after each full batch of 10
    assert await store.list_jobs() == []
    await store.aclose()


@pytest.mark.parametrize("fifo", [False, True])
async def test_the_memory_store_forgets_cancelled_delayed_jobs_before_their_time(
    fifo: bool,
) -> None:
    """A cancelled job's entry in its queue's heap of due times was dropped only when that
    time came: delayed jobs cancelled a week ahead kept their entries for a week after
    the runs themselves were pruned. Stale entries are swept once they are the majority."""
    store = MemoryStore()
    await store.open()
    week = 7 * 86_400.0
    for i in range(1000):
        [job_id] = await store.enqueue(
            [job(f"j{i}", at=T0 + week, group=f"g{i}" if fifo else None)]
        )
        await store.cancel(job_id, T0)
    await store.enqueue([job("live", at=T0 + week, group="g" if fifo else None)])
    assert await store.prune(T0 + 1) == 1000
    index = store._queues["q"]
    heap = index.group_heads if fifo else index.ready
    assert len(heap) < 64  # the live job's entry and fewer stale ones than a sweep waits for
    assert (await store.next_available_at("q", T0), len(store._rows)) == (T0 + week, 1)
    assert await claim(store, fifo=fifo, now=T0 + week) == ["live"]
    await store.aclose()


# --- FIFO ------------------------------------------------------------------------------


async def test_fifo_hands_out_only_group_heads(store: Store) -> None:
    await store.enqueue(
        [job("a1", group="A"), job("a2", group="A"), job("b1", group="B"), job("b2", group="B")]
    )
    assert await claim(store, fifo=True) == ["a1", "b1"]
    assert await claim(store, fifo=True) == []  # both groups busy
    await store.finish([done("a1")])
    assert await claim(store, fifo=True) == ["a2"]
    await store.finish([done("a2"), done("b1")])
    assert await claim(store, fifo=True) == ["b2"]


async def test_a_fifo_queues_next_due_time_is_its_heads(store: Store) -> None:
    """A job due before its group's head cannot start before it: the time a dispatcher
    or drain should wake for is the head's (both stores answer alike)."""
    await store.enqueue(
        [job("late-head", group="A", at=T0 + 7), job("early", group="A", at=T0 + 3)]
    )
    assert await store.next_available_at("q", T0) == T0 + 7
    await store.enqueue([job("b", group="B", at=T0 + 5)])
    assert await store.next_available_at("q", T0) == T0 + 5
    assert await claim(store, fifo=True, now=T0 + 5) == ["b"]
    assert await store.next_available_at("q", T0 + 5) == T0 + 7
    assert await claim(store, fifo=True, now=T0 + 7) == ["late-head"]
    assert await store.next_available_at("q", T0 + 7) is None  # "early" waits for the head


async def test_a_retrying_fifo_head_blocks_its_group(store: Store) -> None:
    await store.enqueue([job("a1", group="A"), job("a2", group="A"), job("b1", group="B")])
    assert await claim(store, fifo=True, limit=1) == ["a1"]
    await store.finish([retry("a1", 1, T0 + 10)])
    assert await claim(store, fifo=True) == ["b1"]
    assert await claim(store, fifo=True, now=T0 + 9) == []
    assert await store.next_available_at("q", T0 + 9) == T0 + 10
    assert await claim(store, fifo=True, now=T0 + 10) == ["a1"]
    await store.finish(
        [Outcome(job_id="a1", kind="dead", owner=OWNER, attempt=2, at=T0 + 10, error=ERR)]
    )
    assert await claim(store, fifo=True, now=T0 + 10) == ["a2"]


async def test_a_held_fifo_head_blocks_its_group(store: Store) -> None:
    await store.enqueue([job("a1", group="A", function_id="gone"), job("a2", group="A")])
    assert await claim(store, fifo=True) == ["a1"]
    await store.finish([Outcome(job_id="a1", kind="held", owner=OWNER, attempt=1, at=T0)])
    assert await claim(store, fifo=True) == []
    assert await store.release_held(["gone"]) == 1
    assert await claim(store, fifo=True) == ["a1"]


async def test_cancelling_a_fifo_head_lets_the_group_move_on(store: Store) -> None:
    await store.enqueue([job("a1", group="A", at=T0 + 50), job("a2", group="A")])
    assert await claim(store, fifo=True) == []  # the delayed head blocks a2
    await store.cancel("a1", T0)
    assert await claim(store, fifo=True) == ["a2"]


async def test_recovered_fifo_job_keeps_its_place_at_the_head(store: Store) -> None:
    await store.enqueue([job("a1", group="A"), job("a2", group="A")])
    assert await claim(store, fifo=True) == ["a1"]
    await store.recover(T0 + 31)
    assert await claim(store, fifo=True, now=T0 + 31) == ["a1"]


async def test_redrive_resets_attempts_and_joins_the_tail_of_the_group(store: Store) -> None:
    await store.enqueue([job("a1", group="A", max_attempts=1), job("a2", group="A")])
    assert await claim(store, fifo=True) == ["a1"]
    await store.finish(
        [Outcome(job_id="a1", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)]
    )
    await store.enqueue([job("a3", group="A")])
    assert await store.redrive("q", ["a1", "missing"], T0 + 1) == ["a1"]
    j = await store.get("a1")
    assert j is not None and (j.state, j.attempts, j.available_at) == ("queued", 0, T0 + 1)
    order = []
    for _ in range(3):
        [next_id] = await claim(store, fifo=True, now=T0 + 1)
        order.append(next_id)
        await store.finish([done(next_id, attempt=1)])
    assert order == ["a2", "a3", "a1"]
    assert await store.list_dead("q") == []


async def test_redrive_all_and_discard(store: Store) -> None:
    await store.enqueue([job(n, max_attempts=1) for n in ("a", "b", "c")])
    await claim(store)
    await store.finish(
        [
            Outcome(job_id=n, kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR)
            for n in ("a", "b", "c")
        ]
    )
    assert await store.discard("q", ["b"]) == ["b"]
    assert await store.get("b") is None
    assert await store.redrive("q", None, T0) == ["a", "c"]
    assert await store.discard("q", None) == []
    assert sorted(await claim(store)) == ["a", "c"]


async def test_many_ids_are_redriven_oldest_failure_first_whatever_order_they_come_in(
    store: Store,
) -> None:
    """More ids than one statement takes (the file store reads them 500 at a time), given
    newest first and with a repeat: the answer, and the order in which the redriven jobs
    rejoin their queue, is the DLQ's own (oldest failure first), as for fewer ids. Until
    2026-12-03 the file store sorted each chunk of 500 on its own."""
    names = [f"d{n:03}" for n in range(520)]
    await store.enqueue([job(n, max_attempts=1) for n in names])
    assert len(await claim(store, limit=len(names))) == len(names)
    await store.finish(
        [Outcome(job_id=n, kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR) for n in names]
    )
    given = [*reversed(names), names[0]]
    assert await store.redrive("q", given[:260], T0) == names[260:]
    assert await store.redrive("q", given, T0) == names[:260]
    assert await store.discard("q", given) == []
    queued = await store.list_jobs("q", "queued", limit=None)
    assert [j.id for j in queued] == [*names[260:], *names[:260]]


# --- inspection ------------------------------------------------------------------------


async def test_counts_per_queue(store: Store) -> None:
    await store.enqueue(
        [
            job("r1", at=T0 - 3),
            job("r2"),
            job("d1", at=T0 + 9),
            job("x", queue="other"),
            job("h", function_id="gone"),
        ]
    )
    await claim(store, limit=1)  # r1 runs
    [claimed] = [j for j in await store.list_jobs(state="running")]
    assert claimed.id == "r1"
    await claim(store, "other")
    held = await store.claim("q", fifo=False, limit=5, now=T0, owner=OWNER, lease_until=T0 + 30)
    for j in held:
        kind = "held" if j.id == "h" else "released"
        await store.finish([Outcome(job_id=j.id, kind=kind, owner=OWNER, attempt=1, at=T0)])
    counts = await store.counts(T0)
    q = counts["q"]
    assert (q.ready, q.delayed, q.running, q.held, q.dead) == (1, 1, 1, 1, 0)
    assert q.oldest_ready_at == T0
    assert counts["other"].running == 1


async def test_counts_of_every_state(store: Store) -> None:
    await store.enqueue(
        [
            job("done1"),
            job("done2"),
            job("gone"),  # cancelled: not counted as completed
            job("dead"),
            job("due"),
            job("early", at=T0 - 5),
            job("late", at=T0 + 5),
            job("later", queue="wait", at=T0 + 9),  # a queue with nothing due yet
        ]
    )
    assert await claim(store, limit=5) == ["early", "done1", "done2", "gone", "dead"]
    await store.finish(
        [
            completed_outcome("done1", OWNER, 1, T0, "null"),
            completed_outcome("done2", OWNER, 1, T0, "null"),
            Outcome(job_id="dead", kind="dead", owner=OWNER, attempt=1, at=T0, error=ERR),
            Outcome(job_id="early", kind="released", owner=OWNER, attempt=1, at=T0),
        ]
    )
    await store.cancel("gone", T0)  # running: flagged only
    await store.finish([Outcome(job_id="gone", kind="cancelled", owner=OWNER, attempt=1, at=T0)])
    assert await claim(store, limit=1) == ["early"]  # released: back at its old place
    counts = await store.counts(T0)
    assert counts == {
        "q": QueueCounts(ready=1, delayed=1, running=1, dead=1, completed=2, oldest_ready_at=T0),
        "wait": QueueCounts(delayed=1, oldest_ready_at=None),
    }
    # Time moves on: the delayed jobs become ready, the oldest first.
    later = await store.counts(T0 + 10)
    assert (later["q"].ready, later["q"].delayed, later["q"].oldest_ready_at) == (2, 0, T0)
    assert (later["wait"].ready, later["wait"].oldest_ready_at) == (1, T0 + 9)


async def test_list_jobs_filters_by_queue_and_state_in_seq_order(store: Store) -> None:
    await store.enqueue([job("a"), job("b", queue="z"), job("c")])
    await claim(store, limit=1)
    assert [j.id for j in await store.list_jobs("q", "queued")] == ["c"]
    assert [j.id for j in await store.list_jobs(state="running")] == ["a"]
    assert [j.id for j in await store.list_jobs()] == ["a", "b", "c"]


# --- cron fires ---------------------------------------------------------------------------

OTHER = "test-host:2:def"


async def fire(store: Store, scheduled: float, owner: str = OWNER) -> bool:
    """Try to take the fire of "tick" at ``scheduled``, at that time, for a 30 s lease."""
    return await store.claim_fire(
        "tick", scheduled, owner=owner, now=scheduled, lease_until=scheduled + 30
    )


async def test_one_owner_takes_each_fire_time(store: Store) -> None:
    assert await fire(store, T0 + 10) is True
    assert await fire(store, T0 + 10, OTHER) is False  # the same time, another owner
    await store.end_fires(OWNER, ["tick"])
    assert await fire(store, T0 + 10, OTHER) is False  # ended, but that time was taken
    assert await fire(store, T0 + 5, OTHER) is False  # an earlier time never runs
    assert await fire(store, T0 + 20, OTHER) is True
    # Other jobs have schedules of their own.
    assert await store.claim_fire("tock", T0 + 10, owner=OWNER, now=T0, lease_until=T0 + 30)


async def test_list_fires_shows_each_jobs_last_fire_and_whether_it_holds(store: Store) -> None:
    assert await store.list_fires(T0) == []
    assert await fire(store, T0 + 10)
    assert await store.claim_fire("tock", T0 + 20, owner=OTHER, now=T0 + 20, lease_until=T0 + 50)
    await store.end_fires(OTHER, ["tock"])
    assert await store.list_fires(T0 + 30) == [
        CronFire(
            job_id="tick",
            scheduled=T0 + 10,
            owner=OWNER,
            running=True,
            lease_until=T0 + 40,
            holds=True,
        ),
        CronFire(
            job_id="tock",
            scheduled=T0 + 20,
            owner=OTHER,
            running=False,
            lease_until=T0 + 50,
            holds=False,
        ),
    ]
    # At the end of its lease, a fire still marked running no longer holds the next one
    # back, as claim_fire judges it.
    [tick, _] = await store.list_fires(T0 + 40)
    assert (tick.running, tick.holds) == (True, False)
    assert await fire(store, T0 + 40, OTHER)


async def test_a_running_fire_holds_back_the_next_until_it_ends_or_its_lease_runs_out(
    store: Store,
) -> None:
    assert await fire(store, T0 + 10)
    assert await fire(store, T0 + 20, OTHER) is False  # the 10 s fire still runs
    await store.renew_fires(OWNER, ["tick"], T0 + 70)
    assert await fire(store, T0 + 60, OTHER) is False  # renewed: held until T0 + 70
    await store.renew_fires(OTHER, ["tick"], T0 + 999)  # not OTHER's fire: no effect
    assert await fire(store, T0 + 71, OTHER) is True  # the lease ran out
    await store.end_fires(OWNER, ["tick"])  # the old owner's end does not free OTHER's fire
    assert await fire(store, T0 + 80) is False
    await store.end_fires(OTHER, ["tick"])
    assert await fire(store, T0 + 90) is True
