"""Every Python block of docs/triggering.md is a complete program that runs and prints what
its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "triggering.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_its_examples() -> None:
    assert len(BLOCKS) == 9


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_python_block_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"block_{index}.py"
    script.write_text(BLOCKS[index])
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # Each "print(...)  # expected" line's comment appears in the output (up to a
    # parenthesised remark, and ignoring ids).
    expected = [
        re.sub(r"\s*\(.*$", "", m).strip()
        for m in re.findall(r"print\(.*\)\s*#\s*(.+)$", BLOCKS[index], flags=re.MULTILINE)
    ]
    for line in expected:
        if line and "..." not in line:
            assert line in done.stdout, (line, done.stdout)
