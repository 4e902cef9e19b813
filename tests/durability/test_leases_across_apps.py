"""Apps that share a file store (found by a helper's multi-process tests,
2026-12-03): a process that stalled past its jobs' leases does not start the prefetched
jobs another process took back, and jobs one app held for want of a function are run by
another app that has it, without a restart."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from iii_embedded import III, Config, ConfigError, QueueConfig, StoreConfig, current_invocation
from iii_embedded._runtime import StallGuard
from iii_embedded._stores import NewJob, Outcome
from iii_embedded._stores._sqlite import DB_FILENAME, SQLiteStore
from iii_embedded.testing import VirtualClock, drain

pytestmark = pytest.mark.anyio


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``condition`` until it holds (bounded; the other app works in real time)."""
    with anyio.fail_after(10):
        while not await condition():
            await anyio.sleep(0.01)


def iii_invocation() -> str:
    """The receipt id of the run whose handler calls it."""
    invocation = current_invocation()
    assert invocation is not None and invocation.receipt_id is not None
    return invocation.receipt_id


def new_job(job_id: str, function_id: str, now: float) -> NewJob:
    return NewJob(
        id=job_id,
        queue="q",
        function_id=function_id,
        payload='"x"',
        group=None,
        created_at=now,
        available_at=now,
        max_attempts=3,
        idempotency_key=None,
    )


def file_config(path: Path, **queue: Any) -> Config:
    return Config(
        queues={"q": QueueConfig(name="q", **queue)},
        store=StoreConfig(store_method="file_based", file_path=str(path), lease_ms=1000),
    )


async def test_jobs_whose_leases_ran_out_during_a_stall_are_not_started(tmp_path: Path) -> None:
    path = tmp_path / "store"
    config = file_config(path, concurrency=1)
    config = attrs.evolve(config, store=attrs.evolve(config.store, lease_ms=300))
    iii = III(config, shutdown_grace_ms=0)
    started: list[str] = []
    first_running = anyio.Event()
    finish_first = anyio.Event()

    @iii.function("work")
    async def work(_: Any) -> None:
        started.append(iii_invocation())
        first_running.set()
        await finish_first.wait()

    other = SQLiteStore(path)
    async with iii.running():
        await other.open()
        try:
            await other.enqueue([new_job(f"j{n}", "work", time.time()) for n in range(5)])
            with anyio.fail_after(10):
                await first_running.wait()

            async def all_leased() -> bool:
                return len(await other.list_jobs("q", "running")) == 5

            await until(all_leased)  # j0 runs here, j1..j4 are prefetched and leased
            # The fault: the process stalls (its event loop blocked) for longer than the
            # lease, and meanwhile another process takes the jobs back and claims them.
            time.sleep(0.4)
            with sqlite3.connect(path / DB_FILENAME) as conn:
                conn.execute(
                    "UPDATE jobs SET lease_owner = 'other:1:x', lease_until = ?",
                    (time.time() + 3600,),
                )
            finish_first.set()
            await drain(iii, timeout=10)
            states = {j.id: (j.state, j.lease_owner) for j in await other.list_jobs("q")}
        finally:
            await other.aclose()
    assert started == ["j0"]  # the jobs that were only prefetched here were let go
    assert states == {f"j{n}": ("running", "other:1:x") for n in range(5)}


async def test_jobs_held_by_an_app_without_the_function_run_in_one_that_has_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    # B has the function and is running first; it polls rarely, so A finds the jobs first.
    b_clock = VirtualClock(start=time.time())
    b = III(file_config(path, poll_interval_ms=3_600_000), clock=b_clock, shutdown_grace_ms=0)
    ran: list[str] = []
    b.register_function("work", lambda _: ran.append(iii_invocation()))
    a = III(file_config(path, poll_interval_ms=20), shutdown_grace_ms=0)
    a.register_function("other", lambda _: None)  # an app of another version: no "work"

    other = SQLiteStore(path)
    async with b.running(), a.running():
        await other.open()
        try:
            await other.enqueue([new_job(f"j{n}", "work", time.time()) for n in range(3)])

            async def all_held() -> bool:
                return len(await other.list_jobs("q", "held")) == 3

            await until(all_held)  # A claimed them and, not knowing "work", held them
            b_clock.advance(1)  # B's maintenance runs (every lease_ms / 3)

            async def all_completed() -> bool:
                return len(await other.list_jobs("q", "completed")) == 3

            await until(all_completed)
        finally:
            await other.aclose()
    assert sorted(ran) == ["j0", "j1", "j2"]  # in B, each once


