"""Every scenario of ``make bench``: what runs, with which parameters, and what each
iii-embedded figure is compared with (peers and raw SQLite limits measured in the same
run) and held to (the targets of docs/performance.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

N = 20_000
"""Jobs per throughput run (enqueue and end to end), for iii-embedded and the peers alike:
persist-queue and litequeue slow down as their backlog grows, so a smaller N would
flatter them."""

GROUPS = ("raw", "enqueue", "e2e", "sync_call", "latency", "depth")


@dataclass(frozen=True)
class Ref:
    """A reference an iii-embedded figure is divided by (the best of ``ids``)."""

    ids: tuple[str, ...]
    name: str
    target: float | None = None
    aim: float | None = None
    percent: bool = False
    """Show the ratio as a percentage (for the raw SQLite limits)."""


@dataclass(frozen=True)
class Limit:
    """An absolute target on one of a result's keys (``value < below``)."""

    key: str
    below: float
    text: str


@dataclass(frozen=True)
class Scenario:
    id: str
    group: str
    system: str
    label: str
    module: str
    function: str
    params: dict[str, Any]
    metric: str = "rate"
    repeats: int = 3
    quick: dict[str, Any] = field(default_factory=dict)
    prepare: tuple[str, str, dict[str, Any]] | None = None
    prepare_each: bool = False
    refs: tuple[Ref, ...] = ()
    limits: tuple[Limit, ...] = ()

    def title(self, params: dict[str, Any]) -> str:
        """The label, with ``{placeholders}`` filled from the parameters that ran."""
        try:
            return self.label.format(**params)
        except (KeyError, IndexError, ValueError):
            return self.label

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "rate"

    @property
    def unit(self) -> str:
        return {"rate": "/s", "us": "µs", "p50_ms": "ms p50"}[self.metric]


# The file-store variants of ``iii_bench`` (its ``StoreKind`` less ``memory``).
FILE_STORES = (
    "file-full",
    "file-normal",
    "file-full-pinned",
    "file-normal-pinned",
    "file-full-writer",
    "file-normal-writer",
)


def _pinned(store: str) -> bool:
    """Not the default configuration: ``pin_cpu`` (``-pinned``) or ``commit_on_loop: false``
    (``-writer``)."""
    return store.endswith(("-pinned", "-writer"))


def _system(store: str) -> str:
    """``file-normal-pinned`` → ``iii file normal, pin_cpu``; ``file-full-writer`` →
    ``iii file full, writer thread only``."""
    if store.endswith("-pinned"):
        return "iii " + store.removesuffix("-pinned").replace("-", " ") + ", pin_cpu"
    if store.endswith("-writer"):
        return "iii " + store.removesuffix("-writer").replace("-", " ") + ", writer thread only"
    return "iii " + store.replace("-", " ")


def _untargeted(ref: Ref) -> Ref:
    """The same comparison without a target: targets are judged on the default
    configuration; ``pin_cpu`` (an opt-in) and ``commit_on_loop: false`` rows are shown
    beside it."""
    return Ref(ref.ids, ref.name, percent=ref.percent)


def _raw() -> list[Scenario]:
    out = []
    for sync in ("normal", "full"):
        per_row_n = N if sync == "normal" else 2_000
        cycle_n = N if sync == "normal" else 1_000
        s = sync.upper()
        out += [
            Scenario(
                f"raw.insert1.{sync}",
                "raw",
                "raw SQLite",
                f"INSERT + COMMIT per row, {s}",
                "raw_sqlite",
                "insert",
                {"n": per_row_n, "per_commit": 1, "synchronous": sync},
            ),
            Scenario(
                f"raw.insert100.{sync}",
                "raw",
                "raw SQLite",
                f"100 INSERTs per COMMIT, {s}",
                "raw_sqlite",
                "insert",
                {"n": N, "per_commit": 100, "synchronous": sync},
            ),
            Scenario(
                f"raw.many1000.{sync}",
                "raw",
                "raw SQLite",
                f"executemany 1,000 rows per COMMIT, {s}",
                "raw_sqlite",
                "insert",
                {"n": N, "per_commit": 1000, "synchronous": sync, "many": True},
            ),
            Scenario(
                f"raw.cycle1.{sync}",
                "raw",
                "raw SQLite",
                f"enqueue→claim→ack, 1 job per transaction, {s}",
                "raw_sqlite",
                "cycle",
                {"n": cycle_n, "per_tx": 1, "synchronous": sync},
            ),
            Scenario(
                f"raw.cycle100.{sync}",
                "raw",
                "raw SQLite",
                f"enqueue→claim→ack, 100 jobs per transaction, {s}",
                "raw_sqlite",
                "cycle",
                {"n": N, "per_tx": 100, "synchronous": sync},
            ),
        ]
    return out


