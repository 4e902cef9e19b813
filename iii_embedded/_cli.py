"""The ``iii-embedded`` command: run an app, check a config, look at queues, work the DLQ,
trigger functions, inspect runs — on a file store, safely while apps use it.

A user's mistake (no such queue, bad JSON, missing store, unknown id) is one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import attrs

from ._actions import EnqueueAction
from ._app import RunAtImportError, _importing_app, _on_sigterm
from ._config import Config, StoreConfig
from ._config_loader import find_config
from ._errors import ConfigError, InvocationError, StoreError
from ._http import HttpListenError
from ._runtime import new_jobs
from ._stats import DeadJob, QueueStats
from ._stores import QueueCounts, Store, open_store
from ._stores._sqlite import DB_FILENAME

__all__ = ["main"]

T = TypeVar("T")
CHUNK = 500
NO_CONFIG = "no config file found (no --config, no $III_CONFIG, no ./iii-config.yaml here)"
MISSING_SHOWN = 10  # ids named when given ids were not in a dead-letter queue


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    """Columns of text: the first ``left`` aligned left (names), the rest right (counts)."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(w) if i < left else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


MAX_INTERVAL_S = 86_400


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0, at most a day (argparse turns the error
    into usage; ``time.sleep`` cannot take a huge number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds > 0 and <= {MAX_INTERVAL_S}, got {text!r}"
        )
    return value


def _positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer > 0, got {text!r}")
    return value


def _seconds(ms: float) -> str:
    s = ms / 1000
    if s >= 3600:
        return f"{s / 3600:g}h"
    if s >= 60:
        return f"{s / 60:g}m"
    return f"{s:g}s"