async def test_a_run_of_a_queue_this_app_does_not_serve_can_be_waited_for(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store"
    worker = III(file_config(path, poll_interval_ms=20), shutdown_grace_ms=0)
    worker.register_function("work", lambda n: n * 2)
    waiter = III(
        Config(store=StoreConfig(store_method="file_based", file_path=str(path))),
        shutdown_grace_ms=0,
    )
    other = SQLiteStore(path)
    async with worker.running(), waiter.running():
        await other.open()
        try:
            await other.enqueue([new_job("j0", "work", time.time())])
        finally:
            await other.aclose()
        with anyio.fail_after(10):
            result = await waiter.runs.wait_async("j0")
    assert (result.status, result.output) == ("completed", "xx")


async def test_a_job_claimed_again_while_its_lost_attempt_still_runs_here(
    tmp_path: Path,
) -> None:
    # After a stall longer than the lease, the job was taken back (by another process's
    # recovery) and this runner claimed it again while its first attempt ran on. The lost
    # attempt is stopped as at shutdown, so nothing is left running out of reach. Until
    # 2026-12-03 the two attempts shared one entry, and the second to end crashed the
    # app with a KeyError.
    path = tmp_path / "store"
    iii = III(file_config(path, concurrency=2, poll_interval_ms=20), shutdown_grace_ms=0)
    running: dict[int, anyio.Event] = {1: anyio.Event(), 2: anyio.Event()}
    outcomes: dict[int, str] = {}

    @iii.function("work")
    async def work(_: Any) -> str:
        invocation = current_invocation()
        assert invocation is not None
        attempt = invocation.attempt
        running[attempt].set()
        try:
            if attempt == 1:
                await anyio.sleep_forever()
        except BaseException as exc:
            outcomes[attempt] = type(exc).__name__
            raise
        outcomes[attempt] = "returned"
        return f"attempt {attempt}"

    other = SQLiteStore(path)
    async with iii.running():
        await other.open()
        try:
            await other.enqueue([new_job("j0", "work", time.time())])
            with anyio.fail_after(10):
                await running[1].wait()
                # Its lease runs out and another process's recovery queues it again.
                with sqlite3.connect(path / DB_FILENAME) as conn:
                    conn.execute(
                        "UPDATE jobs SET state = 'queued', lease_owner = NULL, "
                        "lease_until = NULL, available_at = ? WHERE id = 'j0'",
                        (time.time(),),
                    )
                result = await iii.runs.wait_async("j0")
                while 1 not in outcomes:  # the lost attempt is stopped, not left running
                    await anyio.sleep(0.01)
        finally:
            await other.aclose()
        runner = iii.runtime.runners["q"]
        left_running = (runner.running, list(runner.active))
    assert outcomes == {1: "CancelledError", 2: "returned"}
    assert (result.status, result.output) == ("completed", "attempt 2")
    assert left_running == (0, [])


def test_the_stall_guard_holds_recovery_for_a_lease_after_any_stall() -> None:
    # Passes every 10 s, leases of 30 s: a live owner renews at least every 10 s, so only
    # a gap or a pass longer than 20 s can have cost it its lease.
    guard = StallGuard(interval_s=10, lease_s=30, started=-9, wall=1000.0)

    def one_pass(began: float, ended: float, *, stall: bool = False, jump: float = 0) -> bool:
        guard.pass_began(began, 1000.0 + began + jump)
        if stall:
            guard.stalled(ended)  # the pass failed
        allowed = guard.may_recover(ended)
        guard.pass_ended(ended, 1000.0 + ended + jump)
        return allowed

    assert one_pass(0, 1) and one_pass(11, 12)
    # Slow passes (a big store), even every time, are no stall.
    assert one_pass(21, 35) and one_pass(35, 50) and one_pass(50, 65)
    # This process was stopped for ~90 s: its next pass begins late.
    assert not one_pass(155, 156) and not one_pass(166, 167) and one_pass(186, 187)
    # A pass that waited 25 s for the write lock.
    assert not one_pass(197, 222) and not one_pass(232, 233) and one_pass(252, 253)
    # A pass that failed.
    assert not one_pass(263, 263, stall=True) and not one_pass(273, 274)
    assert one_pass(293, 294)
    # The machine was suspended for an hour: the monotonic clock did not count it.
    assert not one_pass(304, 305, jump=3600) and one_pass(335, 336, jump=3600)


async def test_after_a_stall_other_owners_expired_leases_are_left_for_a_lease(
    tmp_path: Path,
) -> None:
    # While one process held the write lock (or this one was stopped), no owner could
    # renew: their leases ran out though they are alive. Recovering them at once would
    # run their jobs twice at the same time.
    path = tmp_path / "store"
    config = file_config(path, poll_interval_ms=20)
    config = attrs.evolve(config, store=attrs.evolve(config.store, lease_ms=300))
    iii = III(config, shutdown_grace_ms=0)
    mine_running, finish = anyio.Event(), anyio.Event()

    @iii.function("work")
    async def work(_: Any) -> None:
        if iii_invocation() == "mine":
            mine_running.set()
            await finish.wait()

    iii.register_function("theirs", lambda _: None)
    other = SQLiteStore(path)
    async with iii.running():
        await other.open()
        try:
            await other.enqueue([new_job("mine", "work", time.time())])
            with anyio.fail_after(10):
                await mine_running.wait()
            now = time.time()
            await other.enqueue([new_job("theirs", "theirs", now)])
            await other.claim(
                "q", fifo=False, limit=1, now=now, owner="peer:1:p", lease_until=now + 0.3
            )
            time.sleep(0.5)  # the fault: this process stalls past every lease

            async def owner_of(job_id: str) -> str | None:
                job = await other.get(job_id)
                assert job is not None
                return job.lease_owner

            async def lease_of_mine() -> float:
                job = await other.get("mine")
                assert job is not None and job.lease_until is not None
                return job.lease_until

            seen = await lease_of_mine()
            for _ in range(2):  # two maintenance passes after the stall have run
                with anyio.fail_after(10):
                    while (lease := await lease_of_mine()) == seen:
                        await anyio.sleep(0.01)
                seen = lease
            held_off = await owner_of("theirs")
            with anyio.fail_after(10):  # then, a lease after the stall, it is taken back
                while (await other.get("theirs")).state != "completed":  # type: ignore[union-attr]
                    await anyio.sleep(0.02)
            finish.set()
        finally:
            await other.aclose()
    assert held_off == "peer:1:p"


@pytest.mark.parametrize(
    ("queue", "stored_group", "configured_as", "stored_as"),
    [
        ({"type": "fifo", "message_group_field": "g"}, None, "fifo", "standard"),
        ({}, '"g"', "standard", "fifo"),
    ],
)
async def test_an_app_refuses_a_queue_whose_stored_jobs_are_of_the_other_type(
    tmp_path: Path,
    queue: dict[str, Any],
    stored_group: str | None,
    configured_as: str,
    stored_as: str,
) -> None:
    # Jobs stored while "q" had the other type (by an earlier version of the app, or by
    # another process that configures it so). Until 2026-12-03 a standard app's claims
    # failed on the one-running-job-per-group index at every poll, for ever, and a FIFO
    # app never claimed the jobs without a group: neither ran anything.
    path = tmp_path / "store"
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.enqueue(
            [
                attrs.evolve(new_job(f"j{n}", "work", time.time()), group=stored_group)
                for n in range(3)
            ]
        )
    finally:
        await store.aclose()
    iii = III(file_config(path, poll_interval_ms=20, **queue), shutdown_grace_ms=0)
    iii.register_function("work", lambda _: None)
    with pytest.raises(ConfigError) as caught:
        async with iii.running():
            pass
    message = str(caught.value)
    assert f"queue 'q' is configured {configured_as} here" in message, message
    assert f"holds jobs stored while it was {stored_as}" in message, message
    store = SQLiteStore(path)
    await store.open()
    try:
        states = {j.id: (j.state, j.attempts) for j in await store.list_jobs("q")}
    finally:
        await store.aclose()
    assert states == {f"j{n}": ("queued", 0) for n in range(3)}  # left as they were


async def test_a_queues_concurrency_is_each_processs_own(tmp_path: Path) -> None:
    # Two apps (as two processes would) with concurrency 1 on one store: two jobs of the
    # queue run at once, one in each, as docs/queues.md says.
    path = tmp_path / "store"
    running: dict[str, str] = {}
    both_running = anyio.Event()
    finish = anyio.Event()
    apps = [
        III(file_config(path, concurrency=1, prefetch=0, poll_interval_ms=20), shutdown_grace_ms=0)
        for _ in range(2)
    ]
    for name, app in zip("AB", apps, strict=True):

        async def work(_: Any, name: str = name) -> None:
            running[iii_invocation()] = name
            if len(running) == 2:
                both_running.set()
            await finish.wait()

        app.register_function("work", work)
    other = SQLiteStore(path)
    async with apps[0].running(), apps[1].running():
        await other.open()
        try:
            await other.enqueue([new_job(f"j{n}", "work", time.time()) for n in range(2)])
            with anyio.fail_after(10):
                await both_running.wait()
            finish.set()

            async def all_completed() -> bool:
                return len(await other.list_jobs("q", "completed")) == 2

            await until(all_completed)
        finally:
            await other.aclose()
    assert sorted(running.values()) == ["A", "B"]


async def test_a_process_that_configures_a_fifo_queue_standard_leaves_its_groups_alone(
    tmp_path: Path,
) -> None:
    # Two processes that disagree on a queue's type, both started on an empty store (so
    # the start's check has nothing to see). Until 2026-12-03 the standard one's claims
    # took the FIFO jobs too: it ran them outside their groups' order and bookkeeping
    # (and two of one group failed its whole claim, with the outcomes written with it).
    path = tmp_path / "store"
    ran: list[tuple[str, str]] = []
    std = III(file_config(path, poll_interval_ms=20), shutdown_grace_ms=0)
    std.register_function("work", lambda payload: ran.append(("std", payload["k"])))
    # The FIFO process polls rarely: the standard one sees every job first.
    fifo_clock = VirtualClock(start=time.time())
    fifo = III(
        file_config(path, type="fifo", message_group_field="g", poll_interval_ms=3_600_000),
        clock=fifo_clock,
        shutdown_grace_ms=0,
    )
    fifo.register_function("work", lambda payload: ran.append(("fifo", payload["k"])))

    def keyed(job_id: str, group: str | None) -> NewJob:
        payload = json.dumps({"k": job_id, "g": group})
        job = attrs.evolve(new_job(job_id, "work", time.time()), payload=payload)
        return job if group is None else attrs.evolve(job, group=json.dumps(group))

    other = SQLiteStore(path)
    async with std.running(), fifo.running():
        await other.open()
        try:

            async def completed(*ids: str) -> bool:
                states = {j.id: j.state for j in await other.list_jobs("q")}
                return all(states[i] == "completed" for i in ids)

            await other.enqueue([keyed("aG", "G"), keyed("aH", "H"), keyed("p1", None)])
            await until(lambda: completed("p1"))  # its claim passed over aG and aH
            await other.enqueue([keyed("bG", "G"), keyed("p2", None)])
            await until(lambda: completed("p2"))
            fifo_clock.advance(1)  # the FIFO process's maintenance pass wakes its queue
            await until(lambda: completed("aG", "aH", "bG"))
        finally:
            await other.aclose()
    assert sorted(ran) == [
        ("fifo", "aG"),
        ("fifo", "aH"),
        ("fifo", "bG"),
        ("std", "p1"),
        ("std", "p2"),
    ]
    assert [key for _, key in ran if key.endswith("G")] == ["aG", "bG"]


async def test_an_app_says_at_start_which_stored_queues_it_does_not_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new version renamed a queue (``emails`` to ``mail``): the jobs the old one left
    in ``emails`` wait for an app that serves it, which this one does not. They are not
    lost, but nothing else would say that they wait; finished and dead jobs need no
    app, and are not counted."""
    path = tmp_path / "store"
    store = SQLiteStore(path)
    await store.open()
    now = time.time()
    try:
        await store.enqueue(
            [
                attrs.evolve(new_job(f"e{n}", "work", now), queue="emails", available_at=at)
                for n, at in enumerate([now, now, now + 3600])
            ]
            + [attrs.evolve(new_job("old", "work", now), queue="gone")]
        )
        claimed = await store.claim(
            "gone", fifo=False, limit=1, now=now, owner="x:1:y", lease_until=now + 30
        )
        await store.finish(
            [Outcome(job_id=claimed[0].id, kind="completed", owner="x:1:y", attempt=1, at=now)]
        )
    finally:
        await store.aclose()
    caplog.set_level(logging.WARNING, logger="iii_embedded")
    iii = III(file_config(path), shutdown_grace_ms=0)
    iii.register_function("work", lambda _: None)
    async with iii.running():

        async def said() -> bool:
            return any("does not serve" in r.getMessage() for r in caplog.records)

        await until(said)
    lines = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
    assert lines == [
        "the store has 3 waiting job(s) in queue(s) this app does not serve: 'emails' (3); "
        "they run in an app whose config has the queue (renamed or removed in this version?)"
    ]
