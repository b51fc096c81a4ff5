"""Settings, as frozen dataclasses with documented, safe defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError

MiB = 1024 * 1024
GiB = 1024 * MiB
DAY_SECONDS = 86_400.0
"""Timeouts above this are refused unless ``allow_long_timeouts`` is set."""

_UNITS = {
    "memory_mb": "MiB",
    "cpus": "cores",
    "pids": "processes",
    "timeout_seconds": "seconds",
    "kill_grace_seconds": "seconds",
    "tmpfs_mb": "MiB",
    "files_mb": "MiB",
    "shm_mb": "MiB",
    "output_limit_bytes": "bytes",
    "max_message_bytes": "bytes",
    "max_snapshot_bytes": "bytes",
    "nofile": "open files",
    "fsize_mb": "MiB",
    "start_timeout_seconds": "seconds",
    "tool_timeout_seconds": "seconds",
    "max_concurrent_tool_calls": "calls",
    "tool_calls_per_second": "calls a second",
}
_TIMEOUTS = (
    "timeout_seconds",
    "kill_grace_seconds",
    "start_timeout_seconds",
    "tool_timeout_seconds",
)


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
    allow_long_timeouts: bool = False
    """Timeouts are refused above a day (a caller who meant milliseconds);
    set this to allow them."""
    tmpfs_mb: int = 64
    """Size of the writable, no-exec ``/tmp``. The root filesystem is read-only."""
    files_mb: int = 64
    """Size of the work directory ``/data`` (the current directory, no-exec),
    where ``sandbox.files`` reads and writes and code leaves files for the
    caller in ``/data/out``. Like ``/tmp`` it counts against ``memory_mb``."""
    shm_mb: int = 1
    """Size of ``/dev/shm``."""
    output_limit_bytes: int = 1 * MiB
    """Bytes of stdout and of stderr kept per run; the rest is dropped and marked."""
    max_message_bytes: int = 4 * MiB
    """Largest payload one channel message may carry (a tool call's arguments, a
    tool's result, a run's value). Larger is an error, never a crash."""
    max_snapshot_bytes: int = 8 * MiB
    """Largest namespace snapshot (``Sandbox.snapshot``, compressed). Values are
    left out, largest first, until it fits; a larger blob is refused by
    ``Sandbox.restore``. Sent in pieces, so it may exceed ``max_message_bytes``."""
    nofile: int = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    fsize_mb: int = 64
    """Largest file a process may write (RLIMIT_FSIZE), the runner's file
    transfers included: the default matches ``files_mb``."""
    user: str = "65534:65534"
    """uid:gid the code runs as. Never root."""
    runtime: str | None = None
    """Container runtime (``None``: the engine's default, runc; ``"runsc"`` for gVisor)."""
    seccomp_profile: str | Path = "legion"
    """``"legion"``: the built-in allowlist (legion.sandbox.seccomp), stricter than
    the engine's default; ``"engine"``: the engine's own default profile; or the
    path of a seccomp profile (the engine's JSON format)."""
    start_timeout_seconds: float = 30.0
    """How long a new container has to say Hello."""
    tool_timeout_seconds: float = 60.0
    """How long one tool call may take on the host before the sandbox code gets
    ``ToolTimeout``."""
    max_concurrent_tool_calls: int = 16
    """Tool calls from one sandbox served at once; more wait their turn."""
    tool_calls_per_second: float = 500.0
    """Sustained tool-call rate per sandbox, with bursts of up to this many
    calls. What a call beyond it does is ``tool_rate_limit_mode``."""
    tool_rate_limit_mode: Literal["wait", "fail"] = "wait"
    """``"wait"`` (the default): a call over ``tool_calls_per_second`` waits for
    its turn, first come first served, so a loop of thousands of calls slows
    down instead of failing. The wait is bounded by ``tool_timeout_seconds``
    (a call whose turn is further away fails at once with ``ToolRateLimited``)
    and by ``timeout_seconds`` of the run. ``"fail"``: the call fails at once
    with ``ToolRateLimited`` inside the sandbox."""

    def __post_init__(self) -> None:
        positive = (
            "memory_mb",
            "cpus",
            "pids",
            "timeout_seconds",
            "tmpfs_mb",
            "files_mb",
            "shm_mb",
            "output_limit_bytes",
            "max_message_bytes",
            "max_snapshot_bytes",
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
                raise UsageError(
                    f"SandboxLimits.{name} must be a positive number "
                    f"({_UNITS.get(name, 'its unit')}), got {value!r}"
                )
        if (
            isinstance(self.kill_grace_seconds, bool)
            or not isinstance(self.kill_grace_seconds, (int, float))
            or not (math.isfinite(self.kill_grace_seconds) and self.kill_grace_seconds >= 0)
        ):
            raise UsageError(
                "SandboxLimits.kill_grace_seconds must be 0 or more (seconds), "
                f"got {self.kill_grace_seconds!r}"
            )
        if self.tool_rate_limit_mode not in ("wait", "fail"):
            raise UsageError(
                "SandboxLimits.tool_rate_limit_mode must be 'wait' or 'fail', "
                f"got {self.tool_rate_limit_mode!r}"
            )
        if not self.allow_long_timeouts:
            for name in _TIMEOUTS:
                value = getattr(self, name)
                if value > DAY_SECONDS:
                    raise UsageError(
                        f"SandboxLimits.{name}={value:g} seconds is more than a day "
                        f"({DAY_SECONDS:g} s); the unit is seconds. If you mean it, also "
                        "pass allow_long_timeouts=True."
                    )
        if self.memory_mb < 16:
            raise UsageError(
                f"SandboxLimits.memory_mb={self.memory_mb} is too small for Python "
                "and the runner to start; use at least 16"
            )
        if self.max_message_bytes < 64 * 1024:
            raise UsageError("SandboxLimits.max_message_bytes must be at least 65536")
        if self.max_snapshot_bytes < 4096:
            raise UsageError("SandboxLimits.max_snapshot_bytes must be at least 4096")
        uid = self.user.split(":", 1)[0]
        if uid in ("0", "root", ""):
            raise UsageError(
                "SandboxLimits.user must not be root; use an unprivileged uid:gid "
                "such as the default '65534:65534'"
            )
        if (
            self.seccomp_profile not in ("legion", "engine")
            and not Path(self.seccomp_profile).is_file()
        ):
            raise UsageError(
                f"SandboxLimits.seccomp_profile: no file at {self.seccomp_profile} (use "
                "'legion', 'engine' or the path of a profile)"
            )

    def warnings(self) -> list[str]:
        """Values that are allowed but probably not meant, one line each."""
        found = []
        if self.memory_mb < 64:
            found.append(
                f"memory_mb={self.memory_mb} MiB leaves little room: Python and the runner "
                "use about 20 MiB before any code runs"
            )
        if self.tmpfs_mb + self.files_mb + self.shm_mb > self.memory_mb:
            found.append(
                f"tmpfs_mb={self.tmpfs_mb} + files_mb={self.files_mb} + shm_mb={self.shm_mb} "
                f"is more than memory_mb={self.memory_mb}: files in /tmp, /data and /dev/shm "
                "count against the memory cap, so the sandbox is OOM-killed before they are full"
            )
        if self.tool_timeout_seconds > self.timeout_seconds:
            found.append(
                f"tool_timeout_seconds={self.tool_timeout_seconds:g} is longer than "
                f"timeout_seconds={self.timeout_seconds:g}: a run times out before a "
                "slow tool call does"
            )
        if self.timeout_seconds > 3600:
            found.append(
                f"timeout_seconds={self.timeout_seconds:g}: one run may hold a container "
                "for more than an hour"
            )
        if self.pids > 4096:
            found.append(f"pids={self.pids}: a fork bomb can start that many processes")
        return found

    def check_capacity(self, *, memory_bytes: int | None, cpus: float | None) -> list[str]:
        """Raise :class:`UsageError` for limits the engine cannot give (more
        memory or CPUs than it has); return warnings for ones that take
        much of it. ``None``: the engine does not say."""
        if memory_bytes is not None and self.memory_mb * MiB > memory_bytes:
            raise UsageError(
                f"SandboxLimits.memory_mb={self.memory_mb} MiB "
                f"({self.memory_mb * MiB / GiB:,.1f} GiB) is more than the engine's total "
                f"memory ({memory_bytes // MiB} MiB). memory_mb is in MiB, not bytes: "
                "256 means 256 MiB."
            )
        if cpus is not None and self.cpus > cpus:
            raise UsageError(
                f"SandboxLimits.cpus={self.cpus:g} cores is more than the engine's {cpus:g} CPUs"
            )
        found = self.warnings()
        if memory_bytes is not None and self.memory_mb * MiB > memory_bytes // 2:
            found.append(
                f"memory_mb={self.memory_mb} MiB is more than half of the engine's "
                f"{memory_bytes // MiB} MiB: two such sandboxes can exhaust the machine"
            )
        return found

    def replace(self, **changes: Any) -> SandboxLimits:
        """A copy with some fields changed (unknown names raise UsageError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise UsageError(f"unknown SandboxLimits field(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **changes)


BINDING_SCOPES = ("iteration", "turn", "conversation")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """How an agent runs. Layered: these defaults < ``LEGION_<NAME>`` environment
    variables < the agent's ``config`` < keyword overrides of one call."""

    model: str = "openai/gpt-4o-mini"
    """Any litellm model string (``provider/model``)."""
    api_base: str | None = None
    """Base URL of the model's API, for self-hosted or compatible servers."""
    api_key: str | None = dataclasses.field(default=None, repr=False)
    """API key; by default litellm reads the provider's own variable (OPENAI_API_KEY...)."""
    temperature: float | None = None
    max_iterations: int = 10
    """Successful ``eval_and_continue`` steps before the run is stopped."""
    max_retries: int = 3
    """Failed steps in a row (bad reply, code error, invalid output) that are
    retried; the next failure in a row stops the run. A success resets it."""
    sandbox_timeout: float = 60.0
    """Seconds one code step may run."""
    binding_scope: str = "turn"
    """``iteration``: each step starts with an empty namespace; ``turn``: variables
    persist through one run; ``conversation``: through a long-lived agent's calls."""
    max_message_length: int = 20_000
    """Characters of one message to the model; longer content is cut with a marker."""
    model_timeout: float = 120.0
    """Seconds one model request may take."""
    model_retries: int = 3
    """Retries of a model request on rate limits, 5xx and connection errors."""
    model_retry_backoff: float = 1.0
    """First retry's delay in seconds; doubles each time (a Retry-After header wins)."""
    sandbox_limits: SandboxLimits | None = None
    """Container limits for this agent's sandbox (None: the runtime's)."""
    image: str | None = None
    """The environment its code runs in: a name (``"data"``: numpy, pandas,
    matplotlib; or one built with ``legion image build --requirements FILE
    --name NAME``) or an image reference. None: the runtime's image (the
    standard library only, unless ``LEGION_IMAGE`` or the runtime says else).
    The system prompt lists the environment's packages."""
    idle_timeout: float = 300.0
    """Seconds a long-lived agent with ``conversation`` scope keeps its container
    between turns; then its bindings are snapshotted and the container removed
    (they are restored into a fresh one at the next turn)."""
    max_tokens: int | None = None
    """Budget: model tokens (prompt and completion) a run may spend, or a
    long-lived agent over all its turns; its sub-agents' count against it.
    Over it, the run stops with :class:`legion.UsageLimitExceeded`. Not the
    per-request completion limit some APIs call ``max_tokens``. None: no limit."""
    max_cost_usd: float | None = None
    """Budget: USD of model requests, as litellm prices them (requests to a model
    it has no price for count nothing, with a warning in the log). None: no limit."""
    max_tool_calls: int | None = None
    """Budget: tool calls the code may make; the call past it is refused and
    the run stops. None: no limit."""
    max_sandbox_seconds: float | None = None
    """Budget: wall-clock seconds of code steps in the sandbox (sub-agents'
    steps count too); the step running when it is spent is stopped. None: no limit."""

    def __post_init__(self) -> None:
        for name in BUDGET_KEYS:
            _check_budget(name, getattr(self, name))
        self._check_counts()
        self._check_times()
        self._check_choices()

    def _check_counts(self) -> None:
        for name in ("max_iterations", "max_message_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("max_retries", "model_retries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UsageError(f"{name} must be a whole number >= 0, got {getattr(self, name)!r}")

    def _check_times(self) -> None:
        for name in ("sandbox_timeout", "model_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise UsageError(f"{name} must be a positive number of seconds, got {value!r}")
        long_ok = self.sandbox_limits is not None and self.sandbox_limits.allow_long_timeouts
        for name in ("sandbox_timeout", "model_timeout"):
            value = getattr(self, name)
            if value > DAY_SECONDS and not long_ok:
                raise UsageError(
                    f"{name}={value:g} seconds is more than a day; the unit is seconds. If you "
                    "mean it, also set sandbox_limits=SandboxLimits(allow_long_timeouts=True)."
                )

    def _check_choices(self) -> None:
        if self.binding_scope not in BINDING_SCOPES:
            raise UsageError(
                f"binding_scope must be one of {', '.join(BINDING_SCOPES)}; "
                f"got {self.binding_scope!r}"
            )
        if not self.model or ("/" not in self.model and not self.model.replace("-", "").isalnum()):
            raise UsageError(
                f"model {self.model!r} is not a litellm model string such as 'openai/gpt-4o-mini'"
            )
        if self.image is not None and not (isinstance(self.image, str) and self.image.strip()):
            if self.image != "":  # LEGION_IMAGE= (empty): the runtime's image
                raise UsageError(
                    f"image must be an environment's name (such as 'data') or an image "
                    f"reference, got {self.image!r}"
                )
            object.__setattr__(self, "image", None)


BUDGET_KEYS = ("max_tokens", "max_cost_usd", "max_tool_calls", "max_sandbox_seconds")
"""The :class:`AgentConfig` keys that are budgets of a run (or conversation)."""
_WHOLE_BUDGETS = ("max_tokens", "max_tool_calls")


def _check_budget(name: str, value: Any) -> None:
    if value is None:
        return
    whole = name in _WHOLE_BUDGETS
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (whole and not isinstance(value, int))
        or not math.isfinite(value)
    ):
        kind = "a whole number" if whole else "a number"
        raise UsageError(f"{name} must be {kind} (or None for no limit), got {value!r}")
    if value < 0:
        raise UsageError(f"{name} must be 0 or more (or None for no limit), got {value!r}")


_ENV_PREFIX = "LEGION_"


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(AgentConfig)]


def check_config_keys(values: dict[str, Any] | Any, where: str) -> None:
    """UsageError naming the closest valid key for any unknown one."""
    import difflib  # noqa: PLC0415 - only on this path

    names = _field_names()
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise UsageError(f"unknown config key {key!r} in {where}{hint}")


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(AgentConfig):
        raw = environ.get(_ENV_PREFIX + field.name.upper())
        if raw is None or field.name == "sandbox_limits":
            continue
        default = field.default
        if field.name in BUDGET_KEYS:  # None by default; "" or "none" is no limit
            default = 0 if field.name in _WHOLE_BUDGETS else 0.0
            if raw.strip().lower() in ("", "none"):
                out[field.name] = None
                continue
        try:
            if isinstance(default, bool):
                out[field.name] = raw.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                out[field.name] = int(raw)
            elif isinstance(default, float):
                out[field.name] = float(raw)
            else:
                out[field.name] = raw
        except ValueError:
            raise UsageError(
                f"{_ENV_PREFIX}{field.name.upper()}={raw!r} is not a valid {type(default).__name__}"
            ) from None
    return out


def resolve_agent_config(
    agent_config: dict[str, Any] | Any,
    overrides: dict[str, Any],
    *,
    environ: dict[str, str] | None = None,
    where: str = "the agent's config",
) -> AgentConfig:
    """Defaults < environment < the agent's config < call overrides."""
    import os  # noqa: PLC0415

    check_config_keys(agent_config, where)
    check_config_keys(overrides, "the call's keyword arguments")
    env = _from_env(dict(os.environ) if environ is None else environ)
    return AgentConfig(**{**env, **dict(agent_config), **overrides})
