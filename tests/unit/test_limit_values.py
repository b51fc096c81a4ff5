"""Limits that cannot be meant are refused with the unit named; surprising
ones are allowed with a warning."""

from __future__ import annotations

import pytest

import legion
from legion.config import GiB, MiB

ENGINE = {"memory_bytes": 24 * GiB, "cpus": 2.0}


@pytest.mark.parametrize(
    ("field", "value", "unit"),
    [
        ("memory_mb", 0, "MiB"),
        ("memory_mb", -256, "MiB"),
        ("cpus", 0, "cores"),
        ("cpus", -1.0, "cores"),
        ("pids", 0, "processes"),
        ("timeout_seconds", 0, "seconds"),
        ("timeout_seconds", -5, "seconds"),
        ("tool_timeout_seconds", 0, "seconds"),
        ("tmpfs_mb", -1, "MiB"),
        ("kill_grace_seconds", -1, "seconds"),
    ],
)
def test_zero_and_negative_values_are_refused_naming_the_unit(
    field: str, value: float, unit: str
) -> None:
    with pytest.raises(legion.UsageError, match=rf"{field}.*\({unit}\)"):
        legion.SandboxLimits(**{field: value})


@pytest.mark.parametrize(
    "field",
    ["timeout_seconds", "tool_timeout_seconds", "start_timeout_seconds", "kill_grace_seconds"],
)
def test_timeouts_over_a_day_need_an_explicit_allowance(field: str) -> None:
    with pytest.raises(legion.UsageError, match=rf"{field}=90000 seconds is more than a day"):
        legion.SandboxLimits(**{field: 90_000})
    allowed = legion.SandboxLimits(**{field: 90_000}, allow_long_timeouts=True)
    assert getattr(allowed, field) == 90_000
    assert legion.SandboxLimits(**{field: 86_400}).allow_long_timeouts is False  # a day is fine


def test_agent_timeouts_over_a_day_need_the_same_allowance() -> None:
    with pytest.raises(legion.UsageError, match="sandbox_timeout=100000 seconds"):
        legion.AgentConfig(sandbox_timeout=100_000)
    long = legion.SandboxLimits(allow_long_timeouts=True)
    assert legion.AgentConfig(sandbox_timeout=100_000, sandbox_limits=long).sandbox_timeout


def test_memory_given_in_bytes_is_refused_against_the_engine() -> None:
    # 128 TiB: a caller who meant 128 MiB in bytes.
    limits = legion.SandboxLimits(memory_mb=134_217_728)
    with pytest.raises(legion.UsageError) as raised:
        limits.check_capacity(**ENGINE)
    message = str(raised.value)
    assert "memory_mb=134217728 MiB" in message
    assert "in MiB, not bytes" in message
    assert f"{ENGINE['memory_bytes'] // MiB} MiB" in message


def test_more_cpus_than_the_engine_has_is_refused() -> None:
    with pytest.raises(legion.UsageError, match=r"cpus=3 cores is more than the engine's 2 CPUs"):
        legion.SandboxLimits(cpus=3).check_capacity(**ENGINE)
    assert legion.SandboxLimits(cpus=2).check_capacity(**ENGINE) == []


def test_an_engine_that_does_not_say_refuses_nothing() -> None:
    huge = legion.SandboxLimits(memory_mb=134_217_728, cpus=512)
    assert isinstance(huge.check_capacity(memory_bytes=None, cpus=None), list)


def test_surprising_values_are_warnings_not_errors() -> None:
    assert legion.SandboxLimits().check_capacity(**ENGINE) == []
    cases = {
        "leaves little room": legion.SandboxLimits(memory_mb=32),
        "count against the memory": legion.SandboxLimits(memory_mb=128, tmpfs_mb=512),
        "before a slow tool call": legion.SandboxLimits(
            timeout_seconds=10, tool_timeout_seconds=30
        ),
        "more than an hour": legion.SandboxLimits(timeout_seconds=7200),
        "fork bomb": legion.SandboxLimits(pids=10_000),
        "more than half": legion.SandboxLimits(memory_mb=16 * 1024),
    }
    for words, limits in cases.items():
        found = limits.check_capacity(**ENGINE)
        assert any(words in w for w in found), (words, found)


def test_an_unknown_rate_limit_mode_is_refused_when_the_limits_are_made() -> None:
    with pytest.raises(legion.UsageError, match="'wait' or 'fail', got 'queue'"):
        legion.SandboxLimits(tool_rate_limit_mode="queue")  # type: ignore[arg-type]
