"""`make demo`: the order flow example completes on a file store, twice in a row."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "order_flow"


def test_the_order_flow_demo_completes_and_can_run_again(tmp_path: Path) -> None:
    workdir = tmp_path / "order_flow"
    shutil.copytree(EXAMPLE, workdir, ignore=shutil.ignore_patterns("data", "__pycache__"))
    for run in (1, 2):
        proc = subprocess.run(
            [sys.executable, "order_flow.py"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, (run, proc.stdout, proc.stderr)
        out = proc.stdout
        assert out.count("created for") == 3
        assert out.count("charged") == 3
        assert out.count("confirmation sent") == 3
        assert out.count("analytics: order_created") == 3
        assert "gateway timeout on attempt 1" in out
        assert "(attempt 2)" in out
        assert "queue payment  completed=3 retried=1 dead=0" in out
        assert out.rstrip().endswith("order flow complete")
    assert (workdir / "data" / "queue_store" / "iii-queue.db").exists()
