"""`make bench` keeps working: its smoke mode runs every measure once or twice,
the peers included (their venv and images are built the first time), and fails
when any measure fails; a failed measure is reported, and the others still run."""

from __future__ import annotations

import json
import os
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
    written = list(tmp_path.glob("*-smoke.json"))
    assert len(written) == 1, run.stderr
    results = json.loads(written[0].read_text())
    assert results["failures"] == {}, run.stderr
    assert run.returncode == 0, run.stderr
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
        "live_output_delay",
        "mcp_call_host_direct",
        "mcp_call_from_sandbox",
        "data_cold_start",
        "data_first_run_cold",
        "data_first_run_warm",
        "data_first_run_preloaded",
    ):
        assert results["measures"][measure]["n"] >= 1, measure
        assert results["measures"][measure]["p50_ms"] > 0, measure
    assert results["measures"]["idle_memory_mib"] > 0
    assert "overhead_p50_ms" in results["measures"]["mcp_call_from_sandbox"]
    assert results["measures"]["rates"]["single-use sandboxes per second"] > 0
    peers = results["peers"]
    assert peers["unavailable"] == {}, peers["unavailable"]
    for peer in ("llm-sandbox", "autogen", "smolagents"):
        assert f"{peer} in session" in peers["measures"], peer
        assert peers["measures"][f"{peer} in session"]["p50_ms"] > 0
    assert "warm_exec" in run.stdout and "p50 ms" in run.stdout


@pytest.mark.timeout(300)
def test_a_failed_measure_is_reported_and_the_others_still_run(
    docker_ready: None, tmp_path: Path
) -> None:
    # Fail two measures on purpose (and skip the slow groups the same way):
    # warm_exec is the basis of every ratio, so the report must do without it.
    failed = [
        "warm_exec",
        "channel sync cpu per call",
        "exec_vs_*",
        "agent_iteration_*",
        "single-use sandboxes per second",
        "under_gvisor",
        "agent runs",
        "snapshots",
        "data_image",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-peers", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "LEGION_BENCH_FAIL": ",".join(failed)},
    )
    assert run.returncode == 1, run.stderr
    [result_file] = list(tmp_path.glob("*-smoke.json"))
    results = json.loads(result_file.read_text())
    failures = results["failures"]
    expected = {
        "warm_exec",
        "channel sync cpu per call",
        "exec_vs_output_size",
        "exec_vs_concurrency",
        "agent_iteration_1_agent",
        "agent_iteration_20_agents",
        "single-use sandboxes per second",
        "agent runs",
        "snapshots",
        "data_image",
    }
    assert expected <= set(failures) <= expected | {"under_gvisor"}, failures
    assert failures["warm_exec"] == {
        "type": "InjectedFailure",
        "message": "warm_exec failed on purpose (LEGION_BENCH_FAIL)",
    }
    measures = results["measures"]
    assert "warm_exec" not in measures
    for measure in (
        "warm_exec_expression",
        "exec_with_tool_call",
        "exec_with_tool_call_1mib",
        "pool_acquire",
        "cold_start_to_first_result",
        "docker_run_rm_baseline",
    ):
        assert measures[measure]["p50_ms"] > 0, measure
    assert measures["idle_memory_mib"] > 0
    assert list(results["ratios"]) == ["docker run --rm / cold start (p50)"]
    # The table, and the closing words on stderr, name each failure and why.
    assert "exec_with_tool_call" in run.stdout
    assert f"FAILED ({len(failures)})" in run.stdout
    assert "  warm_exec: InjectedFailure: warm_exec failed on purpose" in run.stdout
    assert f"bench: {len(failures)} measure(s) failed:" in run.stderr
    assert "bench:   channel sync cpu per call: InjectedFailure:" in run.stderr