_PEER_ENQUEUE = (("huey", "Huey"), ("persistq", "persist-queue"), ("litequeue", "litequeue"))


def _enqueue() -> list[Scenario]:
    out = []
    for p in (1, 16):
        who = "1 producer" if p == 1 else "16 producers"
        out.append(
            Scenario(
                f"enqueue.memory.p{p}",
                "enqueue",
                "iii memory",
                f"enqueue, {who}",
                "iii_bench",
                "enqueue",
                {"store": "memory", "n": N, "producers": p},
                refs=(Ref((f"enqueue.dramatiq.p{p}",), f"Dramatiq stub, {who}"),),
            )
        )
        for sync in ("full", "normal"):
            s = sync.upper()
            peers = tuple(Ref((f"enqueue.{k}.p{p}",), name) for k, name in _PEER_ENQUEUE)
            raw = (
                Ref((f"raw.insert1.{sync}",), f"raw INSERT+COMMIT per row {s}", percent=True)
                if p == 1
                else Ref(
                    (f"raw.insert100.{sync}",),
                    f"raw 100 rows per commit {s}",
                    target=0.5,
                    percent=True,
                )
            )
            for store in (f"file-{sync}", f"file-{sync}-pinned", f"file-{sync}-writer"):
                out.append(
                    Scenario(
                        f"enqueue.{store}.p{p}",
                        "enqueue",
                        _system(store),
                        f"durable enqueue, {who}",
                        "iii_bench",
                        "enqueue",
                        {"store": store, "n": N, "producers": p},
                        refs=(*peers, raw if not _pinned(store) else _untargeted(raw)),
                    )
                )
            # The same from threads, with the blocking trigger (Huey's producers are
            # threads too); no target, the rows above are the scenario.
            out.append(
                Scenario(
                    f"enqueue.file-{sync}.threads.p{p}",
                    "enqueue",
                    f"iii file {sync}",
                    f"durable enqueue from {p} thread{'s' if p > 1 else ''}, blocking trigger",
                    "iii_bench",
                    "enqueue_threads",
                    {"store": f"file-{sync}", "n": N, "producers": p},
                    refs=(*peers, _untargeted(raw)),
                )
            )
        if p == 16:
            for sync in ("full", "normal"):
                s = sync.upper()
                out.append(
                    Scenario(
                        f"enqueue.file-{sync}.batch100",
                        "enqueue",
                        f"iii file {sync}",
                        "durable batch enqueue, 100 per batch_trigger call",
                        "iii_bench",
                        "enqueue_batch",
                        {"store": f"file-{sync}", "n": N, "per_call": 100},
                        refs=(
                            Ref(
                                (f"raw.insert100.{sync}",),
                                f"raw 100 rows per commit {s}",
                                percent=True,
                            ),
                        ),
                    )
                )
        for key, name in _PEER_ENQUEUE:
            out.append(
                Scenario(
                    f"enqueue.{key}.p{p}",
                    "enqueue",
                    name,
                    f"durable enqueue, {who}",
                    f"peers.{_MODULE[key]}",
                    "enqueue",
                    {"n": N, "producers": p},
                )
            )
        out.append(
            Scenario(
                f"enqueue.dramatiq.p{p}",
                "enqueue",
                "Dramatiq",
                f"enqueue (in memory), {who}",
                "peers.dramatiq_bench",
                "enqueue",
                {"n": N, "producers": p},
            )
        )
    return out


