"""Run the benchmarks and print one table (``make bench``).

    python -m benchmarks.run                  # everything (under 10 minutes on 2 cores)
    python -m benchmarks.run --quick          # a smoke run: small sizes, one run each
    python -m benchmarks.run --only e2e       # a group (raw, enqueue, e2e, sync_call,
    python -m benchmarks.run --only e2e.huey  #   latency, depth) or ids containing a text
    python -m benchmarks.run --render benchmarks/results/latest.json  # re-compare only

Every run of every scenario is a fresh subprocess (``python -m benchmarks.worker``), so
state and peak RSS do not leak between them; the table shows medians of 3 runs (of 1 where
noted), taken in rounds: the first run of every scenario, then the second, then the
third. Each iii-embedded figure is shown beside its ratio to the peers and to the raw
SQLite limits measured in the same run, and against its target. Absolute figures drift
between runs on shared machines; the ratios are what to compare.

The table goes to stdout, progress to stderr. A full run also writes
``benchmarks/results/latest.json`` and ``latest.md``; ``--quick`` and ``--only`` runs
write ``results/partial.json`` instead (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ._util import SCRATCH_ENV
from .peers import PEERS
from .scenarios import GROUPS, SCENARIOS, Ref, Scenario, quick_params

RESULTS = Path(__file__).with_name("results")
RUN_TIMEOUT_S = 300


# --- running ---------------------------------------------------------------------------


def run_once(module: str, function: str, params: dict[str, Any]) -> dict[str, Any]:
    """One scenario run in a fresh interpreter; its JSON result."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", module, function, json.dumps(params)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=Path(__file__).resolve().parent.parent,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    return dict(json.loads(lines[-1]))


class _Runs:
    """One scenario's runs so far, and what its prepare step made."""

    def __init__(self, s: Scenario, quick: bool) -> None:
        self.s = s
        self.params, prep = quick_params(s) if quick else (dict(s.params), None)
        if s.prepare is not None and prep is None:
            prep = dict(s.prepare[2])
        self.prep_params = prep
        self.repeats = 1 if quick else s.repeats
        self.prepared: dict[str, Any] = {}
        self.runs: list[dict[str, Any]] = []
        self.error: str | None = None

    def run(self, i: int) -> dict[str, Any]:
        """Run number ``i`` (its prepare step first where due); its result."""
        s = self.s
        if s.prepare is not None and (i == 0 or s.prepare_each):
            self.prepared = run_once(s.prepare[0], s.prepare[1], self.prep_params or {})
        extra = {"directory": self.prepared["directory"]} if "directory" in self.prepared else {}
        result = run_once(s.module, s.function, {**self.params, **extra})
        self.runs.append(result)
        return result

    def result(self) -> dict[str, Any]:
        """The median and the runs (or the error)."""
        if self.error is not None:
            return {"error": self.error}
        s, runs = self.s, self.runs
        values = [float(r[s.metric]) for r in runs]
        median = statistics.median(values)
        middle = runs[min(range(len(runs)), key=lambda i: abs(values[i] - median))]
        detail = {k: v for k, v in middle.items() if k != s.metric}
        detail["peak_rss_mb"] = max(float(r["peak_rss_mb"]) for r in runs)
        for key in ("prefill_s", "prefill_method"):
            if key in self.prepared:
                detail[key] = self.prepared[key]
        return {
            "median": median,
            "runs": values,
            "detail": detail,
            "params": self.params,
            **({"prepare_params": self.prep_params} if self.prep_params else {}),
        }


