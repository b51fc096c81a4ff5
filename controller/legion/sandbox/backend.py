"""The seam between the sandbox runtime and whatever runs sandboxes.

:class:`SandboxBackend` is everything :class:`legion.SandboxRuntime` needs
from an engine. :class:`~legion.sandbox.docker_backend.DockerBackend` (the
local Docker engine) is the one implementation today; a Kubernetes backend
(agent-sandbox claims) or a microVM backend is a new module that fills the
same protocol and passes ``tests/integration/test_backend_contract.py``.
docs/BACKENDS.md describes the contract.

Only plain data crosses the seam: no engine's types or keyword dicts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..config import SandboxLimits
from .endpoint import BootFile, ChannelEndpoint


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
class SandboxState:
    """What the engine says of one sandbox."""

    running: bool
    exit_code: int | None
    oom_killed: bool
    error: str


@dataclass(frozen=True)
class SandboxStats:
    """One reading of a sandbox's resource use."""

    memory_bytes: int | None
    """In use now, less the page cache the kernel can drop."""
    peak_memory_bytes: int | None
    """The most it has used; None where the engine does not say (cgroup v2)."""
    cpu_seconds: float | None
    """CPU time used since it started."""


@dataclass(frozen=True)
class Capacity:
    """What the engine has to give, as it reports it (None: it does not say)."""

    memory_bytes: int | None
    cpus: float | None


@dataclass(frozen=True)
class StartRequest:
    """Everything a backend needs to start one sandbox."""

    name: str
    """A name unique on the engine (``legion-<runtime>-<n>``)."""
    limits: SandboxLimits
    endpoint: ChannelEndpoint
    """How the runner reaches the controller; the backend makes it reachable."""
    boot: BootFile
    """The runner's boot file; the backend passes ``boot.sandbox_path`` as the
    runner's only argument and nothing secret in the environment."""
    image: str | None = None
    """The image to start (a reference :meth:`SandboxBackend.describe_image`
    answered); None: the backend's own ``image``."""


@dataclass(frozen=True)
class Package:
    """A distribution installed in a sandbox image beyond the standard library."""

    name: str
    version: str
    modules: tuple[str, ...] = ()
    """Its top-level modules that import in the sandbox (``dateutil`` for python-dateutil)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the engine knows of a sandbox image (:meth:`SandboxBackend.describe_image`)."""

    name: str
    """The image as it was asked for: an environment's name (``data``) or a reference."""
    reference: str
    """What to start containers from: a tag, or the image's id."""
    packages: tuple[Package, ...] = ()
    """What its build installed and found importable; empty for the runner's
    image, whose code has the standard library only."""
    preload: tuple[str, ...] = ()
    """Modules its warm containers import ahead of the first run."""


@dataclass(frozen=True)
class BackendSandbox:
    """One Legion sandbox as the engine lists it (``legion ps``, reaping)."""

    sandbox_id: str
    name: str
    runtime_id: str
    """The id of the SandboxRuntime that started it."""
    owner: str
    """``host/pid/start-ticks`` of the controller process that owns it."""
    state: str
    """The engine's word: running, exited, created..."""
    created: float
    """When the engine created it (seconds since the epoch)."""


@runtime_checkable
class SandboxBackend(Protocol):
    """Starts, watches and removes sandboxes for one :class:`SandboxRuntime`.

    Every method may raise :class:`legion.errors.BackendUnavailable` (the
    engine does not answer) or :class:`legion.errors.BackendError` (it refused).
    """

    image: str
    runtime_id: str

    async def check(self) -> Capacity:
        """Raise when the engine or the image is not ready (with the fix);
        else say what the engine has to give."""
        ...

    async def describe_image(self, image: str) -> ImageInfo:
        """Resolve ``image`` (an environment's name, or a reference) to what to
        start, with the packages and preload list it records. Raise
        ``ImageNotFound`` with the exact command that builds it."""
        ...

    async def start(self, request: StartRequest) -> str:
        """Create and start a sandbox; return its id. A start that its caller
        abandons still finishes, and :meth:`aclose` removes what it made."""
        ...

    async def state(self, sandbox_id: str) -> SandboxState | None:
        """Its state; None when it no longer exists."""
        ...

    async def stats(self, sandbox_id: str) -> SandboxStats | None:
        """Its resource use now; None when it no longer exists."""
        ...

    async def wait_stopped(self, sandbox_id: str, timeout: float = 5.0) -> SandboxState | None:
        """Its state once it stopped (or at the timeout); None when gone."""
        ...

    async def remove(self, sandbox_id: str) -> None:
        """Kill and remove it; one already gone is fine."""
        ...

    async def list(self, *, every_runtime: bool = False) -> list[BackendSandbox]:
        """This runtime's sandboxes, or (``every_runtime``) every Legion
        sandbox on the engine, of any controller."""
        ...

    async def reap_orphans(self) -> int:
        """Remove sandboxes whose controller process is gone; how many."""
        ...

    async def aclose(self) -> None:
        """Wait for starts in flight, remove every sandbox of this runtime
        that is left, and let go of the engine's connections."""
        ...

    def remove_owned_sync(self) -> None:
        """Without an event loop (at interpreter exit): remove every sandbox
        this process owns, of any of its runtimes."""
        ...