_MODULE = {
    "huey": "huey_bench",
    "persistq": "persistqueue_bench",
    "litequeue": "litequeue_bench",
    "dramatiq": "dramatiq_bench",
}


def _e2e() -> list[Scenario]:
    out = []
    for handler in ("async", "sync"):
        out.append(
            Scenario(
                f"e2e.memory.{handler}",
                "e2e",
                "iii memory",
                f"end to end, {handler} handlers",
                "iii_bench",
                "end_to_end",
                {"store": "memory", "n": N, "handler": handler},
                refs=(
                    Ref(
                        ("e2e.dramatiq.t8",),
                        "Dramatiq stub, 8 threads",
                        target=5.0 if handler == "async" else None,
                    ),
                    Ref(("e2e.dramatiq.t1",), "Dramatiq stub, 1 thread"),
                ),
            )
        )
        for store in FILE_STORES:
            sync = "full" if store.startswith("file-full") else "normal"
            s = sync.upper()
            refs = (
                Ref(
                    ("e2e.huey.w1", "e2e.huey.w8"),
                    "Huey-SQLite (best of 1/8 workers)",
                    target=10.0 if sync == "full" else None,
                ),
                Ref(("e2e.persistq.w1", "e2e.persistq.w8"), "persist-queue (best)"),
                Ref(("e2e.litequeue.w1", "e2e.litequeue.w8"), "litequeue (best)"),
                Ref(
                    (f"raw.cycle100.{sync}",),
                    f"raw cycle 100/tx {s}",
                    target=0.25,
                    aim=0.5,
                    percent=True,
                ),
                Ref((f"raw.cycle1.{sync}",), f"raw cycle 1/tx {s}", target=2.0),
            )
            out.append(
                Scenario(
                    f"e2e.{store}.{handler}",
                    "e2e",
                    _system(store),
                    f"end to end, {handler} handlers",
                    "iii_bench",
                    "end_to_end",
                    {"store": store, "n": N, "handler": handler},
                    refs=refs if not _pinned(store) else tuple(map(_untargeted, refs)),
                )
            )
    for store in ("memory", "file-full", "file-normal"):
        out.append(
            Scenario(
                f"e2e.fifo.{store}",
                "e2e",
                f"iii {store.replace('-', ' ')}",
                "end to end, FIFO, 100 groups, async",
                "iii_bench",
                "end_to_end",
                {"store": store, "n": N, "fifo_groups": 100},
                refs=(Ref((f"e2e.{store}.async",), "its standard queue", percent=True),),
            )
        )
    # The SQLite peers drain at 1-2k jobs/s (~15 s a run): one run each keeps the whole
    # benchmark under 10 minutes, except Huey with one worker, the reference of the
    # file-store targets (its 8-worker figure has always been the lower of the two).
    for key, name in (("huey", "Huey"), ("persistq", "persist-queue"), ("litequeue", "litequeue")):
        for w in (1, 8):
            out.append(
                Scenario(
                    f"e2e.{key}.w{w}",
                    "e2e",
                    name,
                    f"end to end, {w} worker thread{'s' if w > 1 else ''}",
                    f"peers.{_MODULE[key]}",
                    "end_to_end",
                    {"n": N, "workers": w},
                    repeats=3 if (key, w) == ("huey", 1) else 1,
                )
            )
    for t in (1, 8):
        out.append(
            Scenario(
                f"e2e.dramatiq.t{t}",
                "e2e",
                "Dramatiq",
                f"end to end (in memory), {t} worker thread{'s' if t > 1 else ''}",
                "peers.dramatiq_bench",
                "end_to_end",
                {"n": N, "threads": t},
            )
        )
    return out


