"""Settings, as frozen dataclasses with documented, safe defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

MiB = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """What one sandbox container may use. Every field is enforced from outside
    the container (by the engine, the kernel or the controller); nothing code
    inside the sandbox does can lift it.

    Networking is always disabled: a sandbox's only way out is the tool socket.
    """

    memory_mb: int = 256
    """Memory cap; swap is capped at the same figure (memory + swap = memory)."""
    cpus: float = 1.0
    """CPU quota in cores."""
    pids: int = 128
    """Most processes and threads the container may hold at once."""
    timeout_seconds: float = 60.0
    """Wall-clock limit of one ``run``. At the limit the runner is told to
    cancel, and the container is killed after ``kill_grace_seconds``."""
    kill_grace_seconds: float = 1.0
    tmpfs_mb: int = 64
    """Size of the writable, no-exec ``/tmp``. The root filesystem is read-only."""
    shm_mb: int = 1
    """Size of ``/dev/shm``."""
    output_limit_bytes: int = 1 * MiB
    """Bytes of stdout and of stderr kept per run; the rest is dropped and marked."""
    max_message_bytes: int = 4 * MiB
    """Largest payload one channel message may carry (a tool call's arguments, a
    tool's result, a run's value). Larger is an error, never a crash."""
    nofile: int = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    fsize_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE)."""
    user: str = "65534:65534"
    """uid:gid the code runs as. Never root."""
    runtime: str | None = None
    """Container runtime (``None``: the engine's default, runc; ``"runsc"`` for gVisor)."""
    seccomp_profile: Path | None = None
    """A seccomp profile (JSON) to apply instead of the engine's default."""
    start_timeout_seconds: float = 30.0
    """How long a new container has to say Hello."""
    tool_timeout_seconds: float = 60.0
    """How long one tool call may take on the host before the sandbox code gets
    ``ToolTimeout``."""
    max_concurrent_tool_calls: int = 16
    """Tool calls from one sandbox served at once; more wait their turn."""
    tool_calls_per_second: float = 500.0
    """Sustained tool-call rate per sandbox (a burst of this many is allowed);
    calls beyond it fail with ``ToolRateLimited`` inside the sandbox."""

    def __post_init__(self) -> None:
        positive = (
            "memory_mb",
            "cpus",
            "pids",
            "timeout_seconds",
            "tmpfs_mb",
            "shm_mb",
            "output_limit_bytes",
            "max_message_bytes",
            "nofile",
            "fsize_mb",
            "start_timeout_seconds",
            "tool_timeout_seconds",
            "max_concurrent_tool_calls",
            "tool_calls_per_second",
        )
        for name in positive:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise UsageError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        if self.kill_grace_seconds < 0:
            raise UsageError("SandboxLimits.kill_grace_seconds must be >= 0")
        if self.memory_mb < 16:
            raise UsageError(
                f"SandboxLimits.memory_mb={self.memory_mb} is too small for Python "
                "and the runner to start; use at least 16"
            )
        if self.max_message_bytes < 64 * 1024:
            raise UsageError("SandboxLimits.max_message_bytes must be at least 65536")
        uid = self.user.split(":", 1)[0]
        if uid in ("0", "root", ""):
            raise UsageError(
                "SandboxLimits.user must not be root; use an unprivileged uid:gid "
                "such as the default '65534:65534'"
            )
        if self.seccomp_profile is not None and not Path(self.seccomp_profile).is_file():
            raise UsageError(f"SandboxLimits.seccomp_profile: no file at {self.seccomp_profile}")

    def replace(self, **changes: Any) -> SandboxLimits:
        """A copy with some fields changed (unknown names raise UsageError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise UsageError(f"unknown SandboxLimits field(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **changes)
