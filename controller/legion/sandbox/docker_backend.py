"""Containers through the local Docker engine (docker-py, called off the event loop).

Docker errors are translated into :mod:`legion.errors` here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.utils
from docker.types import Ulimit

from .._log import get_logger
from ..config import MiB, SandboxLimits
from ..errors import BackendError, DockerUnavailable, ImageNotFound
from . import seccomp

log = get_logger("legion.sandbox.docker")

T = TypeVar("T")

LABEL = "legion.sandbox"
"""Every container Legion starts carries this label (value: the runtime id)."""
OWNER_LABEL = "legion.owner"
"""``host/pid/start-ticks`` of the controller process, so orphans can be reaped."""
SOCKET_MOUNT = "/run/legion"


def _process_start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name may hold spaces; fields after it are fixed
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}/{pid}/{_process_start_ticks(pid)}"


def owner_alive(owner: str) -> bool:
    """Whether the controller process that ``owner`` names still runs here.
    Owners on another host are assumed alive: we cannot tell."""
    try:
        host, pid, ticks = owner.split("/")
    except ValueError:
        return False
    if host != socket.gethostname():
        return True
    return _process_start_ticks(int(pid)) == ticks != ""


@dataclass(frozen=True)
class ContainerState:
    running: bool
    exit_code: int | None
    oom_killed: bool
    error: str


def _translate(exc: Exception, what: str) -> Exception:
    if isinstance(exc, docker.errors.ImageNotFound):
        return ImageNotFound(f"{what}: {exc.explanation or exc}")
    if isinstance(exc, docker.errors.APIError):
        return BackendError(f"{what}: Docker said: {exc.explanation or exc}")
    if isinstance(exc, (docker.errors.DockerException, ConnectionError, OSError)):
        return DockerUnavailable(
            f"{what}: no Docker engine answers ({exc}). Start one "
            f"(`make docker` or scripts/ensure-docker) and try again."
        )
    return exc


def memory_from_stats(stats: dict[str, Any]) -> int | None:
    """Memory in use from a stats answer, less the page cache the kernel can
    drop (inactive files), as the docker CLI shows it. None when not running."""
    memory = stats.get("memory_stats") or {}
    usage = memory.get("usage")
    if not isinstance(usage, int):
        return None
    detail = memory.get("stats") or {}
    # cgroup v1 reports total_inactive_file, v2 inactive_file.
    inactive = detail.get("total_inactive_file", detail.get("inactive_file", 0))
    return usage - inactive if isinstance(inactive, int) and inactive < usage else usage


@dataclass(frozen=True)
class ContainerStats:
    """One reading of a container's resource use (``docker stats``, one shot)."""

    memory_bytes: int | None
    """In use now, less the page cache the kernel can drop."""
    peak_memory_bytes: int | None
    """The most it has used; None where the engine does not say (cgroup v2)."""
    cpu_seconds: float | None
    """CPU time used since it started."""


def stats_from(answer: dict[str, Any]) -> ContainerStats:
    """The figures of an engine's stats answer (empty or partial for a stopped one)."""
    memory = answer.get("memory_stats") or {}
    peak = memory.get("max_usage")
    usage = (answer.get("cpu_stats") or {}).get("cpu_usage") or {}
    total = usage.get("total_usage")
    return ContainerStats(
        memory_bytes=memory_from_stats(answer),
        peak_memory_bytes=peak if isinstance(peak, int) and peak > 0 else None,
        cpu_seconds=total / 1e9 if isinstance(total, int) else None,
    )