def _age(seconds: float | None) -> str:
    """How long ago, for people: ``12.3s``, ``3m48s``, ``2h05m`` (``:g`` gave ``3.79833m``)."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


ERROR_WIDTH = 60  # characters of an error in a table (dlq show has it whole)


def _clip(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, ending with an ellipsis if it was cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# --- configuration and stores ------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    try:
        return find_config(args.config) if args.config else find_config()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _store_dir(args: argparse.Namespace, *, create: bool = False) -> Path:
    """The store's directory. Only a store the config names may be created (``create``):
    a ``--store`` directory must hold one already, so that a mistyped path is an error
    rather than a new, empty store that no app reads."""
    if getattr(args, "store", None):
        directory = Path(args.store)
        create = False
    else:
        config = _config(args)
        if config.source is None:
            raise UsageError(f"{NO_CONFIG}: give --store DIR or --config FILE")
        if config.store.store_method != "file_based" or not config.store.file_path:
            where = config.source
            raise UsageError(
                f"{where} uses an in-memory store; nothing to inspect from outside the app "
                "(use --store DIR or a config with a file_based store)"
            )
        directory = Path(config.store.file_path)
    # Anything at the database's path is for the store to judge (a directory there is
    # named as such); only nothing there means no store.
    if not create and not (directory / DB_FILENAME).exists():
        if directory.name == DB_FILENAME and directory.is_file():
            raise UsageError(
                f"no store at {directory}: that is the store's database file; "
                f"give its directory, {directory.parent}"
            )
        if directory.is_file():
            raise UsageError(
                f"no store at {directory}: it is a file; a store is the directory that "
                f"holds {DB_FILENAME}"
            )
        raise UsageError(f"no store at {directory} (no {DB_FILENAME} there)")
    return directory


def _with_store(
    args: argparse.Namespace, fn: Callable[[Store], Awaitable[T]], *, create: bool = False
) -> T:
    """Open the store (an existing one, unless ``create``), run ``fn`` on it, close it."""
    directory = _store_dir(args, create=create)

    async def go() -> T:
        store = open_store(StoreConfig(store_method="file_based", file_path=str(directory)))
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.aclose()

    try:
        return anyio.run(go)
    except StoreError as exc:
        raise UsageError(str(exc)) from None


def _queue_names(args: argparse.Namespace, counts: dict[str, QueueCounts]) -> list[str]:
    names = set(counts)
    if not getattr(args, "store", None) or args.config:
        names |= set(_config(args).queues)
    return sorted(names)


def _known_queue(args: argparse.Namespace, store: Store, queue: str) -> Awaitable[None]:
    async def check() -> None:
        counts = await store.counts(time.time())
        if queue not in _queue_names(args, counts):
            raise UsageError(f"Queue '{queue}' not found")

    return check()


# --- commands ---------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    rows = []
    for q in sorted(config.queues.values(), key=lambda q: q.name):
        delays = [_seconds(q.backoff_delay_ms(n)) for n in range(1, min(q.max_attempts, 6))]
        if q.max_attempts > 6:
            delays.append("...")
        rows.append(
            [
                q.name,
                q.type,
                q.concurrency,
                q.max_attempts,
                " ".join(delays) or "-",
                q.message_group_field or "-",
            ]
        )
    store = config.store
    where = store.file_path if store.store_method == "file_based" else "memory"
    if args.json:
        _print_json(
            {
                "source": config.source,
                "store": attrs.asdict(store),
                "queues": [attrs.asdict(q) for q in config.queues.values()],
            }
        )
        return 0
    print(f"config: {config.source or '(defaults)'}  store: {store.store_method} ({where})")
    print(_table(["queue", "type", "concurrency", "attempts", "backoff", "group field"], rows))
    return 0


def _stats(args: argparse.Namespace) -> list[QueueStats]:
    async def read(store: Store) -> list[QueueStats]:
        now = time.time()
        counts = await store.counts(now)
        config = _config(args) if (args.config or not args.store) else Config()
        out = []
        for name in _queue_names(args, counts):
            q = config.queues.get(name)
            out.append(
                QueueStats.build(
                    queue=name,
                    type=q.type if q else "-",
                    concurrency=q.concurrency if q else 0,
                    counts=counts.get(name, QueueCounts()),
                    now=now,
                    completed=counts.get(name, QueueCounts()).completed,
                )
            )
        return out

    return _with_store(args, read)


def _store_figures(stats: QueueStats) -> dict[str, Any]:
    """A queue's figures as the store has them. ``iii.stats()``'s counters (completed,
    failed, retried, dead-lettered, prefetched) are an app process's since it started:
    the command has none to show, and says ``completed_kept`` for the completed runs the
    store still keeps (until ``result_retention_ms``), not ``completed``."""
    out = attrs.asdict(stats)
    out["completed_kept"] = out.pop("completed")
    for counter in ("failed", "retried", "dead_lettered", "prefetched"):
        del out[counter]
    return out


def cmd_queues(args: argparse.Namespace) -> int:
    previous: dict[str, tuple[float, int]] = {}
    iterations = args.iterations if args.iterations else (None if args.watch else 1)
    n = 0
    while iterations is None or n < iterations:
        stats = _stats(args)
        now = time.monotonic()
        rows = []
        for s in stats:
            rate = None
            if s.queue in previous:
                t0, c0 = previous[s.queue]
                rate = f"{max(0, s.completed - c0) / max(now - t0, 1e-9):.1f}/s"
            previous[s.queue] = (now, s.completed)
            rows.append(
                [
                    s.queue,
                    s.ready,
                    s.delayed,
                    s.running,
                    s.held,
                    s.dead,
                    _age(s.oldest_ready_age_s),
                    rate if args.watch else None,
                ]
            )
        if args.json:
            _print_json([_store_figures(s) for s in stats])
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            print(
                _table(
                    [
                        "queue",
                        "ready",
                        "delayed",
                        "running",
                        "held",
                        "dead",
                        "oldest ready",
                        "throughput",
                    ],
                    rows,
                )
            )
        n += 1
        if iterations is None or n < iterations:
            time.sleep(args.interval)
    return 0


def cmd_cron(args: argparse.Namespace) -> int:
    fires = _with_store(args, lambda store: store.list_fires(time.time()))
    if args.json:
        _print_json([attrs.asdict(f) for f in fires])
        return 0
    if not fires:
        print("no cron job has fired in this store yet")
        return 0
    rows = []
    for f in fires:
        if f.holds:
            state = f"running (lease until {_when(f.lease_until)})"
        elif f.running:
            state = "stopped unfinished (process gone or lease expired)"
        else:
            state = "ended"
        rows.append([f.job_id, _when(f.scheduled), f.owner, state])
    print(_table(["cron job", "last fire", "taken by", "state"], rows, left=4))
    return 0


def cmd_dlq_list(args: argparse.Namespace) -> int:
    async def read(store: Store) -> tuple[list[DeadJob], int]:
        await _known_queue(args, store, args.queue)
        jobs = [DeadJob.from_job(j) for j in await store.list_dead(args.queue, limit=args.limit)]
        if len(jobs) < args.limit:
            return jobs, len(jobs)
        counts = await store.counts(time.time())
        return jobs, counts.get(args.queue, QueueCounts()).dead

    dead, total = _with_store(args, read)
    if args.json:
        _print_json([d.to_iii() | {"error_type": d.error.type if d.error else None} for d in dead])
    elif not dead:
        print(f"the dead-letter queue of '{args.queue}' is empty")
    else:
        _print_dead_table(dead)
    if len(dead) < total:  # after the table, on stderr: a script reading stdout gets rows
        sys.stdout.flush()
        print(
            f"{len(dead)} of the {total} dead jobs of '{args.queue}' shown (--limit N shows more)",
            file=sys.stderr,
        )
    return 0


def _print_dead_table(dead: Sequence[DeadJob]) -> None:
    print(
        _table(
            ["id", "function", "attempts", "failed at", "error"],
            [
                [
                    d.id,
                    d.function_id,
                    d.attempts,
                    _when(d.last_failed_at),
                    _clip(str(d.error), ERROR_WIDTH) if d.error else "-",
                ]
                for d in dead
            ],
        )
    )


def cmd_dlq_show(args: argparse.Namespace) -> int:
    async def read(store: Store) -> DeadJob:
        await _known_queue(args, store, args.queue)
        job = await store.get(args.id)
        if job is None or job.queue != args.queue or job.state != "dead":
            where = ""
            if job is not None and job.queue != args.queue:
                where = f" (that job is in queue '{job.queue}')"
            elif job is not None:
                where = f" (that job is not dead: it is {job.state})"
            raise UsageError(f"no dead job {args.id} in queue '{args.queue}'{where}")
        return DeadJob.from_job(job)

    dead = _with_store(args, read)
    if args.json:
        _print_json(attrs.asdict(dead))
        return 0

    print(f"id:            {dead.id}")
    print(f"queue:         {dead.queue}")
    print(f"function:      {dead.function_id}")
    print(f"attempts:      {dead.attempts}")
    print(f"first failure: {_when(dead.first_failed_at)}")
    print(f"last failure:  {_when(dead.last_failed_at)}")
    print(f"payload:       {json.dumps(dead.payload)}")
    if dead.error is not None:
        print(f"error:         {dead.error.type}: {dead.error.message}")
        if dead.error.traceback:
            print()
            print(dead.error.traceback.rstrip())
    return 0


def _progress(label: str, done: int, total: int, enabled: bool) -> None:
    if not enabled or total <= 0:
        return
    width = 30
    filled = int(width * min(done, total) / total)
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _dlq_bulk(args: argparse.Namespace, verb: str) -> int:
    if bool(args.ids) == bool(args.all):
        raise UsageError(f"dlq {verb}: give job ids or --all (not both)")
    show = args.progress or sys.stderr.isatty()

    async def work(store: Store) -> tuple[int, bool]:
        await _known_queue(args, store, args.queue)
        now = time.time()
        # --all is the jobs dead when the command starts, each handled once: their ids
        # are read first (in one read: pages by offset skip ids that another process's
        # redrive shifts), so a job that dies again while the command runs (its handler
        # still fails) is not taken a second time (see docs/design.md).
        ids = await store.dead_ids(args.queue) if args.all else list(dict.fromkeys(args.ids))
        # Chunks of CHUNK ids, one transaction each: an interruption leaves every chunk
        # fully done or not started, and running the command again continues with the rest.
        total, done = len(ids), 0
        missing: list[str] = []
        for start in range(0, total, CHUNK):
            chunk = ids[start : start + CHUNK]
            taken = set(await _apply(store, verb, args.queue, chunk, now))
            done += len(taken)
            missing.extend(i for i in chunk if i not in taken)
            _progress(verb, min(start + CHUNK, total), total, show)
        if missing and args.all:
            print(
                f"{len(missing)} id(s) had left the dead-letter queue of '{args.queue}' "
                "before the command reached them",
                file=sys.stderr,
            )
        elif missing:
            # Ids the user named that were not dead there (a typo, or already redriven):
            # named, and the exit status says the command did not do all it was asked.
            shown = ", ".join(missing[:MISSING_SHOWN]) + (
                ", ..." if len(missing) > MISSING_SHOWN else ""
            )
            print(
                f"{len(missing)} id(s) were not in the dead-letter queue of "
                f"'{args.queue}': {shown}",
                file=sys.stderr,
            )
        return done, bool(missing) and not args.all

    count, incomplete = _with_store(args, work)
    past = "redriven" if verb == "redrive" else "discarded"
    if args.json:
        _print_json({"queue": args.queue, past: count})
    else:
        print(f"{past} {count} job(s) of '{args.queue}'")
    return 1 if incomplete else 0


async def _apply(store: Store, verb: str, queue: str, ids: Sequence[str], now: float) -> list[str]:
    if verb == "redrive":
        return await store.redrive(queue, ids, now)
    return await store.discard(queue, ids)


def cmd_dlq_redrive(args: argparse.Namespace) -> int:
    return _dlq_bulk(args, "redrive")


def cmd_dlq_discard(args: argparse.Namespace) -> int:
    return _dlq_bulk(args, "discard")


def _payload(args: argparse.Namespace) -> Any:
    if args.payload is None:
        return None
    try:
        return json.loads(args.payload)
    except ValueError as exc:
        raise UsageError(f"--payload is not valid JSON: {exc}") from None


def _import_app(spec: str) -> Any:
    from ._app import III

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"expected MODULE:APP (like 'myapp:iii'), got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        # A file's path (shop.py, ./app/shop.py): say the module's name instead.
        path = Path(module_name).with_suffix("")
        with contextlib.suppress(ValueError):
            path = path.resolve().relative_to(Path.cwd())
        if path.is_absolute():  # outside this directory: its name, run from where it is
            hint = f"'{path.name}:{attr}' from the file's directory"
        else:
            hint = f"'{'.'.join(path.parts)}:{attr}'"
        raise UsageError(
            f"cannot import {module_name!r}: MODULE is a module's name, not a file: try {hint}"
        )
    sys.path.insert(0, os.getcwd())
    # While the module is imported, iii.run() raises: a script that ends with it (not
    # under `if __name__ == "__main__":`) would serve the app inside the import.
    importing = _importing_app.set(True)
    try:
        module = importlib.import_module(module_name)
    except RunAtImportError as exc:
        raise UsageError(
            f"{spec}: the module calls iii.run() when it is imported{_user_frame(exc)}: "
            "the command runs the app itself, so call run() only under "
            '`if __name__ == "__main__":`'
        ) from None
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from None
    except ConfigError as exc:  # III.from_config at import time, say: one clear line
        raise UsageError(f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the app's own code failed: where, in one line
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb else ""
        raise UsageError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{where}; "
            f"'python -c \"import {module_name}\"' shows the traceback"
        ) from None
    finally:
        _importing_app.reset(importing)
    if not hasattr(module, attr):
        raise UsageError(f"module {module_name!r} has no attribute {attr!r} (in {spec!r})")
    app = getattr(module, attr)
    if not isinstance(app, III):
        raise UsageError(f"{spec!r} is not an III app (found {type(app).__name__})")
    return app


def _user_frame(exc: BaseException) -> str:
    """`` (file:line)`` of the innermost frame of ``exc`` outside this package."""
    package = str(Path(__file__).parent) + os.sep
    where, tb = "", exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith((package, "<")):
            where = f" ({filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return where


def cmd_trigger(args: argparse.Namespace) -> int:
    payload = _payload(args)
    if args.app:
        app = _import_app(args.app)
        _no_config_for_a_started_app(app, args)
        if args.config:
            _use_config(app, args)
        _no_queue_in_memory(app, args)
        if not app.is_running:
            # Without the http server and cron: the app itself may be running beside this
            # command (its port taken, its cron fires its own).
            with _engine_errors(args.app):
                app.start(serve=False)
        try:
            action = EnqueueAction(queue=args.queue) if args.queue else None
            with _engine_errors(args.app):
                result = app.trigger(args.function_id, payload, action=action)
        except InvocationError as exc:
            raise UsageError(str(exc)) from None
        finally:
            app.shutdown()
        _print_json(result)
        return 0
    queue_name = args.queue or "default"
    config = _config(args)
    queue = config.queues.get(queue_name)
    if queue is None:
        # Worded as the app's enqueue says it, as the command's other enqueue errors are.
        why = (
            " (no config file found: a queue's settings come from --config FILE, "
            "$III_CONFIG or ./iii-config.yaml)"
            if config.source is None
            else ""
        )
        raise UsageError(f"enqueue_error: Queue '{queue_name}' not found{why}")
    try:
        jobs = new_jobs(
            queue,
            args.function_id,
            [payload],
            EnqueueAction(queue=queue_name),
            time.time(),
            batch=False,
        )
    except InvocationError as exc:
        raise UsageError(str(exc)) from None
    ids = _with_store(args, lambda store: store.enqueue(jobs), create=True)
    _print_json({"messageReceiptId": ids[0]})
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from ._runs import Run

    job = _with_store(args, lambda store: store.get(args.id))
    if job is None:
        raise UsageError(f"no run {args.id}")
    run = Run.from_job(job, time.time())
    if args.json:
        _print_json(attrs.asdict(run))
        return 0
    for key, value in attrs.asdict(run).items():
        if key == "error":
            value = f"{value['type']}: {value['message']}" if value else "-"
        elif key.endswith("_at"):
            value = _when(value)
        elif key in ("output", "payload"):
            value = json.dumps(value)
        print(f"{key + ':':14} {value}")
    return 0


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    from ._runs import Run

    now = time.time()
    before = _with_store(args, lambda store: store.cancel(args.id, now))
    if before is None:
        raise UsageError(f"no run {args.id}")
    status = Run.from_job(before, now).status
    if before.state in ("queued", "held"):
        cancelled, message = True, f"cancelled while {status}"
    elif before.state == "running" and before.cancel_requested:
        cancelled, message = False, "running; already asked to stop"
    elif before.state == "running":
        cancelled = True
        message = "running; asked to stop (its process stops it at its next lease renewal)"
    else:
        cancelled, message = False, f"nothing to cancel: the run already {status}"
    if args.json:
        _print_json(
            {"id": args.id, "cancelled": cancelled, "status_before": status, "message": message}
        )
    else:
        print(f"{args.id}: {message}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    app = _import_app(args.app)
    _no_config_for_a_started_app(app, args)
    if app.is_running:  # its module started it on import (register_worker, or start())
        _announce(app, args.app)
        _serve_until_stopped(app)
        return 0
    if args.config:
        _use_config(app, args)
    app.lifecycle_hooks.append(lambda app, tg: _announce(app, args.app))
    with _engine_errors(args.app):
        app.run()
    return 0


def _announce(app: Any, spec: str) -> None:
    """One line on stderr once the app's engine is up: what it serves, how to stop it."""
    store = app.config.store
    where = f"{store.store_method} store"
    if store.store_method == "file_based":
        where += f" {store.file_path}"
    http = app.config.http
    serving = f"; http on {http.host}:{http.port}" if http is not None and http.port else ""
    print(
        f"iii-embedded: serving {spec} ({where}; queues: {', '.join(sorted(app.config.queues))}"
        f"{serving}); Ctrl-C or SIGTERM stops it",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def _engine_errors(spec: str) -> Iterator[None]:
    """An app's engine that cannot start or work for a reason the operator can fix (its
    store damaged or read-only, its http port taken, a config value): one line."""
    try:
        yield
    except (StoreError, ConfigError, HttpListenError) as exc:
        raise UsageError(f"{spec}: {exc}") from None


def _use_config(app: Any, args: argparse.Namespace) -> None:
    """``--config`` for an app its module did not start: that file's queues and store,
    plus the queues the app's code added (its topic subscriptions' among them), which
    its publishes need."""
    config = _config(args)
    app.config = attrs.evolve(config, queues={**config.queues, **app._added_queues})


def _no_queue_in_memory(app: Any, args: argparse.Namespace) -> None:
    """``trigger --queue --app`` stores the job in the app's store through an engine that
    lives as long as the command: with an in-memory store the job would end with it."""
    if not args.queue or app.config.store.store_method == "file_based":
        return
    if app.is_running:
        app.shutdown()
    raise UsageError(
        f"--queue with --app: {args.app} keeps its jobs in memory, so the job would be "
        "lost when this command ends; call the function without --queue (it runs now), "
        "or give the app a file_based store and enqueue while it runs"
    )


def _no_config_for_a_started_app(app: Any, args: argparse.Namespace) -> None:
    """``--config`` cannot apply to an app its module started when it was imported (with
    register_worker or start()): stop that engine (its keeper thread would otherwise hold
    the process) and say so."""
    if app.is_running and args.config:
        app.shutdown()
        raise UsageError(
            f"--config cannot apply to {args.app}: its module already started it "
            "with its own config (register_worker or start())"
        )


def _serve_until_stopped(app: Any) -> None:
    """Keep an app its module started serving until it stops: on SIGINT/SIGTERM through
    the handlers register_worker installed, else through ours."""
    stopped = threading.Event()
    app.on_shutdown(stopped.set)
    signals = (signal.SIGINT, signal.SIGTERM)
    # start()'s SIGTERM handler (_on_sigterm) would stop the engine and then end the
    # process by SIGTERM: here the stop is this command's own, which exits with 0.
    defaults = (signal.SIG_DFL, signal.default_int_handler, _on_sigterm)
    if all(signal.getsignal(s) in defaults for s in signals):
        for s in signals:
            signal.signal(s, lambda signum, frame: app.shutdown())
    try:
        while app.is_running and not stopped.wait(timeout=1.0):
            pass
    except SystemExit:
        # register_worker's SIGTERM handler ends a script that still runs once it has
        # shut the engine down; here the "script" is this wait, and the stop is graceful,
        # as ``run`` reports it.
        if app.is_running:
            raise


# --- the parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="iii-embedded",
        description="Operate iii-embedded apps and their file stores.",
        epilog="Examples:\n  iii-embedded check --config iii-config.yaml\n"
        "  iii-embedded queues --store ./data/queue_store --watch\n"
        "  iii-embedded dlq redrive payment --all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(
        name: str,
        help_text: str,
        examples: str,
        fn: Callable[[argparse.Namespace], int],
        parent: Any = sub,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"Examples:\n{examples}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--config", help="iii-config.yaml (default: $III_CONFIG or ./iii-config.yaml)"
        )
        p.set_defaults(fn=fn)
        return p

    def with_store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", help="the store directory (default: the config's file_path)")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "run",
        "Import MODULE:APP and run it until SIGINT/SIGTERM.",
        "  iii-embedded run myapp:iii\n  iii-embedded run myapp:iii --config prod.yaml",
        cmd_run,
    )
    p.add_argument("app", metavar="MODULE:APP")

    p = command(
        "check",
        "Validate a config and list its queues.",
        "  iii-embedded check\n  iii-embedded check --config iii-config.yaml --json",
        cmd_check,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "queues",
        "One line per queue: ready, delayed, running, held, dead jobs.",
        "  iii-embedded queues\n  iii-embedded queues --store ./data/queue_store --watch",
        cmd_queues,
    )
    with_store(p)
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument(
        "--interval", type=_positive_seconds, default=2.0, help="seconds between refreshes"
    )
    p.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)

    p = command(
        "cron",
        "The last fire of each cron job: when, which process took it, whether it runs.",
        "  iii-embedded cron\n  iii-embedded cron --store ./data/queue_store --json",
        cmd_cron,
    )
    with_store(p)

    dlq = sub.add_parser(
        "dlq",
        help="Inspect and work the dead-letter queues.",
        description="Inspect and work the dead-letter queues.",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, parser_class=_Parser)
    p = command(
        "list",
        "List the dead jobs of QUEUE.",
        "  iii-embedded dlq list payment",
        cmd_dlq_list,
        dlq_sub,
    )
    with_store(p)
    p.add_argument("queue")
    p.add_argument(
        "--limit", type=_positive_int, default=50, help="at most this many jobs (default 50)"
    )
    p = command(
        "show",
        "Show one dead job: payload, attempts, error and traceback.",
        "  iii-embedded dlq show payment 0b9d…",
        cmd_dlq_show,
        dlq_sub,
    )
    with_store(p)
    p.add_argument("queue")
    p.add_argument("id")
    for verb, fn, what in (
        ("redrive", cmd_dlq_redrive, "Send dead jobs back to their queue"),
        ("discard", cmd_dlq_discard, "Delete dead jobs"),
    ):
        p = command(
            verb,
            f"{what} (the ids given, or --all). Resumable if interrupted.",
            f"  iii-embedded dlq {verb} payment ID1 ID2\n  iii-embedded dlq {verb} payment --all",
            fn,
            dlq_sub,
        )
        with_store(p)
        p.add_argument("queue")
        p.add_argument("ids", nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every dead job of the queue")
        p.add_argument("--progress", action="store_true", help="show progress on stderr")

    p = command(
        "trigger",
        "Enqueue FUNCTION_ID into a store, or call it through --app.",
        '  iii-embedded trigger emails::send --payload \'{"to": "a@b.c"}\' --queue email\n'
        "  iii-embedded trigger math::add --payload '{\"a\": 1}' --app myapp:iii",
        cmd_trigger,
    )
    with_store(p)
    p.add_argument("function_id")
    p.add_argument("--payload", help="JSON payload")
    p.add_argument("--queue", help="enqueue on this queue (default: 'default' for a store)")
    p.add_argument("--app", metavar="MODULE:APP", help="call through this app instead")

    runs = sub.add_parser("runs", help="Inspect runs.", description="Inspect runs.")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, parser_class=_Parser)
    p = command(
        "show",
        "Show a run's status, attempts, output or error.",
        "  iii-embedded runs show 0b9d…",
        cmd_runs_show,
        runs_sub,
    )
    with_store(p)
    p.add_argument("id")
    p = command(
        "cancel",
        "Cancel a run: a queued, delayed or held one at once; a running one is asked to stop.",
        "  iii-embedded runs cancel 0b9d…",
        cmd_runs_cancel,
        runs_sub,
    )
    with_store(p)
    p.add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``iii-embedded`` and ``python -m iii_embedded``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        result: int = args.fn(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return result
    except UsageError as exc:
        print(f"iii-embedded: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly. Python would flush stdout
        # again at exit and complain, so stdout now goes nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
