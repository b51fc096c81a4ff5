from pathlib import Path

import pytest

import legion


def test_defaults_are_the_documented_safe_ones() -> None:
    limits = legion.SandboxLimits()
    assert limits.memory_mb == 256
    assert limits.user == "65534:65534"
    assert limits.max_message_bytes == 4 * 1024 * 1024
    assert limits.timeout_seconds == 60
    assert limits.runtime is None


def test_limits_are_frozen() -> None:
    limits = legion.SandboxLimits()
    with pytest.raises(AttributeError):
        limits.memory_mb = 1024  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mb", 0),
        ("cpus", -1.0),
        ("pids", 0),
        ("timeout_seconds", float("inf")),
        ("tmpfs_mb", True),
        ("memory_mb", 8),
        ("max_message_bytes", 1000),
        ("kill_grace_seconds", -1),
    ],
)
def test_bad_values_raise_usage_errors(field: str, value: object) -> None:
    with pytest.raises(legion.UsageError, match=field):
        legion.SandboxLimits(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("user", ["0", "root", "0:0", ""])
def test_root_is_refused(user: str) -> None:
    with pytest.raises(legion.UsageError, match="must not be root"):
        legion.SandboxLimits(user=user)


def test_missing_seccomp_profile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(legion.UsageError, match="no file"):
        legion.SandboxLimits(seccomp_profile=tmp_path / "missing.json")


def test_replace_checks_names() -> None:
    assert legion.SandboxLimits().replace(memory_mb=512).memory_mb == 512
    with pytest.raises(legion.UsageError, match="memroy_mb"):
        legion.SandboxLimits().replace(memroy_mb=512)