def measure(selected: list[Scenario], quick: bool) -> dict[str, dict[str, Any]]:
    """Run every scenario ``repeats`` times, in rounds: the first run of each, then the
    second of each, and so on. A scenario's runs are spread over the whole session, as
    are those of the peers and limits it is compared with, so a machine that speeds up
    or slows down during the session (these shared VMs do, by up to 15% within minutes) moves
    both sides of a ratio alike. Scenarios run once take the first round."""
    states = [_Runs(s, quick) for s in selected]
    for i in range(max((st.repeats for st in states), default=0)):
        for st in states:
            if i >= st.repeats or st.error is not None:
                continue
            t0 = time.monotonic()
            try:
                value = float(st.run(i)[st.s.metric])
                shown = f"{_value_text(value, st.s.metric)} {st.s.unit}"
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                st.error = str(exc)
                shown = f"FAILED: {exc}"
            print(
                f"  {st.s.id:28} {i + 1}/{st.repeats} {shown:>22}   "
                f"({time.monotonic() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    return {st.s.id: st.result() for st in states}


# --- comparing -------------------------------------------------------------------------


def _best(ref: Ref, results: dict[str, dict[str, Any]], higher: bool) -> tuple[str, float] | None:
    found = [(rid, results[rid]["median"]) for rid in ref.ids if "median" in results.get(rid, {})]
    if not found:
        return None
    return (max if higher else min)(found, key=lambda item: item[1])


def compare(s: Scenario, results: dict[str, dict[str, Any]]) -> None:
    """Add ``ratios`` (×: how many times better iii-embedded is) and ``targets`` to the
    result of ``s``."""
    mine = results[s.id]
    ratios, targets = [], []
    for ref in s.refs:
        best = _best(ref, results, s.higher_is_better)
        if best is None:
            continue
        rid, value = best
        ratio = mine["median"] / value if s.higher_is_better else value / mine["median"]
        ratios.append({"ref": rid, "name": ref.name, "ratio": ratio, "percent": ref.percent})
        if ref.target is not None:
            shown = _ratio_text(ratio, ref.percent)
            goal = _ratio_text(ref.target, ref.percent)
            aim = f" (aim {_ratio_text(ref.aim, ref.percent)})" if ref.aim else ""
            targets.append(
                {
                    "text": f"≥ {goal}{aim} of {ref.name}"
                    if ref.percent
                    else f"≥ {goal} {ref.name}",
                    "met": ratio >= ref.target,
                    "measured": shown,
                    "factor_missing": None if ratio >= ref.target else ref.target / ratio,
                }
            )
    for limit in s.limits:
        value = mine["median"] if limit.key == s.metric else mine["detail"].get(limit.key)
        if value is None:
            continue
        targets.append(
            {
                "text": limit.text,
                "met": float(value) < limit.below,
                "measured": f"{float(value):,.3g}",
                "factor_missing": None if value < limit.below else float(value) / limit.below,
            }
        )
    mine["ratios"] = ratios
    mine["targets"] = targets


# --- the table -------------------------------------------------------------------------


def _ratio_text(ratio: float, percent: bool) -> str:
    if percent:
        return f"{ratio * 100:.1f}%" if ratio < 0.1 else f"{ratio * 100:.0f}%"
    return f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"


def _value_text(value: float, metric: str) -> str:
    if metric == "rate":
        return f"{value:,.0f}"
    return f"{value:,.3f}" if metric == "p50_ms" else f"{value:,.2f}"


def _detail_text(s: Scenario, r: dict[str, Any]) -> str:
    d = r["detail"]
    parts = []
    if "p99_ms" in d:
        parts.append(f"p99 {d['p99_ms']:.3f} ms")
    if "p999_ms" in d:
        parts.append(f"p99.9 {d['p999_ms']:.2f} ms, max {d['max_ms']:.1f} ms")
    if "overhead_us" in d:
        parts.append(f"bare await {d['bare_us']:.2f} µs, overhead {d['overhead_us']:.2f} µs")
    if s.group == "depth":
        parts.append(f"peak RSS {d['peak_rss_mb']:.0f} MB")
        parts.append(f"start-up {d.get('startup_ms', 0):.0f} ms")
        if "prefill_s" in d:
            parts.append(f"prefill {d['prefill_s']:.1f} s")
    elif s.system.startswith("iii") and s.group in ("e2e", "enqueue"):
        parts.append(f"RSS {d['peak_rss_mb']:.0f} MB")
    if len(r["runs"]) > 1:
        lo, hi = min(r["runs"]), max(r["runs"])
        parts.append(f"runs {_value_text(lo, s.metric)}–{_value_text(hi, s.metric)}")
    else:
        parts.append("1 run")
    return "; ".join(parts)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The Markdown table: one row per scenario that ran."""
    head = (
        "| scenario | system | median | unit | detail | × = how many times better iii-embedded "
        "is than (same run) | target |\n|---|---|--:|---|---|---|---|"
    )
    rows = [head]
    for s in SCENARIOS:
        r = results.get(s.id)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {s.id} | {s.system} | failed | | {r['error'][:120]} | | |")
            continue
        versus = "; ".join(
            f"{_ratio_text(x['ratio'], x['percent'])} {'of ' if x['percent'] else ''}{x['name']}"
            for x in r.get("ratios", [])
        )
        goals = "; ".join(
            f"{t['text']}: **{'met' if t['met'] else 'MISSED'}** ({t['measured']})"
            for t in r.get("targets", [])
        )
        title = s.title({**r.get("prepare_params", {}), **r["params"]})
        label = f"**{title}**" if s.system.startswith("iii") else title
        rows.append(
            f"| {label} | {s.system} | {_value_text(r['median'], s.metric)} | {s.unit} | "
            f"{_detail_text(s, r)} | {versus} | {goals} |"
        )
    return "\n".join(rows)


# --- the machine -----------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "anyio": _version("anyio"),
        "iii-embedded": _version("iii-embedded"),
        "kernel": platform.release(),
    }


def peers() -> dict[str, dict[str, str]]:
    return {name: {"version": _version(dist), "how": how} for name, (dist, how) in PEERS.items()}


# --- main ------------------------------------------------------------------------------


def _selected(only: str | None) -> list[Scenario]:
    if not only:
        return list(SCENARIOS)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    return [s for s in SCENARIOS if any(s.group == w or w in s.id for w in wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument(
        "--only", metavar="SCENARIO", help=f"a group ({', '.join(GROUPS)}) or id text"
    )
    parser.add_argument("--list", action="store_true", help="list the scenario ids and exit")
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: recompute the ratios and targets of a results file with the "
        "scenarios' current references, and rewrite it (and its .md) with the new table",
    )
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render)
    selected = _selected(args.only)
    if args.list or not selected:
        for s in SCENARIOS:
            print(f"{s.id:28} {s.system:16} {s.label}")
        return 0 if args.list else 2
    full = not args.quick and not args.only
    out = args.out or RESULTS / ("latest.json" if full else "partial.json")

    info, peer_info = machine(), peers()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), file=sys.stderr, flush=True)
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="iii-bench-")
    os.environ[SCRATCH_ENV] = scratch
    try:
        results = measure(selected, args.quick)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for s in selected:
        if "median" in results.get(s.id, {}):
            compare(s, results)
    total = time.monotonic() - started
    text = table(results)
    print(text)
    print(f"total {total:.0f} s", file=sys.stderr)

    command = (
        "python -m benchmarks.run"
        + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else "")
    )
    document = {
        "command": command,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "total_s": round(total, 1),
        "machine": info,
        "peers": peer_info,
        "scenarios": {
            s.id: {
                "group": s.group,
                "system": s.system,
                "label": s.title(
                    {**results[s.id].get("prepare_params", {}), **results[s.id].get("params", {})}
                ),
                "metric": s.metric,
                "unit": s.unit,
                **results[s.id],
            }
            for s in selected
        },
        "table": text,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    if full:
        out.with_suffix(".md").write_text(
            f"<!-- {command}, {document['finished_at']}, {total:.0f} s -->\n{text}\n"
        )
    failed = [sid for sid, r in results.items() if "error" in r]
    return 1 if failed else 0


def render(path: Path) -> int:
    """``--render``: the same measurements, compared again (after a reference was added
    to a scenario, say); the timings and the run's header stay as they were."""
    document = json.loads(path.read_text())
    results: dict[str, dict[str, Any]] = document["scenarios"]
    for s in SCENARIOS:
        if "median" in results.get(s.id, {}):
            compare(s, results)
    text = table(results)
    document["table"] = text
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    md = path.with_suffix(".md")
    if md.exists():
        header = md.read_text().splitlines()[0]
        md.write_text(f"{header}\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
