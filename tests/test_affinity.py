"""``pin_cpu`` (Linux): the engine's event loop and the file store's writer share one CPU
while the engine runs; sync-handler threads and the checkpointer keep every CPU; the
loop's thread gets its CPUs back at the end; a CPU the process cannot use is refused."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from iii_embedded import III, Config, ConfigError, QueueConfig, StoreConfig, TriggerAction
from iii_embedded.testing import drain


def _may_pin() -> bool:
    """True where this process may set its threads' CPUs (Linux, and no sandbox that
    forbids it): setting the mask it already has changes nothing."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not _may_pin(), reason="this system does not let threads be pinned"),
]

ENQUEUE = TriggerAction.Enqueue(queue="q")


def app_with(tmp_path: Path, pin: int | str | None) -> III:
    store = StoreConfig(
        store_method="file_based",
        file_path=str(tmp_path / "store"),
        pin_cpu=pin,  # type: ignore[arg-type]
    )
    return III(
        Config(queues={"q": QueueConfig(name="q", concurrency=2)}, store=store),
        shutdown_grace_ms=0,
    )


def affinity_of(name_prefix: str) -> set[int]:
    """The CPUs of the one live thread whose name starts with ``name_prefix``."""
    (thread,) = [t for t in threading.enumerate() if t.name.startswith(name_prefix)]
    assert thread.native_id is not None
    return os.sched_getaffinity(thread.native_id)


async def test_the_loop_and_the_writer_share_the_cpu_and_handlers_keep_every_cpu(
    tmp_path: Path,
) -> None:
    original = os.sched_getaffinity(0)
    cpu = max(original)
    iii = app_with(tmp_path, cpu)
    seen: dict[str, Any] = {}

    @iii.function("sync_fn")
    def sync_fn(n: int) -> int:  # runs in a sync-handler thread
        seen["handler"] = os.sched_getaffinity(0)
        return n * 2

    @iii.function("async_fn")
    async def async_fn(n: int) -> int:  # runs on the loop's thread
        seen["loop"] = os.sched_getaffinity(0)
        return n + 1

    async with iii.running():
        seen["writer"] = affinity_of("iii-sqlite[")
        seen["checkpointer"] = affinity_of("iii-sqlite-checkpoint[")
        a = await iii.trigger_async("sync_fn", 21, action=ENQUEUE)
        b = await iii.trigger_async("async_fn", 41, action=ENQUEUE)
        await drain(iii)
        runs = [await iii.runs.get_async(r["messageReceiptId"]) for r in (a, b)]

    assert [run.output if run else None for run in runs] == [42, 42]
    assert seen["loop"] == {cpu}
    assert seen["writer"] == {cpu}
    assert seen["handler"] == original
    assert seen["checkpointer"] == original
    assert os.sched_getaffinity(0) == original  # given back when the engine stopped


async def test_auto_pins_to_the_cpu_the_engine_starts_on(tmp_path: Path) -> None:
    original = os.sched_getaffinity(0)
    iii = app_with(tmp_path, "auto")
    async with iii.running():
        loop_cpus = os.sched_getaffinity(0)
        writer_cpus = affinity_of("iii-sqlite[")
    assert len(loop_cpus) == 1
    assert loop_cpus <= original
    assert writer_cpus == loop_cpus
    assert os.sched_getaffinity(0) == original


async def test_without_pin_cpu_nothing_is_pinned(tmp_path: Path) -> None:
    original = os.sched_getaffinity(0)
    iii = app_with(tmp_path, None)
    async with iii.running():
        assert os.sched_getaffinity(0) == original
        assert affinity_of("iii-sqlite[") == original


async def test_a_cpu_the_process_cannot_use_is_refused_and_the_store_closed(
    tmp_path: Path,
) -> None:
    original = os.sched_getaffinity(0)
    missing = max(original) + 1
    iii = app_with(tmp_path, missing)
    with pytest.raises(ConfigError) as caught:
        async with iii.running():
            pytest.fail("the engine started")
    message = str(caught.value)
    assert f"pin_cpu: CPU {missing} is not available to this process" in message
    assert str(max(original)) in message  # names the CPUs it may use
    assert os.sched_getaffinity(0) == original
    assert not [t for t in threading.enumerate() if t.name.startswith("iii-sqlite[")]
    # The same store opens again without the pin: it was closed, not left locked.
    again = app_with(tmp_path, None)
    ran: list[int] = []

    @again.function("fn")
    async def fn(n: int) -> None:
        ran.append(n)

    async with again.running():
        await again.trigger_async("fn", 7, action=ENQUEUE)
        await drain(again)
    assert ran == [7]


async def test_a_refused_pin_is_a_config_error_and_pins_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = os.sched_getaffinity(0)
    real = os.sched_setaffinity
    calls: list[tuple[int, set[int]]] = []

    def refuse_other_threads(tid: int, cpus: Any) -> None:
        calls.append((tid, set(cpus)))
        if tid != 0:  # the writer's pin fails after the loop's succeeded
            raise PermissionError(1, "Operation not permitted")
        real(tid, cpus)

    monkeypatch.setattr(os, "sched_setaffinity", refuse_other_threads)
    iii = app_with(tmp_path, max(original))
    with pytest.raises(
        ConfigError, match=r"pin_cpu: cannot pin to CPU \d+: Operation not permitted"
    ):
        async with iii.running():
            pytest.fail("the engine started")
    assert os.sched_getaffinity(0) == original  # the loop's pin was undone
    assert calls[-1] == (0, original)


async def test_pin_cpu_needs_linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_setaffinity")
    iii = app_with(tmp_path, "auto")
    with pytest.raises(ConfigError, match=r"pin_cpu needs Linux"):
        async with iii.running():
            pytest.fail("the engine started")


def test_store_config_refuses_a_negative_cpu() -> None:
    with pytest.raises(ValueError, match=r"pin_cpu must be a CPU number >= 0 or 'auto', got -2"):
        StoreConfig(pin_cpu=-2)
