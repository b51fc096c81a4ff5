"""``legion doctor``: can this machine run Legion sandboxes, and if not, why not.

Each check prints one line, ``ok``, ``warn`` or ``FAIL``, with what it found,
and the command that fixes a problem. A check that needs something an earlier
one found missing prints ``skip``. The last check starts a real sandbox with the
default limits and reads the limits back from inside it: the definitive one.

    $ legion doctor
    ok    docker engine     answers at unix:///var/run/docker.sock
    ...

:func:`diagnose` returns the checks; :func:`main` prints them and returns the
exit status (1 when any check failed).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import docker
import docker.errors

from .config import MiB, SandboxLimits
from .errors import ImageNotFound, UsageError
from .sandbox import environment, seccomp
from .sandbox import image as _image
from .sandbox.backend import Package
from .sandbox.endpoint import SOCKET_NAME

Status = Literal["ok", "warn", "FAIL", "skip"]
Progress = Callable[[str], None]

DEFAULT_HOST = "unix:///var/run/docker.sock"
MIN_API_VERSION = "1.25"
"""The oldest engine API with every container option a sandbox uses (init, nano_cpus)."""
SANDBOX_CHECK_TIMEOUT = 90.0
"""Seconds the real-sandbox check may take, image start included."""
_SUN_PATH_MAX = 107  # a Unix socket's path, without the terminating NUL
_ENGINE_FIX = (
    "start an engine: `make docker` in a Legion checkout (scripts/ensure-docker), "
    "or `sudo systemctl start docker`, or run `dockerd` as root"
)


@dataclass(frozen=True)
class Check:
    """One finding: its status, what was found, and how to fix a problem."""

    name: str
    status: Status
    found: str
    fix: str = ""


def _say(message: str) -> None:
    print(f"legion doctor: {message}", file=sys.stderr, flush=True)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost OSError under a docker / requests error, else ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    found = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            found = current
        nested = [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        current = current.__cause__ or current.__context__ or (nested[0] if nested else None)
    return found


def _engine_failure(exc: Exception) -> Check:
    host = os.environ.get("DOCKER_HOST") or DEFAULT_HOST
    cause = _root_cause(exc)
    where = f"no Docker engine answers at {host}"
    if isinstance(cause, PermissionError):
        return Check(
            "docker engine",
            "FAIL",
            f"{where}: permission denied on the engine's socket",
            "run as root, or join the group that owns the socket: "
            "`sudo usermod -aG docker $USER`, then log in again",
        )
    if isinstance(cause, FileNotFoundError):
        reason = "no socket there"
    elif isinstance(cause, ConnectionRefusedError):
        reason = "nothing listens there"
    elif isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    fix = _ENGINE_FIX
    if os.environ.get("DOCKER_HOST"):
        fix += f"; or unset DOCKER_HOST (it is {host}) to use the local engine"
    return Check("docker engine", "FAIL", f"{where} ({reason})", fix)


def _packages(packages: tuple[Package, ...]) -> str:
    if not packages:
        return "the standard library only"
    return "packages " + ", ".join(f"{p.name} {p.version}" for p in packages)


def _command_in(message: str) -> str:
    """The backquoted command of an ImageNotFound message, else the message."""
    parts = message.split("`")
    return f"`{parts[1]}`" if len(parts) >= 3 else message


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class _Doctor:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.client: Any = None
        self.info: dict[str, Any] = {}
        self.image = os.environ.get("LEGION_IMAGE") or _image.image_tag()
        self.image_found = False

    def engine(self) -> Check:
        try:
            self.client = docker.from_env(timeout=15)
            self.client.ping()
            self.info = self.client.info()
        except Exception as exc:
            self.client = None
            return _engine_failure(exc)
        host = os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        return Check("docker engine", "ok", f"answers at {host}")

    def version(self) -> Check:
        version = self.client.version()
        api = str(version.get("ApiVersion", "?"))
        found = (
            f"Docker {version.get('Version', '?')} (API {api}), cgroup v"
            f"{self.info.get('CgroupVersion', '1')} ({self.info.get('CgroupDriver', '?')}), "
            f"default runtime {self.info.get('DefaultRuntime', '?')}"
        )
        if _version_tuple(api) < _version_tuple(MIN_API_VERSION):
            return Check(
                "engine version",
                "FAIL",
                f"{found}: sandboxes need API {MIN_API_VERSION} or newer",
                "upgrade the Docker engine (Debian: `apt-get install docker.io`)",
            )
        return Check("engine version", "ok", found)

    def sandbox_image(self) -> Check:
        try:
            info = environment.resolve(self.client, self.image)
        except ImageNotFound as exc:
            if self.image.startswith(f"{_image.REPOSITORY}:"):
                return Check(
                    "sandbox image",
                    "FAIL",
                    f"{self.image} (the image for this version of the runner) is not built",
                    "`legion image build` (or `make image` in a checkout)",
                )
            return Check("sandbox image", "FAIL", f"{self.image}: {exc}", _command_in(str(exc)))
        self.image_found = True
        shown = self.image if info.reference == self.image else f"{self.image} ({info.reference})"
        return Check("sandbox image", "ok", f"{shown} is built; {_packages(info.packages)}")

    def environments(self) -> Check:
        """The environment images built on this runner, with their packages."""
        built = environment.built_environments(self.client)
        current = [e for e in built if e.current]
        older = len(built) - len(current)
        note = f"; {older} built for older runners (never selected)" if older else ""
        if not current:
            recipes = ", ".join(f"--recipe {r}" for r in environment.recipes())
            return Check(
                "environments",
                "ok",
                f"none built for this runner{note}: `legion image build {recipes}` or "
                "`legion image build --requirements FILE --name NAME` makes one",
            )
        shown = [
            f"{e.name} ({e.tag}): {_packages(e.packages)}"
            + (f", preloads {', '.join(e.preload)}" if e.preload else "")
            for e in current
        ]
        return Check("environments", "ok", "; ".join(shown) + note)

    def gvisor(self) -> Check:
        runtimes = self.info.get("Runtimes") or {}
        if "runsc" in runtimes:
            args = " ".join(runtimes["runsc"].get("runtimeArgs") or [])
            return Check("gVisor (runsc)", "ok", f"registered ({args or 'no runtimeArgs'})")
        return Check(
            "gVisor (runsc)",
            "warn",
            "runsc is not registered with the engine: SandboxLimits(runtime='runsc') will fail "
            "(the default, runc, works)",
            "scripts/ensure-gvisor as root in a Legion checkout (`make docker` runs it)",
        )

    def limits(self) -> Check:
        missing = [
            name
            for key, name in (
                ("MemoryLimit", "memory"),
                ("PidsLimit", "pids"),
                ("CpuCfsQuota", "CPU quota"),
            )
            if self.info.get(key) is False
        ]
        warnings = [w for w in self.info.get("Warnings") or [] if "limit" in w.lower()]
        if missing:
            return Check(
                "limits support",
                "FAIL",
                f"the engine cannot enforce {', '.join(missing)} limits"
                + (f" ({'; '.join(warnings)})" if warnings else ""),
                "enable the cgroup controllers: boot the kernel with "
                "`cgroup_enable=memory swapaccount=1`, or use a host with cgroup v2 and the "
                "memory, pids and cpu controllers enabled",
            )
        if self.info.get("SwapLimit") is False:
            return Check(
                "limits support",
                "warn",
                "memory, pids and CPU limits work; swap is not capped, so a sandbox may use "
                "swap beyond memory_mb",
                "boot the kernel with `swapaccount=1`, or run without swap",
            )
        return Check("limits support", "ok", "memory, swap, pids and CPU quota limits supported")

    def limits_in_force(self) -> Check:
        """The default SandboxLimits, against what the engine has."""
        limits = SandboxLimits()
        shown = (
            f"memory {limits.memory_mb} MiB, {limits.cpus:g} CPU, {limits.pids} pids, "
            f"run timeout {limits.timeout_seconds:g} s, /tmp {limits.tmpfs_mb} MiB, "
            f"tool calls {limits.tool_calls_per_second:g}/s ({limits.tool_rate_limit_mode}), "
            f"runtime {limits.runtime or 'runc'}"
        )
        memory, cpus = self.info.get("MemTotal"), self.info.get("NCPU")
        try:
            warnings = limits.check_capacity(
                memory_bytes=memory if isinstance(memory, int) and memory > 0 else None,
                cpus=float(cpus) if isinstance(cpus, int) and cpus > 0 else None,
            )
        except UsageError as exc:
            return Check(
                "limits in force",
                "FAIL",
                f"{shown}: {exc}",
                "give sandboxes smaller limits: SandboxLimits(memory_mb=..., cpus=...)",
            )
        if warnings:
            return Check(
                "limits in force", "warn", f"{shown}; {'; '.join(warnings)}", "see the warnings"
            )
        return Check("limits in force", "ok", shown)

    def socket_dir(self) -> Check:
        parent = Path(tempfile.gettempdir())
        name = "socket directory"
        try:
            parent_mode = parent.stat().st_mode
            directory = Path(tempfile.mkdtemp(prefix=f"legion-{os.getpid()}-", dir=parent))
        except OSError as exc:
            return Check(
                name,
                "FAIL",
                f"cannot create the sandbox socket directory in {parent}: {exc.strerror or exc}",
                "make it writable for this user, or point TMPDIR at a directory that is",
            )
        try:
            directory.chmod(0o755)  # as the runtime does: the container user must reach it
            info = directory.stat()
            socket_path = directory / SOCKET_NAME
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if parent_mode & stat.S_IWOTH and not parent_mode & stat.S_ISVTX:
            return Check(
                name,
                "FAIL",
                f"{parent} is writable by every user and has no sticky bit: another user "
                f"could replace a controller's socket directory",
                f"`chmod +t {parent}`, or point TMPDIR at a directory only you can write",
            )
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return Check(
                name,
                "FAIL",
                f"a new directory in {parent} is not this user's alone to write "
                f"(mode {stat.filemode(info.st_mode)})",
                "point TMPDIR at a directory of your own",
            )
        if len(str(socket_path)) > _SUN_PATH_MAX:
            return Check(
                name,
                "FAIL",
                f"socket paths in {parent} are {len(str(socket_path))} characters; Unix "
                f"sockets allow {_SUN_PATH_MAX}",
                "point TMPDIR at a shorter path, such as /tmp",
            )
        found = f"{parent}/legion-<pid>-*/ is writable, by this user only"
        host = os.environ.get("DOCKER_HOST", "")
        if host and not host.startswith("unix://"):
            return Check(
                name,
                "warn",
                f"{found}, but the engine is at {host}: it must run on this machine, because "
                "the socket directory is bind-mounted into each sandbox",
                "use the local engine (unset DOCKER_HOST)",
            )
        return Check(name, "ok", found)

    def seccomp_profile(self) -> Check:
        try:
            profile = json.loads(seccomp.profile_json())
        except (ValueError, OSError) as exc:
            return Check(
                "seccomp profile",
                "FAIL",
                f"Legion's seccomp profile does not build: {exc}",
                "reinstall legion; meanwhile SandboxLimits(seccomp_profile='engine') uses the "
                "engine's default profile",
            )
        options = " ".join(self.info.get("SecurityOptions") or [])
        if "seccomp" not in options:
            return Check(
                "seccomp profile",
                "FAIL",
                "the engine has no seccomp support, so it cannot load Legion's profile",
                "use a kernel with CONFIG_SECCOMP_FILTER and an engine built with seccomp; "
                "SandboxLimits(seccomp_profile='engine') runs without a profile (weaker)",
            )
        allowed = sum(len(rule.get("names", [])) for rule in profile.get("syscalls", []))
        return Check(
            "seccomp profile",
            "ok",
            f"Legion's profile builds ({allowed} syscalls allowed, default action "
            f"{profile.get('defaultAction', '?')}); the engine supports seccomp",
        )

    async def sandbox(self) -> Check:
        limits = SandboxLimits()
        self.progress(
            "starting a sandbox with the default limits and reading them back from inside "
            f"(at most {SANDBOX_CHECK_TIMEOUT:g} s)..."
        )
        try:
            found = await asyncio.wait_for(self._probe(limits), SANDBOX_CHECK_TIMEOUT)
        except TimeoutError:
            return Check(
                "sandbox start",
                "FAIL",
                f"a sandbox did not start and answer within {SANDBOX_CHECK_TIMEOUT:g} s",
                "check `docker ps -a` and the engine's log; the machine may be overloaded",
            )
        except Exception as exc:
            return Check(
                "sandbox start",
                "FAIL",
                f"a sandbox with the default limits failed: {exc}",
                "fix the problems above first; otherwise see the engine's log",
            )
        wrong = [
            f"{what} is {seen}, not {wanted}"
            for what, seen, wanted in (
                ("memory", found.get("memory"), limits.memory_mb * MiB),
                ("memory+swap", found.get("memsw"), limits.memory_mb * MiB),
                ("pids", found.get("pids"), limits.pids),
            )
            if seen is not None and seen != wanted
        ]
        if found.get("uid") == 0:
            wrong.append("the code runs as root")
        interfaces = found.get("interfaces")
        if interfaces is not None and interfaces != ["lo"]:
            wrong.append(f"it has network interfaces {interfaces}, not only lo")
        if wrong:
            return Check(
                "sandbox start",
                "FAIL",
                f"a sandbox started, but its limits do not hold: {'; '.join(wrong)}",
                "enable the cgroup controllers (see limits support) and check the engine's "
                "log for 'Limitation discarded'",
            )
        read = [name for name in ("memory", "pids") if found.get(name) is not None]
        source = f"read inside: {', '.join(read)}" if read else "as the engine reports them"
        return Check(
            "sandbox start",
            "ok",
            f"a sandbox started, ran code as uid {found.get('uid')} with no network and its "
            f"limits in force ({limits.memory_mb} MiB, {limits.pids} pids; {source}), and "
            f"was removed",
        )

    async def _probe(self, limits: SandboxLimits) -> dict[str, Any]:
        from .sandbox import Sandbox, SandboxRuntime  # noqa: PLC0415 - not for the fast checks

        async with (
            SandboxRuntime(pool_size=0, limits=limits, image=self.image) as runtime,
            Sandbox(runtime=runtime) as sandbox,
        ):
            result = await sandbox.run(_PROBE, timeout=30)
            if result.error is not None:
                raise RuntimeError(f"the probe code failed in the sandbox: {result.error}")
            inside: dict[str, Any] = dict(result.value)
            container_id = sandbox.container_id
            config = await asyncio.to_thread(self.client.api.inspect_container, container_id)
        host = config.get("HostConfig", {})
        # The kernel's figures when the container can read its cgroup, else the engine's.
        return {
            "uid": inside.get("uid"),
            "interfaces": inside.get("interfaces"),
            "memory": inside.get("memory") or host.get("Memory"),
            "memsw": inside.get("memsw") or host.get("MemorySwap"),
            "pids": inside.get("pids") or host.get("PidsLimit"),
        }


# Runs inside the sandbox: the limits as its own kernel sees them.
_PROBE = """
import os

