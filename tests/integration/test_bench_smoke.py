"""`make bench` keeps working: its smoke mode runs every measure once or twice,
the peers included (their venv and images are built the first time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.docker


@pytest.mark.timeout(900)  # a fresh machine builds the peers' venv and images first
def test_bench_smoke_writes_results(docker_ready: None, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--peers", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    [result_file] = list(tmp_path.glob("*-smoke.json"))
    results = json.loads(result_file.read_text())
    for measure in (
        "warm_exec",
        "exec_with_tool_call",
        "exec_with_tool_call_1mib",
        "pool_acquire",
        "cold_start_to_first_result",
        "docker_run_rm_baseline",
        "exec_output_10mb",
        "exec_with_4_sandboxes_running",
        "agent_iteration_1_agent",
        "runsc_exec_with_tool_call",
    ):
        assert results["measures"][measure]["n"] >= 1, measure
        assert results["measures"][measure]["p50_ms"] > 0, measure
    assert results["measures"]["idle_memory_mib"] > 0
    assert results["measures"]["rates"]["single-use sandboxes per second"] > 0
    peers = results["peers"]
    assert peers["unavailable"] == {}, peers["unavailable"]
    for peer in ("llm-sandbox", "autogen", "smolagents"):
        assert f"{peer} in session" in peers["measures"], peer
        assert peers["measures"][f"{peer} in session"]["p50_ms"] > 0
    assert "warm_exec" in run.stdout and "p50 ms" in run.stdout
