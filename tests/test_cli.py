"""The iii-embedded command (SPEC §10): real subprocesses against a file store while an
app runs in another process, and every user-mistake path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from iii_embedded import III, TriggerAction
from iii_embedded._stores._base import PROCESS_HOST
from iii_embedded._stores._sqlite import SQLiteStore
from iii_embedded.testing import VirtualClock, drain

CONFIG = """\
workers:
  - name: iii-queue
    config:
      queue_configs:
        work: {max_retries: 2, backoff_ms: 10, concurrency: 4, poll_interval_ms: 20}
        ledger: {type: fifo, message_group_field: account_id}
      adapter:
        name: builtin
        config: {store_method: file_based, file_path: ./store}
"""

APP = """\
from pathlib import Path
from iii_embedded import III

iii = III.from_config(Path(__file__).with_name("iii-config.yaml"), shutdown_grace_ms=1000)


@iii.function("flaky")
def flaky(data):
    if not Path(__file__).with_name("fixed").exists():
        raise ValueError(f"not fixed yet: {data['n']}")
    return {"done": data["n"]}


iii.register_function("add", lambda d: d["a"] + d["b"])
CONFIG = "not an app"
iii.lifecycle_hooks.append(lambda app, tg: Path(__file__).with_name("ready").write_text("1"))
"""


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iii_embedded", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def run_app(project: Path, spec: str) -> subprocess.Popen[str]:
    """``iii-embedded run SPEC`` in ``project``, once its app wrote the file ``ready``."""
    app = subprocess.Popen(
        [sys.executable, "-m", "iii_embedded", "run", spec],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (project / "ready").exists() or app.poll() is not None)
        assert app.poll() is None, app.communicate()
    except BaseException:
        app.kill()
        app.communicate()
        raise
    return app


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "iii-config.yaml").write_text(CONFIG)
    (tmp_path / "myapp.py").write_text(APP)
    return tmp_path


def queue_row(project: Path, queue: str) -> dict[str, Any]:
    out = cli(project, "queues", "--json")
    assert out.returncode == 0, out.stderr
    return next(q for q in json.loads(out.stdout) if q["queue"] == queue)


@pytest.mark.slow
def test_inspect_a_failing_queue_fix_and_redrive_while_the_app_runs(project: Path) -> None:
    app = run_app(project, "myapp:iii")
    try:
        ids = []
        for n in range(3):
            out = cli(
                project, "trigger", "flaky", "--payload", json.dumps({"n": n}), "--queue", "work"
            )
            assert out.returncode == 0, out.stderr
            ids.append(json.loads(out.stdout)["messageReceiptId"])
        wait_for(lambda: queue_row(project, "work")["dead"] == 3)

        table = cli(project, "queues")
        assert table.returncode == 0
        header, _, *rows = table.stdout.splitlines()
        assert header.split() == [
            "queue",
            "ready",
            "delayed",
            "running",
            "held",
            "dead",
            "oldest",
            "ready",
            "throughput",
        ]
        assert next(r for r in rows if r.startswith("work")).split()[1:6] == [
            "0",
            "0",
            "0",
            "0",
            "3",
        ]

        listed = cli(project, "dlq", "list", "work")
        assert listed.returncode == 0
        assert all(i in listed.stdout for i in ids)

        shown = cli(project, "dlq", "show", "work", ids[1])
        assert shown.returncode == 0
        assert "attempts:      2" in shown.stdout
        assert "error:         ValueError: not fixed yet: 1" in shown.stdout
        assert "Traceback (most recent call last):" in shown.stdout
        assert 'raise ValueError(f"not fixed yet' in shown.stdout
        assert '"n": 1' in shown.stdout
        elsewhere = cli(project, "dlq", "show", "default", ids[1])
        assert elsewhere.returncode == 2
        assert f"no dead job {ids[1]} in queue 'default' (that job is in queue 'work')" in (
            elsewhere.stderr
        )

        (project / "fixed").write_text("the handler is fixed")
        redriven = cli(project, "dlq", "redrive", "work", "--all", "--progress")
        assert redriven.returncode == 0, redriven.stderr
        assert redriven.stdout.strip() == "redriven 3 job(s) of 'work'"
        assert "redrive [" in redriven.stderr and "3/3" in redriven.stderr
        wait_for(lambda: queue_row(project, "work")["completed_kept"] == 3)
        assert queue_row(project, "work")["dead"] == 0
        run = cli(project, "runs", "show", ids[0], "--json")
        assert json.loads(run.stdout)["status"] == "completed"
        assert json.loads(run.stdout)["output"] == {"done": 0}
        alive = cli(project, "dlq", "show", "work", ids[0])
        assert alive.returncode == 2
        assert "(that job is not dead: it is completed)" in alive.stderr
    finally:
        app.send_signal(signal.SIGTERM)
        _, err = app.communicate(timeout=30)
    assert app.returncode == 0, err
    assert "Traceback" not in err


def test_run_says_on_stderr_what_it_serves_once_the_engine_is_up(project: Path) -> None:
    """Before, ``run`` was silent until a warning: nothing said the app was up, on which
    store, or how to stop it."""
    app = run_app(project, "myapp:iii")
    app.send_signal(signal.SIGTERM)
    _, err = app.communicate(timeout=30)
    assert app.returncode == 0, err
    assert err.splitlines()[0] == (
        f"iii-embedded: serving myapp:iii (file_based store {project / 'store'}; "
        "queues: default, ledger, work); Ctrl-C or SIGTERM stops it"
    )


def test_check_lists_each_queues_settings(project: Path) -> None:
    out = cli(project, "check")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].startswith("config: iii-config.yaml  store: file_based")
    work = next(line for line in lines if line.startswith("work"))
    assert work.split() == ["work", "standard", "4", "2", "0.01s", "-"]
    ledger = next(line for line in lines if line.startswith("ledger"))
    assert ledger.split()[-1] == "account_id"


def dead_jobs_in(project: Path, count: int) -> list[str]:
    """``count`` jobs of the project's ``work`` queue, dead in its file store (run by an
    app in this process, on a virtual clock)."""
    iii = III.from_config(project / "iii-config.yaml", clock=VirtualClock(), shutdown_grace_ms=0)

    def broken(_: Any) -> None:
        raise ValueError("broken")

    iii.register_function("broken", broken)

    async def main() -> list[str]:
        async with iii.running():
            ids = [
                (await iii.trigger_async("broken", n, action=TriggerAction.Enqueue(queue="work")))[
                    "messageReceiptId"
                ]
                for n in range(count)
            ]
            await drain(iii)
        return ids

    return anyio.run(main)


def test_dlq_discard_one_then_all_and_its_mistakes(project: Path) -> None:
    one, two, three = dead_jobs_in(project, 3)

    out = cli(project, "dlq", "discard", "work", one)
    assert (out.returncode, out.stdout.strip()) == (0, "discarded 1 job(s) of 'work'")
    listed = cli(project, "dlq", "list", "work").stdout
    assert one not in listed and two in listed and three in listed

    out = cli(project, "dlq", "discard", "work", "--all", "--progress")
    assert (out.returncode, out.stdout.strip()) == (0, "discarded 2 job(s) of 'work'")
    assert "2/2" in out.stderr
    assert queue_row(project, "work")["dead"] == 0

    nothing = cli(project, "dlq", "discard", "work")
    unknown = cli(project, "dlq", "discard", "nope", "--all")
    assert nothing.returncode == 2 and len(nothing.stderr.strip().splitlines()) == 1
    assert unknown.returncode == 2
    assert "Queue 'nope' not found" in unknown.stderr
    assert "Traceback" not in nothing.stderr + unknown.stderr


def test_the_console_script_is_the_same_command(project: Path) -> None:
    script = Path(sys.executable).with_name("iii-embedded")
    done = subprocess.run(
        [str(script), "check"], cwd=project, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == cli(project, "check").stdout


@pytest.mark.slow
def test_run_serves_an_app_its_module_started_with_register_worker(project: Path) -> None:
    (project / "worker.py").write_text(
        "from pathlib import Path\n"
        "from iii_embedded import register_worker\n"
        "iii = register_worker()\n"
        "iii.register_function('touch', lambda d: Path(d['path']).write_text('ran'))\n"
        "Path('ready').write_text('1')\n"
    )
    app = run_app(project, "worker:iii")
    try:
        ran = project / "ran"
        out = cli(project, "trigger", "touch", "--payload", json.dumps({"path": str(ran)}))
        assert out.returncode == 0, out.stderr
        wait_for(lambda: ran.exists() or app.poll() is not None)  # the app took the job
        assert ran.read_text() == "ran"
        with_config = cli(project, "run", "worker:iii", "--config", "iii-config.yaml")
        assert with_config.returncode == 2
        assert "already started it" in with_config.stderr
        # trigger --app calls through the engine the module started, then stops it.
        called = cli(
            project,
            "trigger",
            "touch",
            "--payload",
            json.dumps({"path": "x"}),
            "--app",
            "worker:iii",
        )
        assert called.returncode == 0, called.stderr
        assert (project / "x").read_text() == "ran"
    finally:
        app.send_signal(signal.SIGTERM)
        _, err = app.communicate(timeout=30)
    assert app.returncode == 0, err
    assert "Traceback" not in err


def test_run_stops_an_app_its_module_started_with_start_on_sigterm(project: Path) -> None:
    """``start()`` makes SIGTERM stop its engine where the program leaves SIGTERM's
    default action; ``run`` of a module that called it must still take SIGTERM as its
    own graceful stop (exit status 0), not as the end of a program killed by SIGTERM."""
    (project / "started.py").write_text(
        "from pathlib import Path\n"
        "from iii_embedded import III\n"
        "iii = III.from_config('iii-config.yaml').start()\n"
        "Path('ready').write_text('1')\n"
    )
    app = run_app(project, "started:iii")
    app.send_signal(signal.SIGTERM)
    _, err = app.communicate(timeout=30)
    assert app.returncode == 0, err
    assert "Traceback" not in err


def test_trigger_through_the_app_calls_synchronously(project: Path) -> None:
    out = cli(project, "trigger", "add", "--payload", '{"a": 2, "b": 40}', "--app", "myapp:iii")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 42


def test_check_reports_an_unknown_key_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "iii-config.yaml").write_text(
        "queue_configs:\n  payment:\n    concurrency: 2\n    max_retry: 4\n"
    )
    out = cli(tmp_path, "check")
    assert out.returncode == 2
    assert out.stderr.strip().startswith(
        "iii-embedded: error: iii-config.yaml:4: queue 'payment': unknown key 'max_retry'"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "list", "nope"], "Queue 'nope' not found"),
        (["dlq", "show", "work", "no-such-id"], "no dead job no-such-id in queue 'work'"),
        (["dlq", "redrive", "work"], "give job ids or --all"),
        (["trigger", "flaky", "--payload", "{nope"], "--payload is not valid JSON"),
        (
            ["trigger", "flaky", "--queue", "ledger", "--payload", "{}"],
            "FIFO queue 'ledger' requires field 'account_id'",
        ),
        (["trigger", "flaky", "--queue", "missing"], "enqueue_error: Queue 'missing' not found"),
        (["queues", "--store", "/nonexistent/store"], "no store at /nonexistent/store"),
        (["cron", "--store", "/nonexistent/store"], "no store at /nonexistent/store"),
        (
            ["queues", "--store", "store/iii-queue.db"],
            "no store at store/iii-queue.db: that is the store's database file; "
            "give its directory, store",
        ),
        (
            ["dlq", "list", "work", "--store", "myapp.py"],
            "no store at myapp.py: it is a file; a store is the directory that holds iii-queue.db",
        ),
        (["runs", "show", "no-such-run"], "no run no-such-run"),
        (["run", "nomodule:app"], "cannot import 'nomodule'"),
        (["run", "myapp"], "expected MODULE:APP"),
        (["run", "myapp:CONFIG"], "is not an III app"),
        (["run", "myapp:nothere"], "module 'myapp' has no attribute 'nothere'"),
        (
            ["run", "myapp.py:iii"],
            "cannot import 'myapp.py': MODULE is a module's name, not a file: try 'myapp:iii'",
        ),
        (
            ["trigger", "add", "--app", "./pkg/myapp.py:iii"],
            "MODULE is a module's name, not a file: try 'pkg.myapp:iii'",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["queues", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    project: Path, args: list[str], message: str
) -> None:
    # A store must exist for the store commands to get as far as the mistake.
    assert cli(project, "trigger", "add", "--payload", '{"a": 1, "b": 2}').returncode == 0
    out = cli(project, *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_directory_in_place_of_the_database_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "odd" / "iii-queue.db").mkdir(parents=True)
    out = cli(tmp_path, "queues", "--store", "odd")
    assert out.returncode == 2
    assert out.stderr == (
        f"iii-embedded: error: {tmp_path / 'odd' / 'iii-queue.db'}: this is a directory, "
        "where the store keeps its database file; move it away, or point file_path at "
        "another directory\n"
    )


def test_an_in_memory_config_has_no_store_to_inspect(tmp_path: Path) -> None:
    (tmp_path / "iii-config.yaml").write_text("queue_configs:\n  q: {}\n")
    out = cli(tmp_path, "queues")
    assert out.returncode == 2
    assert "uses an in-memory store; nothing to inspect from outside the app" in out.stderr


RUNS_AT_IMPORT = """\
from iii_embedded import III
iii = III.from_config("iii-config.yaml", shutdown_grace_ms=0)
iii.register_function("hello", lambda data: "hi")
iii.run()
"""


@pytest.mark.parametrize(
    "args", [["run", "script:iii"], ["trigger", "hello", "--app", "script:iii"]]
)
def test_an_app_module_that_calls_run_when_imported_is_refused_in_one_line(
    project: Path, args: list[str]
) -> None:
    """A script that ends with ``iii.run()`` (not under ``if __name__ == "__main__":``)
    served the app while the command imported it: ``trigger --app`` never returned, and
    ``run`` ran the app a second time after the first Ctrl-C."""
    (project / "script.py").write_text(RUNS_AT_IMPORT)
    out = subprocess.run(
        [sys.executable, "-m", "iii_embedded", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=20,
    )
    line = one_line_error(out)
    assert line == (
        "iii-embedded: error: script:iii: the module calls iii.run() when it is imported "
        f"({project / 'script.py'}:4): the command runs the app itself, so call run() "
        'only under `if __name__ == "__main__":`'
    )


def test_without_a_config_file_the_commands_say_none_was_found(project: Path) -> None:
    """Run where there is no iii-config.yaml: the store commands say that no config was
    found (not that "the default config" is in memory), and an enqueue into a queue the
    store has but no config names says where its settings would come from."""
    assert cli(project, "trigger", "add", "--payload", '{"a": 1, "b": 2}').returncode == 0
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    line = one_line_error(cli(elsewhere, "queues"))
    assert line == (
        "iii-embedded: error: no config file found (no --config, no $III_CONFIG, no "
        "./iii-config.yaml here): give --store DIR or --config FILE"
    )
    store = str(project / "store")
    line = one_line_error(cli(elsewhere, "trigger", "add", "--store", store, "--queue", "work"))
    assert line == (
        "iii-embedded: error: enqueue_error: Queue 'work' not found (no config file found: "
        "a queue's settings come from --config FILE, $III_CONFIG or ./iii-config.yaml)"
    )
    assert cli(elsewhere, "queues", "--store", store).returncode == 0


def test_every_command_has_help_with_examples(tmp_path: Path) -> None:
    for args in (
        ["--help"],
        ["run", "-h"],
        ["check", "-h"],
        ["queues", "-h"],
        ["dlq", "list", "-h"],
        ["dlq", "show", "-h"],
        ["dlq", "redrive", "-h"],
        ["dlq", "discard", "-h"],
        ["trigger", "-h"],
        ["runs", "show", "-h"],
        ["cron", "-h"],
    ):
        out = cli(tmp_path, *args)
        assert out.returncode == 0, args
        assert "Examples:" in out.stdout, args


def test_queues_watch_refreshes_and_shows_throughput(project: Path) -> None:
    assert cli(project, "trigger", "add", "--payload", '{"a": 1, "b": 2}').returncode == 0
    out = cli(project, "queues", "--watch", "--iterations", "2", "--interval", "0.05")
    assert out.returncode == 0, out.stderr
    tables = [line for line in out.stdout.splitlines() if line.startswith("default")]
    assert len(tables) == 2  # two refreshes
    first, second = tables[0].split(), tables[1].split()
    assert first[1] == "1"  # one job ready
    assert first[-1] == "-" and second[-1] == "0.0/s"  # a rate once there are two samples


def test_cron_shows_each_jobs_last_fire_and_whether_it_still_runs(project: Path) -> None:
    assert cli(project, "trigger", "add", "--payload", '{"a": 1, "b": 2}').returncode == 0
    out = cli(project, "cron")
    assert (out.returncode, out.stdout.strip()) == (0, "no cron job has fired in this store yet")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process of this host that no longer exists
    host = PROCESS_HOST
    alive, dead = f"{host}:{os.getpid()}:a", f"{host}:{gone.pid}:b"
    now = time.time()

    async def take_fires() -> None:
        store = SQLiteStore(project / "store")
        await store.open()
        try:
            for job_id, owner in (("billing", alive), ("cleanup", dead), ("report", alive)):
                taken = await store.claim_fire(
                    job_id, now - 60, owner=owner, now=now, lease_until=now + 3600
                )
                assert taken
            await store.end_fires(alive, ["report"])
        finally:
            await store.aclose()

    anyio.run(take_fires)
    out = cli(project, "cron", "--json")
    assert out.returncode == 0, out.stderr
    fires = json.loads(out.stdout)
    assert [(f["job_id"], f["owner"], f["running"], f["holds"]) for f in fires] == [
        ("billing", alive, True, True),
        ("cleanup", dead, True, False),
        ("report", alive, False, False),
    ]
    assert {f["scheduled"] for f in fires} == {now - 60}

    out = cli(project, "cron")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip()}
    assert "running (lease until" in lines["billing"]
    assert "stopped unfinished (process gone or lease expired)" in lines["cleanup"]
    assert lines["report"].rstrip().endswith("ended")
    assert dead in lines["cleanup"]


@pytest.mark.parametrize("interval", ["-1", "0", "soon", "1e300", "86401", "inf", "nan"])
def test_a_watch_interval_that_is_not_a_positive_number_is_a_usage_error(
    tmp_path: Path, interval: str
) -> None:
    out = cli(tmp_path, "queues", "--watch", "--interval", interval)
    assert out.returncode == 2
    assert "argument --interval:" in out.stderr and interval in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            'from iii_embedded import III\niii = III.from_config("bad.yaml")\n',
            "importing 'broken' failed: bad.yaml:3: queue 'q': concurrency must be an "
            "integer >= 1, got 'ten'",
        ),
        (
            "from iii_embedded import III\niii = III()\nraise KeyError('db_url')\n",
            "importing 'broken' failed: KeyError: 'db_url' (",
        ),
    ],
    ids=["config_error", "app_error"],
)
def test_an_app_that_fails_to_import_is_one_line_naming_why(
    tmp_path: Path, source: str, message: str
) -> None:
    (tmp_path / "bad.yaml").write_text("queue_configs:\n  q:\n    concurrency: ten\n")
    (tmp_path / "broken.py").write_text(source)
    for args in (["run", "broken:iii"], ["trigger", "f", "--app", "broken:iii"]):
        out = cli(tmp_path, *args)
        assert out.returncode == 2, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert message in out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"queue_configs:\n  caf\xe9: {max_retries: 2}\n",
            "iii-embedded: error: iii-config.yaml: not UTF-8 text (byte 0xe9 at offset 20)",
        ),
        (
            b"adapter:\n  config: {store_method: file_based, file_path: ./s,\n"
            b"    result_retention_ms: 100000000000000000000}\n",
            "iii-embedded: error: iii-config.yaml:3: result_retention_ms must be at most "
            "9223372036854775807, got 100000000000000000000",
        ),
    ],
    ids=["not_utf8", "huge_ms"],
)
def test_check_reports_a_config_it_cannot_read_in_one_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    (tmp_path / "iii-config.yaml").write_bytes(content)
    out = cli(tmp_path, "check")
    assert (out.returncode, out.stderr.strip()) == (2, message)


class _StillFailing:
    """A file store, seen by the command, whose app fails each redriven job again at once:
    after each redrive the jobs it moved are claimed and die (for the first ``rounds``
    redrives, so that a command that chases them still ends)."""

    def __init__(self, store: Any, rounds: int) -> None:
        self._store = store
        self.rounds = rounds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def redrive(self, queue: str, ids: Any, now: float) -> list[str]:
        from iii_embedded._stores._base import ErrorInfo, Outcome

        moved: list[str] = await self._store.redrive(queue, ids, now)
        if self.rounds > 0 and moved:
            self.rounds -= 1
            claimed = await self._store.claim(
                queue, fifo=False, limit=len(moved), now=now, owner="app", lease_until=now + 60
            )
            assert sorted(j.id for j in claimed) == sorted(moved)
            await self._store.finish(
                [
                    Outcome(
                        job_id=j.id,
                        kind="dead",
                        owner="app",
                        attempt=j.attempts,
                        at=now,
                        error=ErrorInfo(type="ValueError", message="still broken"),
                    )
                    for j in claimed
                ]
            )
        return moved


@pytest.mark.parametrize("count", [3, 1203], ids=["one_chunk", "three_chunks"])
def test_dlq_redrive_all_takes_each_job_dead_at_the_start_once(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], count: int
) -> None:
    """A job that dies again while ``--all`` runs is not redriven a second time, and the
    count is the jobs that were dead (the command chased them while the DLQ was not empty)."""
    from iii_embedded import _cli

    dead_jobs_in(project, count)
    real_open = _cli.open_store
    monkeypatch.setattr(_cli, "open_store", lambda config: _StillFailing(real_open(config), 5))
    monkeypatch.chdir(project)
    assert _cli.main(["dlq", "redrive", "work", "--all", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"redriven {count} job(s) of 'work'"
    assert err.rstrip().endswith(f"{count}/{count}")
    assert "had left" not in err
    # Each job died again once, after its redrive, and the command left it dead.
    assert queue_row(project, "work")["dead"] == count


class _OthersRedrive:
    """A store another process redrives the oldest dead job of right after the command
    first reads the DLQ."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.taken: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _after_read(self, queue: str) -> None:
        if not self.taken:
            self.taken = await self._store.redrive(queue, [self._oldest], 0.0)

    async def list_dead(self, queue: str, **page: Any) -> Any:
        jobs = await self._store.list_dead(queue, **page)
        self._oldest = self._oldest if self.taken else jobs[0].id
        await self._after_read(queue)
        return jobs

    async def dead_ids(self, queue: str) -> list[str]:
        ids: list[str] = await self._store.dead_ids(queue)
        self._oldest = ids[0]
        await self._after_read(queue)
        return ids


