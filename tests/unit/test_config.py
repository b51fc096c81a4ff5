from pathlib import Path

import pytest

import legion


def test_defaults_are_the_documented_safe_ones() -> None:
    limits = legion.SandboxLimits()
    assert limits.memory_mb == 256
    assert limits.user == "65534:65534"
    assert limits.max_message_bytes == 4 * 1024 * 1024
    assert limits.max_snapshot_bytes == 8 * 1024 * 1024
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
        ("max_snapshot_bytes", 1000),
        ("max_snapshot_bytes", 0),
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


def test_seccomp_profile_defaults_to_the_builtin_allowlist() -> None:
    from legion.sandbox import seccomp

    assert legion.SandboxLimits().seccomp_profile == "legion"
    profile = seccomp.profile("x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64"]  # no 32-bit, no x32
    allowed = {
        n
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW"
        for n in rule["names"]
        if "args" not in rule
    }
    for closed in (
        "io_uring_setup",
        "ptrace",
        "process_vm_readv",
        "modify_ldt",
        "memfd_secret",
        "memfd_create",
        "name_to_handle_at",
        "socketcall",
        "execveat",
        "unshare",
        "mount",
        "bpf",
        "shmget",
        "clone3",
    ):
        assert closed not in allowed, closed
    families = sorted(
        rule["args"][0]["value"] for rule in profile["syscalls"] if rule["names"] == ["socket"]
    )
    assert families == [1, 2, 10, 16]