class DockerBackend:
    """Creates, inspects and removes sandbox containers."""

    def __init__(self, *, image: str, runtime_id: str, client: Any = None) -> None:
        self.image = image
        self.runtime_id = runtime_id
        self.owner = owner_id()
        self._client = client
        self._owns_client = client is None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=60)
            except docker.errors.DockerException as exc:
                raise _translate(exc, "connecting to Docker") from exc
        return self._client

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            translated = _translate(exc, what)
            if translated is exc:
                raise
            raise translated from exc

    async def check(self) -> None:
        """Raise DockerUnavailable / ImageNotFound (with the fix) when not ready."""
        await self._call("pinging Docker", self.client.ping)
        try:
            await self._call("looking up the sandbox image", self.client.images.get, self.image)
        except ImageNotFound:
            raise ImageNotFound(
                f"the sandbox image {self.image} is not built. Run `make image` in a checkout, "
                f"or `legion image build`."
            ) from None

    def container_config(
        self, limits: SandboxLimits, *, token: str, socket_dir: Path, name: str
    ) -> dict[str, Any]:
        security_opt = ["no-new-privileges:true"]
        if limits.seccomp_profile == "legion":
            security_opt.append(f"seccomp={seccomp.profile_json()}")
        elif limits.seccomp_profile != "engine":
            security_opt.append(f"seccomp={Path(limits.seccomp_profile).read_text()}")
        config: dict[str, Any] = {
            "image": self.image,
            "command": ["python3", "-m", "legion_runner"],
            "name": name,
            "hostname": "sandbox",
            "environment": {
                "LEGION_TOKEN": token,
                "LEGION_SOCKET": f"{SOCKET_MOUNT}/legion.sock",
                "LEGION_MAX_MESSAGE_BYTES": str(limits.max_message_bytes),
                # gRPC's fork support restarts its threads in every forked
                # child (6 pids each) and aborts when it cannot: sandbox code
                # that forks must meet the pids limit, not crash the runner.
                "GRPC_ENABLE_FORK_SUPPORT": "0",
            },
            "network_disabled": True,
            "network_mode": "none",
            "mem_limit": limits.memory_mb * MiB,
            "memswap_limit": limits.memory_mb * MiB,
            "pids_limit": limits.pids,
            "nano_cpus": int(limits.cpus * 1e9),
            "read_only": True,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={limits.tmpfs_mb}m,mode=1777"},
            "shm_size": limits.shm_mb * MiB,
            "cap_drop": ["ALL"],
            "security_opt": security_opt,
            "user": limits.user,
            "init": True,
            "ulimits": [
                Ulimit(name="nofile", soft=limits.nofile, hard=limits.nofile),
                Ulimit(name="fsize", soft=limits.fsize_mb * MiB, hard=limits.fsize_mb * MiB),
                Ulimit(name="core", soft=0, hard=0),
            ],
            "log_config": {"type": "none", "config": {}},
            "labels": {LABEL: self.runtime_id, OWNER_LABEL: self.owner},
            "volumes": {str(socket_dir): {"bind": SOCKET_MOUNT, "mode": "ro"}},
            "working_dir": "/tmp",
            "detach": True,
        }
        if limits.runtime:
            config["runtime"] = limits.runtime
        return config

    async def start(self, config: dict[str, Any]) -> str:
        """Create and start a container; return its id."""

        def create_and_start() -> str:
            container = self.client.containers.create(**config)
            try:
                container.start()
            except Exception:
                container.remove(force=True)
                raise
            return str(container.id)

        return await self._call("starting a sandbox container", create_and_start)

    async def state(self, container_id: str) -> ContainerState | None:
        """The container's state, or None when it no longer exists."""
        try:
            attrs = await self._call(
                "inspecting a sandbox container", self.client.api.inspect_container, container_id
            )
        except BackendError:
            return None
        state = attrs.get("State", {})
        running = bool(state.get("Running"))
        return ContainerState(
            running=running,
            exit_code=None if running else state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error", ""),
        )

    async def memory_usage(self, container_id: str) -> int | None:
        """Bytes of memory the container uses now, counted as ``docker stats``
        counts them; None when it is gone. One non-streaming stats call."""
        found = await self.stats(container_id)
        return found.memory_bytes if found is not None else None

    async def stats(self, container_id: str) -> ContainerStats | None:
        """Memory now and at its peak, and CPU time used; None when the
        container is gone. One non-streaming stats call."""
        api = self.client.api
        # Without one-shot the engine waits for a second sample (CPU figures).
        one_shot = None if docker.utils.version_lt(api.api_version, "1.41") else True

        def stats() -> dict[str, Any]:
            try:
                answer: dict[str, Any] = api.stats(container_id, stream=False, one_shot=one_shot)
            except ValueError:  # an empty body: the container stopped as it was asked
                return {}
            return answer

        try:
            found = await self._call("reading a sandbox container's stats", stats)
        except BackendError:  # gone
            return None
        return stats_from(found)

    async def wait_stopped(self, container_id: str, timeout: float = 5.0) -> ContainerState | None:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state(container_id)
            if state is None or not state.running or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.05)

    async def remove(self, container_id: str) -> None:
        """Kill (SIGKILL) and remove; a container already gone is fine."""

        def remove() -> None:
            try:
                self.client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if "already in progress" not in str(exc):
                    raise

        await self._call("removing a sandbox container", remove)

    def list_ids(self) -> list[str]:
        """Ids of every container of this runtime, running or not."""
        label = f"{LABEL}={self.runtime_id}"
        return [c["Id"] for c in self.client.api.containers(all=True, filters={"label": label})]

    async def all_sandboxes(self) -> list[dict[str, Any]]:
        """The engine's summaries of every Legion container, of any controller."""
        containers: list[dict[str, Any]] = await self._call(
            "listing sandbox containers",
            self.client.api.containers,
            all=True,
            filters={"label": LABEL},
        )
        return containers

    async def reap_orphans(self) -> int:
        """Remove containers whose controller process is gone. Returns how many."""

        def reap() -> int:
            removed = 0
            for c in self.client.api.containers(all=True, filters={"label": LABEL}):
                owner = c.get("Labels", {}).get(OWNER_LABEL, "")
                if owner_alive(owner):
                    continue
                try:
                    self.client.api.remove_container(c["Id"], force=True)
                    removed += 1
                except docker.errors.NotFound:
                    pass
            return removed

        removed = await self._call("removing orphaned sandbox containers", reap)
        if removed:
            log.info("sandbox_orphans_removed", count=removed)
        return removed

    def close(self) -> None:
        """Close the engine connections, if this backend opened them."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    def remove_all_sync(self) -> None:
        """Remove every container of this runtime, without an event loop (atexit)."""
        for container_id in self.list_ids():
            with contextlib.suppress(docker.errors.DockerException):
                self.client.api.remove_container(container_id, force=True)