def test_dlq_redrive_all_misses_no_job_when_another_process_redrives_meanwhile(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading the DLQ's ids by pages of offsets skipped the job a concurrent redrive moved
    to the previous page; every job still dead must be redriven."""
    from iii_embedded import _cli

    dead_jobs_in(project, 1203)
    real_open = _cli.open_store
    stores: list[_OthersRedrive] = []

    def opened(config: Any) -> _OthersRedrive:
        stores.append(_OthersRedrive(real_open(config)))
        return stores[-1]

    monkeypatch.setattr(_cli, "open_store", opened)
    monkeypatch.chdir(project)
    assert _cli.main(["dlq", "redrive", "work", "--all"]) == 0
    out, err = capsys.readouterr()
    assert len(stores[0].taken) == 1
    assert out.strip() == "redriven 1202 job(s) of 'work'"
    assert err.strip() == (
        "1 id(s) had left the dead-letter queue of 'work' before the command reached them"
    )
    assert queue_row(project, "work")["dead"] == 0


@pytest.mark.parametrize("limit", ["0", "-1", "many"])
def test_dlq_list_limit_must_be_a_positive_integer(project: Path, limit: str) -> None:
    dead_jobs_in(project, 2)
    out = cli(project, "dlq", "list", "work", "--limit", limit)
    assert out.returncode == 2, out.stdout
    assert out.stdout == ""
    assert "argument --limit:" in out.stderr and repr(limit) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_dlq_list_says_when_it_shows_only_part_and_marks_cut_errors(project: Path) -> None:
    """A list cut at --limit says how many jobs are dead in all, and an error cut to fit
    its column ends with an ellipsis, so neither reads as the whole."""
    iii = III.from_config(project / "iii-config.yaml", clock=VirtualClock(), shutdown_grace_ms=0)

    def refused(_: Any) -> None:
        raise ConnectionError("gateway https://pay.example refused the connection " + "x" * 40)

    iii.register_function("refused", refused)

    async def main() -> None:
        async with iii.running():
            await iii.batch_trigger_async("refused", [1, 2, 3], queue="work")
            await drain(iii)

    anyio.run(main)
    out = cli(project, "dlq", "list", "work", "--limit", "2")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()[2:]
    assert len(rows) == 2
    cut = "ConnectionError: gateway https://pay.example refused the co…"
    assert all(row.endswith(cut) for row in rows), rows
    assert out.stderr.strip() == "2 of the 3 dead jobs of 'work' shown (--limit N shows more)"
    whole = cli(project, "dlq", "list", "work")
    assert len(whole.stdout.strip().splitlines()[2:]) == 3 and whole.stderr == ""


def test_dlq_list_limit_lists_that_many(project: Path) -> None:
    ids = dead_jobs_in(project, 3)
    out = cli(project, "dlq", "list", "work", "--limit", "2", "--json")
    assert out.returncode == 0, out.stderr
    listed = [d["id"] for d in json.loads(out.stdout)]
    assert len(listed) == 2 and set(listed) < set(ids)


def test_dlq_redrive_of_a_repeated_id_counts_it_once(project: Path) -> None:
    one, two, _ = dead_jobs_in(project, 3)
    out = cli(project, "dlq", "redrive", "work", one, two, one, "--progress")
    assert (out.returncode, out.stdout.strip()) == (0, "redriven 2 job(s) of 'work'")
    assert out.stderr.rstrip().endswith("] 2/2")
    assert "not in the dead-letter queue" not in out.stderr
    missing = cli(project, "dlq", "discard", "work", one, "no-such-id", "no-such-id")
    assert missing.stdout.strip() == "discarded 0 job(s) of 'work'"
    assert missing.stderr.strip() == (
        f"2 id(s) were not in the dead-letter queue of 'work': {one}, no-such-id"
    )
    assert missing.returncode == 1


def test_dlq_redrive_and_discard_of_unknown_ids_name_them_and_exit_1(project: Path) -> None:
    """A mistyped id is not a success: the ids found are still handled, the others are
    named on stderr, and the exit status says something was not done."""
    one, two = dead_jobs_in(project, 2)
    out = cli(project, "dlq", "redrive", "work", one, "01a2-typo")
    assert (out.returncode, out.stdout.strip()) == (1, "redriven 1 job(s) of 'work'")
    assert out.stderr.strip() == "1 id(s) were not in the dead-letter queue of 'work': 01a2-typo"
    out = cli(project, "dlq", "discard", "work", "nope", "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"queue": "work", "discarded": 0}
    assert out.stderr.strip() == "1 id(s) were not in the dead-letter queue of 'work': nope"
    out = cli(project, "dlq", "discard", "work", two)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (
        0,
        "discarded 1 job(s) of 'work'",
        "",
    )


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The message of a command that failed with one line on stderr and exit status 2."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


TOUCH_APP = """\
from pathlib import Path
from iii_embedded import III
iii = III.from_config("iii-config.yaml", shutdown_grace_ms=0)
iii.register_function("touch", lambda d: Path("touched").write_text(str(d)))
"""


def test_run_and_trigger_app_on_a_store_that_cannot_be_used_say_so_in_one_line(
    project: Path,
) -> None:
    """A damaged store (the same StoreError path as a read-only one, whose message the
    store's own fault tests check as an unprivileged user)."""
    (project / "app.py").write_text(TOUCH_APP)
    store = project / "store"
    store.mkdir()
    (store / "iii-queue.db").write_bytes(b"not a database, " * 256)
    for args in (
        ["run", "app:iii"],
        ["trigger", "touch", "--payload", "1", "--app", "app:iii"],
    ):
        line = one_line_error(cli(project, *args))
        assert line.startswith("iii-embedded: error: app:iii: "), line
        assert "the file is not a valid SQLite database" in line
    assert not (project / "touched").exists()


def http_project(tmp_path: Path, port: int) -> Path:
    (tmp_path / "iii-config.yaml").write_text(
        f"workers:\n  - name: iii-http\n    config: {{port: {port}, host: 127.0.0.1}}\n"
    )
    (tmp_path / "app.py").write_text(TOUCH_APP)
    return tmp_path


def test_a_taken_http_port_stops_run_in_one_line_and_trigger_app_does_not_serve_http(
    tmp_path: Path,
) -> None:
    import socket

    holder = socket.socket()  # the port the app's http worker wants is taken (by the app)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    project = http_project(tmp_path, port)
    try:
        line = one_line_error(cli(project, "run", "app:iii"))
        assert line == (
            f"iii-embedded: error: app:iii: the http server cannot listen on 127.0.0.1:{port}: "
            "address already in use"
        )
        # trigger --app starts no http server (nor cron): it works beside the running app.
        out = cli(project, "trigger", "touch", "--payload", '"hi"', "--app", "app:iii")
        assert out.returncode == 0, out.stderr
        assert (project / "touched").read_text() == "hi"
    finally:
        holder.close()


TOPIC_APP = """\
import threading
from iii_embedded import III
iii = III(shutdown_grace_ms=0)
seen = []
arrived = threading.Event()
def on_order(d):
    seen.append(d)
    arrived.set()
iii.register_function("on_order", on_order)
iii.register_trigger({"type": "queue", "function_id": "on_order", "config": {"topic": "orders"}})
def pub(d):
    iii.trigger({"function_id": "enqueue", "payload": {"topic": "orders", "data": d}})
    return {"arrived": arrived.wait(timeout=30), "seen": seen}
iii.register_function("pub", pub)
"""


def test_trigger_app_with_config_keeps_the_queues_of_its_topic_subscriptions(
    tmp_path: Path,
) -> None:
    (tmp_path / "other.yaml").write_text("queue_configs:\n  work: {max_retries: 2}\n")
    (tmp_path / "app.py").write_text(TOPIC_APP)
    out = cli(
        tmp_path,
        "trigger",
        "pub",
        "--payload",
        '{"n": 1}',
        "--app",
        "app:iii",
        "--config",
        "other.yaml",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"arrived": True, "seen": [{"n": 1}]}


def test_trigger_queue_through_an_app_whose_store_is_in_memory_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "app.py").write_text(
        "from pathlib import Path\nfrom iii_embedded import III\niii = III()\n"
        "iii.register_function('touch', lambda d: Path('touched').write_text('ran'))\n"
    )
    out = cli(tmp_path, "trigger", "touch", "--queue", "default", "--app", "app:iii")
    line = one_line_error(out)
    assert "--queue with --app: app:iii keeps its jobs in memory" in line
    assert out.stdout == ""
    assert not (tmp_path / "touched").exists()
    # Without --queue the call runs now, through the app.
    assert cli(tmp_path, "trigger", "touch", "--app", "app:iii").returncode == 0
    assert (tmp_path / "touched").read_text() == "ran"


def test_trigger_into_a_store_dir_given_explicitly_needs_an_existing_store(
    project: Path,
) -> None:
    line = one_line_error(cli(project, "trigger", "add", "--payload", "1", "--store", "./stroe"))
    assert line == "iii-embedded: error: no store at stroe (no iii-queue.db there)"
    assert not (project / "stroe").exists()
    # The store the config names is created by the first enqueue, and --store finds it then.
    assert cli(project, "trigger", "add", "--payload", "1").returncode == 0
    out = cli(project, "trigger", "add", "--payload", "2", "--store", "./store")
    assert out.returncode == 0, out.stderr
    assert queue_row(project, "default")["ready"] == 2


def test_output_into_a_closed_pipe_ends_quietly(project: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes (``| head`` done)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "iii_embedded", "check"],
            cwd=project,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (0.04, "0.0s"), (12.34, "12.3s"), (227.9, "3m47s"), (7_530.0, "2h05m")],
)
def test_ages_are_shown_in_whole_units(seconds: float | None, shown: str) -> None:
    from iii_embedded import _cli

    assert _cli._age(seconds) == shown


