"""Sandboxes as containers of the local Docker engine: the Docker backend.

The only module of the runtime that imports docker-py (image building and
``legion doctor`` use it too). Calls run off the event loop, in threads of
this module's own: a start whose caller is cancelled (as ``asyncio.run``
cancels every task at its end) still finishes, and :meth:`DockerBackend.aclose`
waits for it and removes what it made. Docker errors are translated into
:mod:`legion.errors` here, once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import docker.utils
from docker.types import Ulimit

from .._log import get_logger
from ..config import MiB
from ..errors import BackendError, DockerUnavailable, ImageNotFound, UsageError
from . import environment, seccomp
from .backend import (
    BackendSandbox,
    Capacity,
    ImageInfo,
    SandboxState,
    SandboxStats,
    StartRequest,
    owner_alive,
    owner_id,
)
from .endpoint import UnixSocketEndpoint
from .files import WORK_DIR

log = get_logger("legion.sandbox.docker")

T = TypeVar("T")

LABEL = "legion.sandbox"
"""Every container Legion starts carries this label (value: the runtime id)."""
OWNER_LABEL = "legion.owner"
"""``host/pid/start-ticks`` of the controller process, so orphans can be reaped."""

# Engine calls run here, not in asyncio's default executor: a call whose
# awaiting task is cancelled goes on, and closing waits for the starts.
_ENGINE_THREADS = 32
_engine_pool: concurrent.futures.ThreadPoolExecutor | None = None
_engine_pool_lock = threading.Lock()


def _engine_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _engine_pool  # noqa: PLW0603 - one pool per process, made on first use
    with _engine_pool_lock:
        if _engine_pool is None:
            _engine_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=_ENGINE_THREADS, thread_name_prefix="legion-docker"
            )
        return _engine_pool


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


def stats_from(answer: dict[str, Any]) -> SandboxStats:
    """The figures of an engine's stats answer (empty or partial for a stopped one)."""
    memory = answer.get("memory_stats") or {}
    peak = memory.get("max_usage")
    usage = (answer.get("cpu_stats") or {}).get("cpu_usage") or {}
    total = usage.get("total_usage")
    return SandboxStats(
        memory_bytes=memory_from_stats(answer),
        peak_memory_bytes=peak if isinstance(peak, int) and peak > 0 else None,
        cpu_seconds=total / 1e9 if isinstance(total, int) else None,
    )