def _read(*paths):
    for path in paths:
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        return int(text) if text.isdigit() else None
    return None

{
    "uid": os.getuid(),
    "interfaces": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else None,
    "memory": _read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "memsw": _read("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"),
    "pids": _read("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
}
"""


async def diagnose(
    progress: Progress = _say, on_check: Callable[[Check], None] | None = None
) -> list[Check]:
    """Run every check, in order; later checks are skipped when what they need
    failed. ``on_check`` sees each one as soon as it is done."""
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        if on_check is not None:
            on_check(check)

    doctor = _Doctor(progress)
    add(doctor.engine())
    engine_checks: list[tuple[str, Callable[[], Check]]] = [
        ("engine version", doctor.version),
        ("sandbox image", doctor.sandbox_image),
        ("environments", doctor.environments),
        ("gVisor (runsc)", doctor.gvisor),
        ("limits support", doctor.limits),
        ("limits in force", doctor.limits_in_force),
        ("seccomp profile", doctor.seccomp_profile),
    ]
    if doctor.client is None:
        for name, _ in engine_checks:
            add(Check(name, "skip", "needs the Docker engine"))
        add(doctor.socket_dir())
        add(Check("sandbox start", "skip", "needs the Docker engine"))
        return checks
    try:
        for name, check in engine_checks:
            try:
                add(check())
            except docker.errors.DockerException as exc:  # the engine went away meanwhile
                add(Check(name, "FAIL", f"the engine failed to answer: {exc}", _ENGINE_FIX))
        add(doctor.socket_dir())
        if not doctor.image_found:
            add(Check("sandbox start", "skip", "needs the sandbox image"))
        elif any(c.status == "FAIL" for c in checks):
            add(Check("sandbox start", "skip", "fix the problems above first"))
        else:
            add(await doctor.sandbox())
    finally:
        doctor.client.close()
    return checks


_NAME_WIDTH = 16  # the longest check name


def render_check(check: Check, out: TextIO) -> None:
    """One check as an aligned line, a problem's fix on the next."""
    print(f"{check.status:<5} {check.name:<{_NAME_WIDTH}}  {check.found}", file=out, flush=True)
    if check.fix and check.status in ("FAIL", "warn"):
        print(f"{'':<5} {'':<{_NAME_WIDTH}}  fix: {check.fix}", file=out, flush=True)


def render_summary(checks: list[Check], out: TextIO) -> None:
    """The closing line: how many problems, or that all is well."""
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        print(f"legion doctor: {failed} problem(s); fix them as shown above", file=out)
    else:
        note = f" ({warned} warning(s))" if warned else ""
        print(f"legion doctor: this machine can run Legion sandboxes{note}", file=out)


async def mcp_checks(
    agents: dict[str, Any], on_check: Callable[[Check], None] | None = None
) -> list[Check]:
    """One check per MCP server the agents use: connect, and list its tools
    as sandbox code will call them, or say why it cannot."""
    from ._mcp_client import MCP  # noqa: PLC0415 - only when a registry is given
    from .agent import definition_of  # noqa: PLC0415

    servers: dict[int, tuple[MCP, list[str]]] = {}
    for name, agent in agents.items():
        for tool in definition_of(agent).tools:
            if isinstance(tool.tool, MCP):
                servers.setdefault(id(tool.tool), (tool.tool, []))[1].append(name)
    checks = []
    for server, users in servers.values():
        label = f"MCP {server.name}"
        try:
            stubs = await server.list_tools()
            found = f"{len(stubs)} tools for {', '.join(users)}: " + ", ".join(
                f"{server.name}.{s.name}" for s in stubs
            )
            check = Check(label, "ok", found)
        except Exception as exc:  # any failure is the finding
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rest = "\n".join(str(exc).splitlines()[1:])
            check = Check(label, "FAIL", f"cannot list its tools: {first}", rest or "")
        finally:
            await server.close()
        checks.append(check)
        if on_check is not None:
            on_check(check)
    return checks


def main(out: TextIO | None = None, progress: Progress = _say, agents: str | None = None) -> int:
    """Print the checks; 0 when none failed (warnings allowed), else 1.

    ``agents`` (``module:registry``): also connect to every MCP server those
    agents use and list its tools."""
    out = out or sys.stdout
    checks = asyncio.run(diagnose(progress, lambda check: render_check(check, out)))
    if agents:
        from .server.app import load_registry  # noqa: PLC0415

        registry = load_registry(agents)
        checks += asyncio.run(mcp_checks(registry, lambda check: render_check(check, out)))
    render_summary(checks, out)
    return 1 if any(c.status == "FAIL" for c in checks) else 0