def test_runs_cancel_cancels_a_queued_or_held_run_and_says_what_it_did(project: Path) -> None:
    """A run enqueued for a function no app has (a mistyped id) would wait for ever
    (held, once an app claims it): ``runs cancel`` is how an operator ends it, as any
    queued run. Asking again, or for an unknown id, says so."""
    held = json.loads(cli(project, "trigger", "flakyy", "--queue", "work").stdout)
    queued = json.loads(cli(project, "trigger", "flaky", "--payload", '{"n": 1}').stdout)
    held_id, queued_id = held["messageReceiptId"], queued["messageReceiptId"]
    first = cli(project, "runs", "cancel", queued_id)
    again = cli(project, "runs", "cancel", queued_id, "--json")
    as_json = cli(project, "runs", "cancel", held_id, "--json")
    shown = cli(project, "runs", "show", held_id, "--json")
    missing = cli(project, "runs", "cancel", "no-such-run")
    assert (first.returncode, first.stdout) == (0, f"{queued_id}: cancelled while queued\n")
    assert json.loads(again.stdout) == {
        "id": queued_id,
        "cancelled": False,
        "status_before": "cancelled",
        "message": "nothing to cancel: the run already cancelled",
    }
    assert json.loads(as_json.stdout)["cancelled"] is True
    assert json.loads(shown.stdout)["status"] == "cancelled"
    assert one_line_error(missing) == "iii-embedded: error: no run no-such-run"


def test_runs_show_prints_the_payload_and_output_as_json(project: Path) -> None:
    """``runs show`` prints the payload as ``dlq show`` does, as JSON (it printed Python's
    repr: single quotes, ``None``, ``True``), so it can be pasted into ``--payload``."""
    payload = {"n": 1, "note": None, "ok": True}
    queued = cli(project, "trigger", "flaky", "--payload", json.dumps(payload))
    receipt = json.loads(queued.stdout)["messageReceiptId"]
    shown = cli(project, "runs", "show", receipt)
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split(":", 1) for line in shown.stdout.splitlines())
    assert lines["payload"].strip() == '{"n": 1, "note": null, "ok": true}'
    assert lines["status"].strip() == "queued"
    assert lines["output"].strip() == "null"
    assert lines["error"].strip() == "-"  # as a missing time, not Python's None
