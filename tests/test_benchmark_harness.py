"""The benchmark harness (``benchmarks.run``) still runs and still takes its repeats in
rounds. Nothing here measures speed: the figures are only checked to be there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import run as bench_run  # noqa: E402
from benchmarks.scenarios import Scenario  # noqa: E402


def scenario(sid: str, repeats: int, **extra: Any) -> Scenario:
    return Scenario(
        id=sid,
        group="test",
        system="iii memory",
        label=sid,
        module="iii_bench",
        function="fake",
        repeats=repeats,
        **{"params": {"n": 10}, **extra},
    )


def test_repeats_are_taken_in_rounds_and_a_prepared_store_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    rates = iter(range(1, 100))

    def fake_run_once(module: str, function: str, params: dict[str, Any]) -> dict[str, Any]:
        calls.append((function, params))
        if function == "prefill":
            return {"directory": f"/store{len(calls)}", "prefill_s": 0.5}
        if params.get("fail"):
            raise RuntimeError("exit 1: boom")
        return {"rate": float(next(rates)), "peak_rss_mb": 30.0}

    monkeypatch.setattr(bench_run, "run_once", fake_run_once)
    selected = [
        scenario("a", 3),
        scenario("once", 1),
        scenario("deep", 3, prepare=("iii_bench", "prefill", {"pending": 5})),
        scenario("broken", 3, params={"fail": True}),
    ]
    results = bench_run.measure(selected, quick=False)
    order = [(f, p.get("directory")) for f, p in calls]
    assert order == [
        ("fake", None),  # round 1: a
        ("fake", None),  # once
        ("prefill", None),  # deep: its store, made once
        ("fake", "/store3"),
        ("fake", None),  # broken fails, and is not run again
        ("fake", None),  # round 2: a
        ("fake", "/store3"),  # deep, on the same store
        ("fake", None),  # round 3: a
        ("fake", "/store3"),
    ]
    assert results["a"]["runs"] == [1.0, 4.0, 6.0]
    assert results["a"]["median"] == 4.0
    assert results["once"]["runs"] == [2.0]
    assert results["deep"]["runs"] == [3.0, 5.0, 7.0]
    assert results["deep"]["detail"]["prefill_s"] == 0.5
    assert results["broken"] == {"error": "exit 1: boom"}


def test_a_quick_run_of_in_process_scenarios_writes_its_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "partial.json"
    only = "e2e.memory.async,sync_call.iii,latency.memory"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", only, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    scenarios = data["scenarios"]
    assert sorted(scenarios) == sorted(only.split(","))
    for sid, result in scenarios.items():
        assert result["median"] > 0, sid
        assert len(result["runs"]) == 1, sid
        assert f"{sid}" in proc.stderr and "1/1" in proc.stderr
    assert "| **sync call: await trigger_async(noop, x)** | iii memory |" in proc.stdout
    # The targets that need no peer are judged even in a partial run.
    assert "p50 < 1 ms: **" in proc.stdout


def test_render_compares_saved_results_again_without_measuring(tmp_path: Path) -> None:
    saved = {
        "command": "python -m benchmarks.run",
        "scenarios": {
            sid: {
                "median": median,
                "runs": [median],
                "detail": {"peak_rss_mb": 40.0},
                "params": {"n": 10},
            }
            for sid, median in (
                ("enqueue.file-full.threads.p1", 4_000.0),
                ("enqueue.huey.p1", 5_000.0),
                ("raw.insert1.full", 8_000.0),
            )
        },
        "table": "old",
    }
    path = tmp_path / "latest.json"
    path.write_text(json.dumps(saved))
    (tmp_path / "latest.md").write_text("<!-- the run's header -->\nold\n")

    assert bench_run.render(path) == 0

    rendered = json.loads(path.read_text())
    ratios = {
        r["name"]: r["ratio"]
        for r in rendered["scenarios"]["enqueue.file-full.threads.p1"]["ratios"]
    }
    assert ratios == {"Huey": 0.8, "raw INSERT+COMMIT per row FULL": 0.5}
    assert rendered["scenarios"]["enqueue.huey.p1"]["runs"] == [5_000.0]  # untouched
    md = (tmp_path / "latest.md").read_text().splitlines()
    assert md[0] == "<!-- the run's header -->"
    assert any("0.80× Huey; 50% of raw INSERT+COMMIT per row FULL" in line for line in md)
