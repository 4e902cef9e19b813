"""``enqueue_claimed`` on the file store: the jobs of one transaction are stored in the
order their enqueues were made, claimed or not, so each job's ``seq`` follows its enqueue
and a claim ``ahead`` takes only jobs stored queued before its own enqueue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded._stores import EnqueueClaim
from iii_embedded._stores._sqlite import SQLiteStore

from .helpers import T0, new_job

pytestmark = pytest.mark.anyio

OWNER = "test-host:1:abc"


def claim_of(count: int, ahead: int, delivered: dict[str, Any], name: str) -> EnqueueClaim:
    """A claim of ``count`` jobs and ``ahead`` owed ones, whose delivered job ids go to
    ``delivered[name]``."""

    def deliver(claim: EnqueueClaim, jobs: Any) -> None:
        delivered[name] = None if jobs is None else [job.id for job in jobs]

    return EnqueueClaim(
        owner=OWNER, lease_until=T0 + 30, count=count, deliver=deliver, ahead=ahead, now=T0
    )


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    store = SQLiteStore(tmp_path / "store")
    await store.open()
    yield store
    await store.aclose()


async def test_a_claim_ahead_never_takes_the_queued_tail_of_its_own_enqueue(
    store: SQLiteStore,
) -> None:
    # The runner expected one owed job that is not there (cancelled, taken by another
    # process, or an idempotent duplicate that stored nothing): the claim ahead finds none.
    delivered: dict[str, Any] = {}
    ids = await store.enqueue_claimed([new_job("a"), new_job("b")], claim_of(1, 1, delivered, "A"))
    assert ids == ["a", "b"]
    assert delivered == {"A": ["a"]}
    assert [j.id for j in await store.list_jobs("q")] == ["a", "b"]


async def test_a_claim_ahead_never_takes_a_job_enqueued_after_it_in_the_same_transaction(
    store: SQLiteStore,
) -> None:
    delivered: dict[str, Any] = {}
    receipts: dict[str, Any] = {}

    async def claiming() -> None:
        receipts["a"] = await store.enqueue_claimed([new_job("a")], claim_of(1, 1, delivered, "A"))

    async def plain() -> None:
        receipts["b"] = await store.enqueue([new_job("b")])

    async with anyio.create_task_group() as tg:  # both in the next turn: one transaction
        tg.start_soon(claiming)
        tg.start_soon(plain)
    assert receipts == {"a": ["a"], "b": ["b"]}
    assert delivered == {"A": ["a"]}


async def test_a_claim_ahead_takes_the_queued_jobs_of_an_earlier_enqueue_first(
    store: SQLiteStore,
) -> None:
    delivered: dict[str, Any] = {}

    async def plain() -> None:
        await store.enqueue([new_job("a")])

    async def claiming() -> None:
        await store.enqueue_claimed([new_job("b")], claim_of(1, 1, delivered, "B"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(plain)
        tg.start_soon(claiming)
    assert delivered == {"B": ["a", "b"]}


@pytest.mark.parametrize("one_call", [True, False])
async def test_jobs_claimed_at_enqueue_keep_their_place_in_the_store_order(
    store: SQLiteStore, one_call: bool
) -> None:
    # ``seq`` is the store's enqueue order: a claimed job released at shutdown, or whose
    # lease expires, is claimed again by it among jobs of the same ``available_at``.
    delivered: dict[str, Any] = {}
    if one_call:
        await store.enqueue_claimed([new_job("a"), new_job("b")], claim_of(1, 0, delivered, "A"))
    else:

        async def claiming() -> None:
            await store.enqueue_claimed([new_job("a")], claim_of(1, 0, delivered, "A"))

        async def plain() -> None:
            await store.enqueue([new_job("b")])

        async with anyio.create_task_group() as tg:
            tg.start_soon(claiming)
            tg.start_soon(plain)
    jobs = await store.list_jobs("q")
    assert [j.id for j in jobs] == ["a", "b"]
    assert jobs[0].seq < jobs[1].seq
    assert delivered == {"A": ["a"]}
