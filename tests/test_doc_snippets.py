"""The Python blocks of README.md and docs/*.md that are complete programs run, and print
what their comments say. (docs/triggering.md has its own test: test_triggering_doc.py.)

The other blocks are fragments: they use an ``iii`` app, a payload or a helper defined
around them, and are not run here. Docs that hold only fragments: docs/coming-from-iii.md,
docs/cron.md, docs/http.md, docs/queues.md, docs/topics.md and docs/trigger-actions.md.
Fragments in the other docs: docs/getting-started.md (the ``from_config`` line),
docs/operating.md (the Prometheus hooks; the web-app recipes, which need a framework) and
docs/testing.md (inspection, the fixtures, the first synchronous test).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30

# Python blocks per page; a new block makes this fail, to be run below or listed above.
COUNTS = {
    "README.md": 1,
    "docs/coming-from-iii.md": 1,
    "docs/configuration.md": 1,
    "docs/cron.md": 2,
    "docs/getting-started.md": 2,
    "docs/http.md": 2,
    "docs/operating.md": 6,
    "docs/queues.md": 3,
    "docs/testing.md": 7,
    "docs/topics.md": 1,
    "docs/trigger-actions.md": 5,
}

# docs/operating.md shows this config only through `iii-embedded check`'s output.
SHOP_CONFIG = """\
workers:
  - name: iii-queue
    config:
      queue_configs:
        payment: {type: fifo, message_group_field: order_id, backoff_ms: 200}
      adapter:
        name: builtin
        config: {store_method: file_based, file_path: ./data/queue_store}
"""

# Calls the session's shop.py app: the gateway is down, then fixed.
SHOP_DRIVER = """\
from pathlib import Path
from iii_embedded import InvocationError
from shop import iii

with iii:
    try:
        iii.trigger("payments::charge", {"order_id": "A-1001", "amount": 25})
    except InvocationError as exc:
        print(exc)
    Path("gateway.ok").touch()
    print(iii.trigger("payments::charge", {"order_id": "A-1001", "amount": 25}))
"""


# Runs a script whose app comes from III.from_config, printing "ready" once its engine runs
# (iii.run() listens for SIGINT before it starts the engine).
READY_WRAPPER = """\
import runpy
import sys
from iii_embedded import III

from_config = III.from_config

def from_config_announcing(path, **kwargs):
    app = from_config(path, **kwargs)
    app.lifecycle_hooks.append(lambda app, tg: print("ready", flush=True))
    return app

III.from_config = from_config_announcing
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def blocks(page: str, lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / page).read_text(), flags=re.DOTALL)


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_the_pages_have_their_blocks() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = {
        str(p.relative_to(ROOT)): n
        for p in pages
        if p.name != "triggering.md" and (n := len(blocks(str(p.relative_to(ROOT)))))
    }
    assert found == COUNTS


# (page, block index, expected lines of output)
PROGRAMS = [
    ("docs/getting-started.md", 0, ["hello Ada", "sending to ada@example.com"]),
    ("docs/configuration.md", 0, []),
    ("docs/operating.md", 1, []),
]


@pytest.mark.parametrize(("page", "index", "expected"), PROGRAMS)
def test_a_program_runs(page: str, index: int, expected: list[str], tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(blocks(page)[index])
    done = run(tmp_path, str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected


def test_the_readme_taste_serves_until_interrupted(tmp_path: Path) -> None:
    (tmp_path / "iii-config.yaml").write_text(blocks("README.md", "yaml")[0])
    (tmp_path / "taste.py").write_text(blocks("README.md")[0])
    proc = subprocess.Popen(
        [sys.executable, "-c", READY_WRAPPER, "taste.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=TIMEOUT_S)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err


def test_the_operating_session_app(tmp_path: Path) -> None:
    (tmp_path / "iii-config.yaml").write_text(SHOP_CONFIG)
    (tmp_path / "shop.py").write_text(blocks("docs/operating.md")[0])
    done = run(tmp_path, "-c", SHOP_DRIVER)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "invocation_failed: ConnectionError: gateway https://pay.example refused the connection",
        "{'charged': 25}",
    ]


@pytest.mark.parametrize("index", [0, 1, 6])  # the virtual clock; a run waited for; drain_blocking
def test_the_testing_example_passes(index: int, tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(blocks("docs/testing.md")[index])
    done = run(tmp_path, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_example.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
