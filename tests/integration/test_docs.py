"""The README's example and `make demo`'s program run as documented."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from legion.testing import FakeOpenAIServer, action

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker


def _readme_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    [block] = [b for b in blocks if containing in b]
    return str(block)


def test_readme_agent_example_prints_what_it_says(docker_ready: None, tmp_path: Path) -> None:
    script = tmp_path / "agent_example.py"
    script.write_text(_readme_block("class Accountant"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEGION_MODEL")}
    with FakeOpenAIServer([action("eval_and_complete", "Ledger.balance()")]) as server:
        run = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={
                **clean,
                "LEGION_MODEL": "openai/fake-model",
                "LEGION_API_BASE": server.url,
                "LEGION_API_KEY": "sk-test",
            },
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["120", "1"]


def test_readme_example_prints_what_it_says(docker_ready: None, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_readme_block("Inventory.count"))
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


def _agent_demo_script() -> list[str]:
    spec = importlib.util.spec_from_file_location("agent_demo", ROOT / "examples/agent_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.OFFLINE_SCRIPT)


def _run_agent_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEGION_MODEL")}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples/agent_demo.py")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**clean, **env},
    )


def test_agent_demo_offline_says_so(docker_ready: None) -> None:
    run = _run_agent_demo({})
    assert run.returncode == 0, run.stderr
    assert "No LEGION_MODEL set: replaying a scripted session" in run.stdout
    assert "Marked 2 overdue grocery tasks done" in run.stdout
    assert "ada's open tasks now: ['call the bank', 'file taxes', 'renew passport']" in run.stdout
    assert run.stderr == ""


def test_agent_demo_with_legion_model_takes_the_litellm_path(docker_ready: None) -> None:
    # A user points the demo at a model with LEGION_MODEL (and LEGION_API_BASE
    # for a self-hosted one); here that model is the fake server.
    with FakeOpenAIServer(_agent_demo_script(), model="served-model") as server:
        run = _run_agent_demo(
            {
                "LEGION_MODEL": "openai/served-model",
                "LEGION_API_BASE": server.url,
                "LEGION_API_KEY": "sk-user",
            }
        )
        assert run.returncode == 0, run.stderr
        assert len(server.requests) == 2
        assert server.requests[0]["model"] == "served-model"
    assert "Using the model openai/served-model" in run.stdout
    assert "No LEGION_MODEL" not in run.stdout
    assert "Marked 2 overdue grocery tasks done" in run.stdout