def _sync_call() -> list[Scenario]:
    return [
        Scenario(
            "sync_call.iii",
            "sync_call",
            "iii memory",
            "sync call: await trigger_async(noop, x)",
            "iii_bench",
            "sync_call",
            {"m": 100_000},
            metric="us",
            refs=(Ref(("sync_call.huey",), "Huey immediate", target=2.5),),
            limits=(Limit("overhead_us", 5.0, "< 5 µs over a bare await"),),
        ),
        Scenario(
            "sync_call.huey",
            "sync_call",
            "Huey",
            "immediate-mode call, value fetched",
            "peers.huey_bench",
            "immediate",
            {"m": 20_000},
            metric="us",
        ),
    ]


def _latency() -> list[Scenario]:
    peers = (
        Ref(("latency.dramatiq",), "Dramatiq stub"),
        Ref(("latency.persistq",), "persist-queue"),
        Ref(("latency.huey",), "Huey (default polling)"),
    )
    # Targets are judged on the default configuration; pin_cpu rows are shown beside it.
    out = [
        Scenario(
            f"latency.{store}",
            "latency",
            _system(store),
            "idle latency enqueue→handler start",
            "iii_bench",
            "latency",
            {"store": store, "samples": 500},
            metric="p50_ms",
            refs=peers,
            limits=() if _pinned(store) else (Limit("p50_ms", 1.0, "p50 < 1 ms"),),
        )
        for store in (
            "memory",
            "file-full",
            "file-normal",
            "file-full-pinned",
            "file-normal-pinned",
        )
    ]
    out += [
        Scenario(
            "latency.dramatiq",
            "latency",
            "Dramatiq",
            "idle latency send→actor start",
            "peers.dramatiq_bench",
            "latency",
            {"samples": 500},
            metric="p50_ms",
        ),
        Scenario(
            "latency.persistq",
            "latency",
            "persist-queue",
            "idle latency put→get",
            "peers.persistqueue_bench",
            "latency",
            {"samples": 500},
            metric="p50_ms",
        ),
        Scenario(
            "latency.huey",
            "latency",
            "Huey",
            "idle latency enqueue→task start",
            "peers.huey_bench",
            "latency",
            {"samples": 40},
            metric="p50_ms",
            repeats=1,
            quick={"samples": 10},
        ),
    ]
    return out


def _depth() -> list[Scenario]:
    return [
        Scenario(
            "depth.10k",
            "depth",
            "iii file normal",
            "drain {drain_n:,} of {pending:,} pending (end to end, peak RSS)",
            "iii_bench",
            "depth_drain",
            {"drain_n": 10_000},
            prepare=("iii_bench", "depth_prefill", {"pending": 10_000}),
            prepare_each=True,
            # A drain of 10,000 jobs lasts ~0.3 s, and single runs of it spread over
            # 22-44k/s: the median of 5, not 3, for both depths.
            repeats=5,
            quick={"drain_n": 2_000, "prepare": {"pending": 2_000}},
            limits=(Limit("peak_rss_mb", 100.0, "RSS < 100 MB"),),
        ),
        Scenario(
            "depth.1m",
            "depth",
            "iii file normal",
            "drain {drain_n:,} of {pending:,} pending (end to end, peak RSS)",
            "iii_bench",
            "depth_drain",
            {"drain_n": 10_000},
            prepare=("iii_bench", "depth_prefill", {"pending": 1_000_000}),
            repeats=5,
            quick={"drain_n": 2_000, "prepare": {"pending": 100_000}},
            refs=(Ref(("depth.10k",), "10k pending", target=0.8, percent=True),),
            limits=(Limit("peak_rss_mb", 100.0, "RSS < 100 MB"),),
        ),
    ]


SCENARIOS: list[Scenario] = [*_raw(), *_enqueue(), *_e2e(), *_sync_call(), *_latency(), *_depth()]


def quick_params(s: Scenario) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Parameters for ``--quick``: a tenth of every size (at least 200), unless the
    scenario says otherwise; the prepare step's parameters likewise."""
    params = {
        k: (max(200, v // 10) if k in ("n", "m", "samples") and isinstance(v, int) else v)
        for k, v in s.params.items()
    }
    overrides = dict(s.quick)
    prepare = overrides.pop("prepare", None)
    params.update(overrides)
    prep = None
    if s.prepare is not None:
        prep = {**s.prepare[2], **(prepare or {})}
    return params, prep
