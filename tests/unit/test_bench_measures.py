"""The bench's measure runner: a failed measure is recorded with its error's
type and message, the others still run, and the report's exit status says so.
(The whole bench, with measures failed on purpose, runs in
tests/integration/test_bench_smoke.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from bench.__main__ import report
from bench.common import FAIL_ENV, CheckFailed, Measures, check


async def test_a_failed_measure_is_recorded_and_the_others_still_run() -> None:
    log = Measures(fail="")
    ran = []

    async def fails_its_check() -> dict[str, float]:
        check(None, "done", "value of a loop of 1000 tool calls", error="ToolRateLimited: slow")
        return {}

    async def asserts() -> None:
        assert 1 + 1 == 3, "arithmetic"  # a bare assert in a measure counts as a failure too

    async def works() -> dict[str, float]:
        ran.append("works")
        return {"n": 1}

    assert await log.run("loop", fails_its_check) is None
    assert await log.run("bare assert", asserts) is None
    assert await log.run("good", works) == {"n": 1}
    assert log.run_sync("divides", lambda: 1 / 0) is None
    assert log.run_sync("sync", lambda: 2) == 2
    assert ran == ["works"]
    bare = log.failures.pop("bare assert")
    assert bare["type"] == "AssertionError"
    assert bare["message"].startswith("arithmetic")  # pytest adds the expression after it
    assert log.failures == {
        "loop": {
            "type": "CheckFailed",
            "message": "value of a loop of 1000 tool calls: expected 'done', got None "
            "(error: ToolRateLimited: slow)",
        },
        "divides": {"type": "ZeroDivisionError", "message": "division by zero"},
    }


async def test_a_group_records_its_own_failure_and_its_measures_theirs() -> None:
    log = Measures(fail="")

    async def group() -> None:
        await log.run("inner", lambda: _raise(CheckFailed("inner: expected 1, got 2")))
        raise OSError("the sandbox could not start")

    await log.run("group", group)
    assert log.failures == {
        "inner": {"type": "CheckFailed", "message": "inner: expected 1, got 2"},
        "group": {"type": "OSError", "message": "the sandbox could not start"},
    }


async def test_named_measures_fail_on_purpose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAIL_ENV, "warm_*, pool_acquire")
    log = Measures()
    ran = []

    async def measure() -> int:
        ran.append(1)
        return 1

    assert await log.run("warm_exec", measure) is None
    assert await log.run("pool_acquire", measure) is None
    assert await log.run("cold_start", measure) == 1
    assert ran == [1]
    assert log.failures["warm_exec"] == {
        "type": "InjectedFailure",
        "message": f"warm_exec failed on purpose ({FAIL_ENV})",
    }
    assert set(log.failures) == {"warm_exec", "pool_acquire"}


def test_the_report_is_written_and_the_exit_status_names_the_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = {"n": 2, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 4.0, "mean_ms": 3.5}
    results: dict[str, Any] = {
        "machine": {"cpu_busy_before": 0.0},
        "smoke": True,
        "measures": {"pool_acquire": row, "rates": {}},  # no warm_exec: it failed
        "ratios": {},
        "failures": {"warm_exec": {"type": "CheckFailed", "message": "expected '2', got ''"}},
    }
    assert report(results, tmp_path / "failed") == 1
    out, err = capsys.readouterr()
    [written] = (tmp_path / "failed").glob("*-smoke.json")
    assert json.loads(written.read_text())["failures"] == results["failures"]
    assert "pool_acquire" in out  # the measures that ran are in the table
    assert "FAILED (1), so not in the figures above:" in out
    assert "  warm_exec: CheckFailed: expected '2', got ''" in out
    assert "bench: 1 measure(s) failed:" in err
    assert "warm_exec: CheckFailed: expected '2', got ''" in err

    results["failures"] = {}
    assert report(results, tmp_path / "passed") == 0
    out, err = capsys.readouterr()
    assert "FAILED" not in out and "failed" not in err


async def _raise(exc: Exception) -> None:
    raise exc