class DockerBackend:
    """Creates, inspects and removes sandbox containers on a Docker engine.

    ``client``: a docker-py client to use (and not close); by default one
    from the environment (``DOCKER_HOST``), made on first use.
    """

    def __init__(self, *, image: str, runtime_id: str, client: Any = None) -> None:
        self.image = image
        self.runtime_id = runtime_id
        self.owner = owner_id()
        self._client = client
        self._owns_client = client is None
        self._starts: set[concurrent.futures.Future[str]] = set()

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=60)
            except docker.errors.DockerException as exc:
                raise _translate(exc, "connecting to Docker") from exc
        return self._client

    def _submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        return _engine_executor().submit(fn, *args)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.wrap_future(self._submit(functools.partial(fn, *args, **kwargs)))
        except Exception as exc:
            translated = _translate(exc, what)
            if translated is exc:
                raise
            raise translated from exc

    async def check(self) -> Capacity:
        """Raise DockerUnavailable / ImageNotFound (with the fix) when not
        ready; else the engine's memory and CPUs."""
        info = await self._call("asking Docker about itself", self.client.info)
        await self.describe_image(self.image)
        memory, cpus = info.get("MemTotal"), info.get("NCPU")
        return Capacity(
            memory_bytes=memory if isinstance(memory, int) and memory > 0 else None,
            cpus=float(cpus) if isinstance(cpus, int) and cpus > 0 else None,
        )

    async def describe_image(self, image: str) -> ImageInfo:
        """``image`` resolved (an environment's name to its build on this
        runner), with the packages and preload list its labels record."""
        return await self._call(
            f"looking up the sandbox image {image}", environment.resolve, self.client, image
        )

    def container_config(self, request: StartRequest) -> dict[str, Any]:
        """docker-py's ``containers.create`` arguments for ``request``."""
        limits = request.limits
        endpoint = request.endpoint
        if not isinstance(endpoint, UnixSocketEndpoint):
            raise UsageError(
                f"the Docker backend reaches runners through a UnixSocketEndpoint, "
                f"not {type(endpoint).__name__}"
            )
        security_opt = ["no-new-privileges:true"]
        if limits.seccomp_profile == "legion":
            security_opt.append(f"seccomp={seccomp.profile_json()}")
        elif limits.seccomp_profile != "engine":
            security_opt.append(f"seccomp={Path(limits.seccomp_profile).read_text()}")
        config: dict[str, Any] = {
            "image": request.image or self.image,
            # The boot file (token, address) is the runner's only input: nothing
            # of ours is in the environment, which sandbox code could read.
            "command": ["python3", "-m", "legion_runner", request.boot.sandbox_path],
            "name": request.name,
            "hostname": "sandbox",
            "network_disabled": True,
            "network_mode": "none",
            "mem_limit": limits.memory_mb * MiB,
            "memswap_limit": limits.memory_mb * MiB,
            "pids_limit": limits.pids,
            "nano_cpus": int(limits.cpus * 1e9),
            "read_only": True,
            "tmpfs": {
                "/tmp": f"rw,nosuid,nodev,noexec,size={limits.tmpfs_mb}m,mode=1777",
                # The work directory (legion.sandbox.files), also the current one.
                WORK_DIR: f"rw,nosuid,nodev,noexec,size={limits.files_mb}m,mode=1777",
            },
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
            "volumes": {str(endpoint.directory): {"bind": endpoint.mount_path, "mode": "ro"}},
            "working_dir": WORK_DIR,
            "detach": True,
        }
        if limits.runtime:
            config["runtime"] = limits.runtime
        return config

    async def start(self, request: StartRequest) -> str:
        """Create and start a container; return its id."""
        config = self.container_config(request)

        def create_and_start() -> str:
            container = self.client.containers.create(**config)
            try:
                container.start()
            except Exception:
                container.remove(force=True)
                raise
            return str(container.id)

        started = self._submit(create_and_start)
        # Kept until done, whoever awaits it: aclose waits for every start.
        self._starts.add(started)
        started.add_done_callback(self._starts.discard)
        try:
            return await asyncio.wrap_future(started)
        except Exception as exc:
            translated = _translate(exc, "starting a sandbox container")
            if translated is exc:
                raise
            raise translated from exc

    async def state(self, sandbox_id: str) -> SandboxState | None:
        """The container's state, or None when it no longer exists."""
        try:
            attrs = await self._call(
                "inspecting a sandbox container", self.client.api.inspect_container, sandbox_id
            )
        except BackendError:
            return None
        state = attrs.get("State", {})
        running = bool(state.get("Running"))
        return SandboxState(
            running=running,
            exit_code=None if running else state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error", ""),
        )

    async def memory_usage(self, sandbox_id: str) -> int | None:
        """Bytes of memory the container uses now, counted as ``docker stats``
        counts them; None when it is gone. One non-streaming stats call."""
        found = await self.stats(sandbox_id)
        return found.memory_bytes if found is not None else None

    async def stats(self, sandbox_id: str) -> SandboxStats | None:
        """Memory now and at its peak, and CPU time used; None when the
        container is gone. One non-streaming stats call."""
        api = self.client.api
        # Without one-shot the engine waits for a second sample (CPU figures).
        one_shot = None if docker.utils.version_lt(api.api_version, "1.41") else True

        def stats() -> dict[str, Any]:
            try:
                answer: dict[str, Any] = api.stats(sandbox_id, stream=False, one_shot=one_shot)
            except ValueError:  # an empty body: the container stopped as it was asked
                return {}
            return answer

        try:
            found = await self._call("reading a sandbox container's stats", stats)
        except BackendError:  # gone
            return None
        return stats_from(found)

    async def wait_stopped(self, sandbox_id: str, timeout: float = 5.0) -> SandboxState | None:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state(sandbox_id)
            if state is None or not state.running or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.05)

    def _remove_sync(self, sandbox_id: str) -> None:
        try:
            self.client.api.remove_container(sandbox_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise

    async def remove(self, sandbox_id: str) -> None:
        """Kill (SIGKILL) and remove; a container already gone is fine."""
        await self._call("removing a sandbox container", self._remove_sync, sandbox_id)

    def _summaries(self, label: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.client.api.containers(all=True, filters={"label": label})
        return found

    async def list(self, *, every_runtime: bool = False) -> list[BackendSandbox]:
        label = LABEL if every_runtime else f"{LABEL}={self.runtime_id}"
        found = await self._call("listing sandbox containers", self._summaries, label)
        listed = []
        for c in found:
            labels = c.get("Labels") or {}
            names = c.get("Names") or [""]
            listed.append(
                BackendSandbox(
                    sandbox_id=c["Id"],
                    name=names[0].lstrip("/"),
                    runtime_id=labels.get(LABEL, ""),
                    owner=labels.get(OWNER_LABEL, ""),
                    state=c.get("State", ""),
                    created=float(c.get("Created") or time.time()),
                )
            )
        return listed

    async def reap_orphans(self) -> int:
        """Remove containers whose controller process is gone. Returns how many."""

        def reap() -> int:
            removed = 0
            for c in self._summaries(LABEL):
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

    async def aclose(self) -> None:
        """Wait for the starts in flight, remove this runtime's containers
        that are left (one list call), and close the engine connections."""
        try:
            if self._starts:
                await asyncio.wrap_future(self._submit(concurrent.futures.wait, list(self._starts)))
            if self._client is not None:
                left = await self.list()
                await asyncio.gather(*(self.remove(s.sandbox_id) for s in left))
        except DockerUnavailable as exc:
            # Nothing more can be done now; at exit this process's
            # containers are looked for again, and the next runtime to
            # start reaps them once this process is gone.
            log.warning("sandbox_close_engine_away", runtime=self.runtime_id[:8], error=str(exc))
        finally:
            self.close()

    def close(self) -> None:
        """Close the engine connections, if this backend opened them."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    def remove_owned_sync(self) -> None:
        """Remove every container this process owns, of any runtime, without
        an event loop (atexit). Starts in flight have finished by then: the
        interpreter joins this module's threads before atexit hooks run."""
        client = self._client or docker.from_env(timeout=30)
        try:
            for c in client.api.containers(
                all=True, filters={"label": f"{OWNER_LABEL}={self.owner}"}
            ):
                with contextlib.suppress(docker.errors.DockerException):
                    client.api.remove_container(c["Id"], force=True)
        finally:
            if client is not self._client:
                client.close()
