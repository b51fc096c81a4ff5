"""The README's example and `make demo`'s program run as documented."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker


def test_readme_example_prints_what_it_says(docker_ready: None, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    script = tmp_path / "example.py"
    script.write_text(code.group(1))
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["24", "12", "13"]
    assert run.stderr == ""


def test_demo_runs_a_tool_from_the_sandbox(docker_ready: None) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples/sandbox_demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "apples left: 10" in run.stdout
    assert "alice now has 10 apples" in run.stdout
    assert "'network': 'blocked" in run.stdout
    assert "'uid': 65534" in run.stdout
    assert "Limits in force" in run.stdout
    assert run.stderr == ""
