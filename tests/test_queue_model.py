"""A hypothesis state machine over the queue model (SPEC §9).

Random enqueues to several FIFO groups and a standard queue, handlers that fail a random
number of times, virtual time advanced by ``drain()`` to each retry's due time. Checked:
per-group order of first successful runs equals enqueue order; no two jobs of a group
overlap; running jobs never exceed ``concurrency``; retry delays equal
``backoff_ms × 2^(n-1)`` exactly; every job ends completed, or dead after exactly
``max_retries`` attempts when it always fails.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections import defaultdict
from typing import Any

import anyio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from iii_embedded import III, Config, QueueConfig, StoreConfig, TriggerAction
from iii_embedded.testing import VirtualClock, drain

MAX_RETRIES = 3
FIFO = QueueConfig(
    name="fifo",
    type="fifo",
    message_group_field="group",
    concurrency=2,
    max_retries=MAX_RETRIES,
    backoff_ms=1000,
)
STANDARD = QueueConfig(name="std", concurrency=2, max_retries=MAX_RETRIES, backoff_ms=250)
GROUPS = ["g0", "g1", "g2", "g3"]


class QueueModel(RuleBasedStateMachine):
    file_based = False

    def __init__(self) -> None:
        super().__init__()
        self.clock = VirtualClock()
        self.directory = tempfile.mkdtemp(prefix="iii-model-") if self.file_based else None
        store = (
            StoreConfig(store_method="file_based", file_path=self.directory)
            if self.directory
            else StoreConfig()
        )
        self.iii = III(
            Config(queues={"fifo": FIFO, "std": STANDARD}, store=store),
            clock=self.clock,
            shutdown_grace_ms=0,
        )
        self.starts: dict[int, list[float]] = defaultdict(list)
        self.completed: list[int] = []
        self.plan: dict[int, tuple[str, str | None, int]] = {}  # key -> (queue, group, failures)
        self.running = {"fifo": 0, "std": 0}
        self.peak = {"fifo": 0, "std": 0}
        self.group_active: dict[str, int] = defaultdict(int)
        self.overlaps: list[str] = []
        self.next_key = 0

        async def handler(data: dict[str, Any]) -> int:
            key = data["key"]
            queue, group, failures = self.plan[key]
            self.starts[key].append(self.clock.now())
            self.running[queue] += 1
            self.peak[queue] = max(self.peak[queue], self.running[queue])
            if group is not None:
                self.group_active[group] += 1
                if self.group_active[group] > 1:
                    self.overlaps.append(group)
            try:
                for _ in range(data["yields"]):
                    await anyio.lowlevel.checkpoint()
                if len(self.starts[key]) <= failures:
                    raise RuntimeError(f"planned failure of job {key}")
                self.completed.append(key)
                return key
            finally:
                self.running[queue] -= 1
                if group is not None:
                    self.group_active[group] -= 1

        self.iii.register_function("model::job", handler)
        self.iii.start()
        portal = self.iii.runtime.portal
        assert portal is not None
        self.portal = portal

    def _enqueue(self, queue: str, group: str | None, failures: int, yields: int) -> None:
        key = self.next_key
        self.next_key += 1
        self.plan[key] = (queue, group, failures)
        payload: dict[str, Any] = {"key": key, "yields": yields}
        if group is not None:
            payload["group"] = group
        receipt = self.iii.trigger(
            {
                "function_id": "model::job",
                "payload": payload,
                "action": TriggerAction.Enqueue(queue=queue),
            }
        )
        assert "messageReceiptId" in receipt

    @rule(
        group=st.sampled_from(GROUPS),
        failures=st.integers(0, MAX_RETRIES + 1),
        yields=st.integers(0, 3),
    )
    def enqueue_fifo(self, group: str, failures: int, yields: int) -> None:
        self._enqueue("fifo", group, failures, yields)

    @rule(failures=st.integers(0, MAX_RETRIES + 1), yields=st.integers(0, 3))
    def enqueue_standard(self, failures: int, yields: int) -> None:
        self._enqueue("std", None, failures, yields)

    @precondition(lambda self: self.next_key > 0)
    @rule(seconds=st.sampled_from([0.0, 0.25, 1.0, 3.0]))
    def let_time_pass(self, seconds: float) -> None:
        self.portal.call(lambda: drain(self.iii, max_advance_s=seconds))

    @invariant()
    def groups_never_overlap_and_concurrency_holds(self) -> None:
        assert self.overlaps == []
        assert self.peak["fifo"] <= FIFO.concurrency
        assert self.peak["std"] <= STANDARD.concurrency

    def teardown(self) -> None:
        try:
            self.portal.call(drain, self.iii)
            dead = {d.id for q in ("fifo", "std") for d in self.iii.dlq_list(q, limit=10_000)}
            assert len(dead) == sum(1 for _, _, f in self.plan.values() if f >= MAX_RETRIES)
            for key, (queue, _group, failures) in self.plan.items():
                starts = self.starts[key]
                backoff = (FIFO if queue == "fifo" else STANDARD).backoff_ms / 1000
                if failures >= MAX_RETRIES:
                    assert len(starts) == MAX_RETRIES, (key, starts)
                    assert key not in self.completed
                else:
                    assert len(starts) == failures + 1, (key, starts)
                    assert self.completed.count(key) == 1
                gaps = [b - a for a, b in itertools.pairwise(starts)]
                assert gaps == [backoff * 2 ** (n - 1) for n in range(1, len(starts))], (key, gaps)
            # Per group: successful runs happen in enqueue order.
            for group in GROUPS:
                enqueued = [
                    k
                    for k, (q, g, f) in sorted(self.plan.items())
                    if g == group and f < MAX_RETRIES
                ]
                succeeded = [k for k in self.completed if self.plan[k][1] == group]
                assert succeeded == enqueued, (group, succeeded, enqueued)
        finally:
            self.iii.shutdown()
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)


class FileQueueModel(QueueModel):
    """The same model on the SQLite store."""

    file_based = True


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
TestFileQueueModel = FileQueueModel.TestCase
TestFileQueueModel.settings = settings(max_examples=15, stateful_step_count=20, deadline=None)
