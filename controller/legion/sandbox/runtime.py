"""A sandbox runtime: the channel server, a backend and a warm pool.

One runtime serves many :class:`legion.Sandbox` objects, one container each.
``Sandbox()`` without ``runtime=`` uses a default runtime for the running event
loop, started on first use and closed with the loop (and, failing that, at
interpreter exit).

The runtime talks to its engine only through a :class:`SandboxBackend`
(the Docker one unless told otherwise), and tells runners where to dial
through a :class:`ChannelEndpoint`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import secrets
import shutil
import tempfile
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import telemetry
from .._log import get_logger
from .._proto import sandbox_pb2 as pb
from ..config import SandboxLimits
from ..errors import ImageNotFound, SandboxError, SandboxStartError, UsageError
from . import image as _image
from .backend import (
    Capacity,
    ImageInfo,
    SandboxBackend,
    SandboxState,
    SandboxStats,
    StartRequest,
    owner_alive,
)
from .channel import ChannelServer, Connection, channel_server
from .endpoint import SOCKET_NAME, BootFile, UnixSocketEndpoint

log = get_logger("legion.sandbox.runtime")

DEFAULT_POOL_SIZE = 2


@dataclass
class Lease:
    """A started container whose runner said Hello, held by one Sandbox."""

    container_id: str
    connection: Connection
    limits: SandboxLimits
    started_at: float
    """``time.monotonic()`` when the runner said Hello."""
    in_use: bool = False
    """Handed to a Sandbox (False while it waits in the warm pool)."""
    run_id: str | None = None
    """The run that was current when a Sandbox acquired it."""
    agent: str | None = None
    """The agent the acquiring Sandbox said it works for."""
    image: str | None = None
    """The image it was started from, as the Sandbox asked for it (None: the runtime's)."""


@dataclass(frozen=True)
class LiveSandbox:
    """One live container of a runtime, as :meth:`SandboxRuntime.sandboxes` sees it."""

    container_id: str
    run_id: str | None
    """The run using it; None for a warm, unused one (or a Sandbox used outside any run)."""
    agent: str | None
    """The agent whose code runs in it, when its Sandbox was told."""
    age_seconds: float
    """Seconds since its runner said Hello."""
    memory_bytes: int | None
    """Memory in use, as ``docker stats`` counts it; None when not asked for, or unknown."""
    in_use: bool
    """Acquired by a Sandbox; False while it waits in the warm pool."""
    limits: SandboxLimits | None = None
    """The limits it was started with."""
    peak_memory_bytes: int | None = None
    """The most memory it has used, when measured and the engine says (cgroup v1)."""
    cpu_seconds: float | None = None
    """CPU time it has used since it started, when measured."""
    image: str | None = None
    """Its image, when not the runtime's default (an environment's name, or a reference)."""


@dataclass(frozen=True)
class HostSandbox:
    """A Legion container on this machine's engine, of any controller (``legion ps``)."""

    container_id: str
    name: str
    runtime_id: str
    """The id of the SandboxRuntime that started it."""
    owner: str
    """``host/pid/start-ticks`` of the controller process that owns it."""
    owner_pid: int | None
    owner_alive: bool
    """False: its controller died; the next runtime to start removes it."""
    state: str
    """The engine's word: running, exited, created..."""
    age_seconds: float
    """Seconds since the engine created it."""
    memory_bytes: int | None


def _docker_backend(image: str, runtime_id: str, client: Any) -> SandboxBackend:
    # Imported here: docker-py is the Docker backend's alone, and a program
    # that only talks to a controller (legion.client) never loads it.
    from .docker_backend import DockerBackend  # noqa: PLC0415

    return DockerBackend(image=image, runtime_id=runtime_id, client=client)


def _env_pool_size() -> int:
    raw = os.environ.get("LEGION_POOL_SIZE")
    if raw is None:
        return DEFAULT_POOL_SIZE
    try:
        size = int(raw)
    except ValueError:
        raise UsageError(f"LEGION_POOL_SIZE must be a whole number, got {raw!r}") from None
    if size < 0:
        raise UsageError("LEGION_POOL_SIZE must be 0 (cold starts) or more")
    return size


class SandboxRuntime:
    """Starts and removes sandbox containers and keeps a pool of ready ones.

    Use it as an async context manager, or call :meth:`start` and
    :meth:`aclose`. Containers left by a controller that died are removed at
    start-up; every container this runtime started is removed by ``aclose``.

    ``pool_size`` containers with the runtime's default ``limits`` and
    ``image`` are kept started and ready (0: every sandbox is a cold start).
    Sandboxes with other limits or another image are started cold.

    ``image``: an environment's name (``"data"``, built with ``legion image
    build``) or an image reference; default ``LEGION_IMAGE``, else the runner
    image of this version. ``preload``: modules each warm container imports
    before it is handed out, so the first run does not pay for ``import
    pandas``; default: the list the image declares (its ``legion.preload``
    label), ``()`` for none.
    """

    def __init__(
        self,
        *,
        limits: SandboxLimits | None = None,
        pool_size: int | None = None,
        image: str | None = None,
        socket_dir: Path | None = None,
        backend: SandboxBackend | None = None,
        docker_client: Any = None,
        preload: Sequence[str] | None = None,
    ) -> None:
        self.limits = limits or SandboxLimits()
        if isinstance(preload, str):
            raise UsageError("preload takes a list of module names, such as ['pandas']")
        self._preload_asked = None if preload is None else tuple(preload)
        self.preload: tuple[str, ...] = ()
        """The modules warm containers import ahead, once started."""
        self.image_info: ImageInfo | None = None
        """The default image as the backend resolved it, once started."""
        self._images: dict[str, ImageInfo] = {}
        self._preload_warned = False
        self.pool_size = _env_pool_size() if pool_size is None else pool_size
        if self.pool_size < 0:
            raise UsageError("pool_size must be 0 (cold starts) or more")
        if backend is not None:
            if image is not None or docker_client is not None:
                raise UsageError(
                    "give SandboxRuntime a backend or image=/docker_client=, not both: "
                    "the backend carries its own image and engine"
                )
            self.id = backend.runtime_id
            self.image = backend.image
            self.backend = backend
        else:
            self.id = uuid.uuid4().hex
            self.image = image or os.environ.get("LEGION_IMAGE") or _image.image_tag()
            self.backend = _docker_backend(self.image, self.id, docker_client)
        self.capacity: Capacity | None = None
        """What the engine has to give, once started."""
        self._warned: set[SandboxLimits] = set()
        self._socket_parent = socket_dir
        self._dir: Path | None = None
        self.endpoint: UnixSocketEndpoint | None = None
        """Where this runtime's runners dial in, once started."""
        self._channel: ChannelServer | None = None
        self._ready: deque[Lease] = deque()
        self._starting = 0
        self._failures = 0
        self._refill_wanted = asyncio.Event()
        self._pool_full = asyncio.Event()
        self._refill_task: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()
        self._removing: set[str] = set()
        self._unremoved: set[str] = set()
        """Containers whose removal failed (the engine was away)."""
        self._pool_starts: set[asyncio.Task[None]] = set()
        self._waiters: deque[asyncio.Future[Lease]] = deque()
        self._containers: set[str] = set()
        self._leases: dict[str, Lease] = {}  # said Hello, not yet released
        self._names = itertools.count(1)
        self._state = "new"
        self._start_lock = asyncio.Lock()
        self._closer: AsyncIterator[None] | None = None

    # lifecycle -------------------------------------------------------------

    async def start(self) -> SandboxRuntime:
        async with self._start_lock:
            if self._state == "started":
                return self
            if self._state == "closed":
                raise SandboxError("this SandboxRuntime is closed")
            self.capacity = await self.backend.check()
            self.image_info = await self.backend.describe_image(self.image)
            self._images[self.image] = self.image_info
            self.preload = (
                self._preload_asked if self._preload_asked is not None else self.image_info.preload
            )
            self._check_limits(self.limits)
            await self.backend.reap_orphans()
            parent = Path(self._socket_parent or tempfile.gettempdir())
            _reap_socket_dirs(parent)
            # The owner's pid in the name: a later runtime removes the
            # directories of controllers that died without cleaning up.
            self._dir = Path(tempfile.mkdtemp(prefix=f"legion-{os.getpid()}-", dir=parent))
            # The container's unprivileged user must reach the socket and its
            # own boot file, but not list the others' (0711).
            self._dir.chmod(0o711)
            self.endpoint = UnixSocketEndpoint(self._dir)
            self._channel = channel_server(
                self.endpoint.socket_path, max_message_bytes=self.limits.max_message_bytes
            )
            await self._channel.start()
            _live_runtimes.add(self)
            _owners[type(self.backend)] = self.backend
            self._state = "started"
            if self.pool_size:
                self._refill_task = asyncio.create_task(self._refill(), name="legion-pool")
            log.debug(
                "sandbox_runtime_started",
                runtime=self.id,
                image=self.image,
                pool_size=self.pool_size,
            )
            return self

    async def aclose(self) -> None:
        """Remove every container this runtime started and stop the channel."""
        if self._state != "started":
            self._state = "closed"
            return
        self._state = "closing"
        try:
            if self._refill_task is not None:
                self._refill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._refill_task
            # Starts in flight finish and see the runtime closing: they release
            # what they started (a container being created cannot be cancelled).
            await asyncio.gather(*list(self._pool_starts), return_exceptions=True)
            while self._ready:
                self.release(self._ready.popleft())
            for container_id in list(self._containers):
                self._remove(container_id)
            while self._removals:
                await asyncio.gather(*list(self._removals), return_exceptions=True)
            # What no task of ours knows of: a start whose caller was cancelled
            # (asyncio.run cancels every task before it closes the runtime).
            await self.backend.aclose()
            self._containers.clear()
        finally:
            if self._channel is not None:
                await self._channel.stop()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            _live_runtimes.discard(self)
            self._state = "closed"

    async def __aenter__(self) -> SandboxRuntime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def warm(self) -> None:
        """Start if needed, and wait until the pool holds ``pool_size`` ready containers."""
        await self.start()
        if self.pool_size:
            await self._pool_full.wait()

    @property
    def live_containers(self) -> frozenset[str]:
        """Ids of the containers this runtime has started and not yet removed."""
        return frozenset(self._containers)

    async def sandboxes(self, *, memory: bool = True) -> list[LiveSandbox]:
        """The live containers whose runner is connected: in use by a Sandbox,
        or waiting in the pool. With ``memory``, each one's memory (now and
        peak) and CPU time are read from the engine (one stats call per
        container, all at once); nothing is measured unless this is called."""
        now = time.monotonic()
        leases = [lease for lease in self._leases.values() if lease.connection.is_open]
        usage: list[SandboxStats | None] = [None] * len(leases)
        if memory and leases:
            usage = await asyncio.gather(
                *(self.backend.stats(lease.container_id) for lease in leases)
            )
        return [
            LiveSandbox(
                container_id=lease.container_id,
                run_id=lease.run_id,
                agent=lease.agent,
                age_seconds=now - lease.started_at,
                memory_bytes=used.memory_bytes if used is not None else None,
                in_use=lease.in_use,
                limits=lease.limits,
                peak_memory_bytes=used.peak_memory_bytes if used is not None else None,
                cpu_seconds=used.cpu_seconds if used is not None else None,
                image=lease.image,
            )
            for lease, used in zip(leases, usage, strict=True)
        ]

    # containers ------------------------------------------------------------

    async def acquire(
        self,
        limits: SandboxLimits | None = None,
        *,
        agent: str | None = None,
        image: str | None = None,
    ) -> Lease:
        """A ready container: from the pool when the limits and image match,
        else cold.

        ``image``: an environment's name or an image reference (None: the
        runtime's); one that is not built raises :class:`legion.ImageNotFound`
        with the command that builds it. The lease records the current run
        (:func:`legion.telemetry.current_run`) and ``agent``, for :meth:`sandboxes`.
        """
        if self._state != "started":
            await self.start()
        info = await self.describe_image(image) if image else self.image_info
        assert info is not None and self.image_info is not None
        default = info.reference == self.image_info.reference
        lease = await self._acquire(limits, None if default else info)
        lease.in_use = True
        lease.run_id = telemetry.current_run()[0]
        lease.agent = agent
        lease.image = None if default else image
        return lease

    async def describe_image(self, image: str) -> ImageInfo:
        """``image`` resolved by the backend (an environment's name to its build
        on this runner), with its packages; ImageNotFound says how to build it.
        Remembered for the runtime's life."""
        info = self._images.get(image)
        if info is None:
            info = self._images[image] = await self.backend.describe_image(image)
        return info

    async def _acquire(self, limits: SandboxLimits | None, other: ImageInfo | None) -> Lease:
        limits = limits or self.limits
        if limits.max_message_bytes > self.limits.max_message_bytes:
            raise UsageError(
                f"max_message_bytes={limits.max_message_bytes} is above this runtime's "
                f"{self.limits.max_message_bytes}: its channel cannot carry such messages. Set it "
                f"on the runtime instead: SandboxRuntime(limits=SandboxLimits("
                f"max_message_bytes=...))."
            )
        if limits is not self.limits:
            self._check_limits(limits)
        if other is not None:
            return await self._start_container(limits, other)
        if limits == self.limits:
            while self._ready:
                lease = self._ready.popleft()
                self._pool_full.clear()
                self._refill_wanted.set()
                if lease.connection.is_open:
                    return lease
                self.release(lease)
            if self._starting > len(self._waiters):
                # A pool container is on its way and will be ready sooner than
                # a new one: take it rather than start a third.
                waiter: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    lease = await waiter
                except SandboxError:
                    pass  # that start failed; start one of our own
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        self.release(waiter.result())  # handed over as we were cancelled
                    raise
                else:
                    self._refill_wanted.set()
                    return lease
        return await self._start_container(limits)

    async def stopped_state(self, lease: Lease) -> SandboxState | None:
        """The state of a leased container once it has stopped (or a few
        seconds on); None when it is gone. How a crash is told from an OOM kill."""
        return await self.backend.wait_stopped(lease.container_id)

    def _check_limits(self, limits: SandboxLimits) -> None:
        """UsageError for limits the engine cannot give; a warning, once per
        set of limits, for ones that are allowed but surprising."""
        if limits in self._warned:
            return
        capacity = self.capacity or Capacity(memory_bytes=None, cpus=None)
        for warning in limits.check_capacity(
            memory_bytes=capacity.memory_bytes, cpus=capacity.cpus
        ):
            log.warning("sandbox_limits_surprising", runtime=self.id[:8], warning=warning)
        if len(self._warned) < 64:  # a program with ever-new limits is checked each time
            self._warned.add(limits)

    def release(self, lease: Lease) -> asyncio.Task[None]:
        """Kill and remove a leased container in the background."""
        self._leases.pop(lease.container_id, None)
        lease.connection.attach(None)
        lease.connection.close()
        return self._remove(lease.container_id)

    def _remove(self, container_id: str) -> asyncio.Task[None]:
        async def remove() -> None:
            self._leases.pop(container_id, None)
            self._removing.add(container_id)
            try:
                await self.backend.remove(container_id)
            except SandboxError as exc:
                # Tried again when the engine next starts a container, and at aclose.
                self._unremoved.add(container_id)
                log.warning("sandbox_remove_failed", container=container_id[:12], error=str(exc))
            else:
                self._containers.discard(container_id)
                self._unremoved.discard(container_id)
            finally:
                self._removing.discard(container_id)

        task = asyncio.create_task(remove())
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        return task

    async def _start_container(
        self, limits: SandboxLimits, image: ImageInfo | None = None
    ) -> Lease:
        if self._channel is None or self.endpoint is None or self.image_info is None:
            raise SandboxError("the runtime is not started")
        image = image or self.image_info
        token = secrets.token_urlsafe(32)
        hello = self._channel.expect(token)
        boot = self.endpoint.write_boot(token=token, max_message_bytes=limits.max_message_bytes)
        request = StartRequest(
            name=f"legion-{self.id[:8]}-{next(self._names)}",
            limits=limits,
            endpoint=self.endpoint,
            boot=boot,
            image=image.reference,
        )
        begun = time.perf_counter()
        # Creating runs in a thread that a cancelled caller cannot stop: shield
        # it, and remove what it created if the caller has gone.
        creating = asyncio.ensure_future(self.backend.start(request))
        try:
            container_id = await asyncio.shield(creating)
        except ImageNotFound:
            self._channel.forget(token)
            boot.discard()
            self._images.pop(image.name, None)  # removed since: say how to build it again
            await self.backend.describe_image(image.name)
            raise
        except BaseException:
            self._channel.forget(token)
            boot.discard()
            creating.add_done_callback(self._remove_if_created)
            raise
        self._containers.add(container_id)
        for stuck in self._unremoved - self._removing:  # the engine answers again
            self._remove(stuck)
        try:
            connection = await self._await_hello(container_id, hello, limits, boot, image)
        except BaseException:
            self._channel.forget(token)
            self._remove(container_id)
            raise
        finally:
            # Read by now (or never to be): the token must not outlive the Hello.
            boot.discard()
        log.debug(
            "sandbox_started",
            container=container_id[:12],
            ms=round((time.perf_counter() - begun) * 1000, 1),
        )
        lease = self._leases[container_id] = Lease(
            container_id, connection, limits, time.monotonic()
        )
        return lease

    def _remove_if_created(self, creating: asyncio.Future[str]) -> None:
        if not creating.cancelled() and creating.exception() is None:
            self._containers.add(creating.result())
            self._remove(creating.result())

    async def _await_hello(
        self,
        container_id: str,
        hello: asyncio.Future[Connection],
        limits: SandboxLimits,
        boot: BootFile,
        image: ImageInfo,
    ) -> Connection:
        deadline = time.monotonic() + limits.start_timeout_seconds
        while True:
            try:
                connection = await asyncio.wait_for(asyncio.shield(hello), 1.0)
            except TimeoutError:
                pass
            else:
                boot.discard()  # before anyone can send code to the sandbox
                return connection
            state = await self.backend.state(container_id)
            if state is None or not state.running:
                code = None if state is None else state.exit_code
                raise SandboxStartError(
                    f"the sandbox container exited (code {code}) before its runner connected. "
                    f"Check that the image {image.name} is a Legion sandbox image "
                    f"(`legion image build`) and that the limits leave room to start "
                    f"(memory_mb={limits.memory_mb}, pids={limits.pids})."
                )
            if time.monotonic() > deadline:
                raise SandboxStartError(
                    f"the sandbox runner did not connect within {limits.start_timeout_seconds:g}"
                    f" s; the machine may be overloaded (raise start_timeout_seconds)"
                )

    # the warm pool -----------------------------------------------------------

    async def _refill(self) -> None:
        while True:
            missing = self.pool_size - len(self._ready) - self._starting
            for _ in range(max(0, min(missing, 2 - self._starting))):
                self._starting += 1
                task = asyncio.create_task(self._start_for_pool())
                self._pool_starts.add(task)
                task.add_done_callback(self._pool_starts.discard)
            self._refill_wanted.clear()
            await self._refill_wanted.wait()

    async def _start_for_pool(self) -> None:
        try:
            lease = await self._start_container(self.limits)
            if self.preload:
                await self._run_preload(lease)
        except Exception as exc:
            self._failures += 1
            self._hand_over(exc)
            if self._state == "started":
                log.warning("sandbox_pool_start_failed", error=str(exc), failures=self._failures)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(self._failures, 6)))
        else:
            self._failures = 0
            if self._state != "started":
                self.release(lease)
            elif not self._hand_over(lease):
                self._ready.append(lease)
                if len(self._ready) >= self.pool_size:
                    self._pool_full.set()
        finally:
            self._starting -= 1
            self._refill_wanted.set()

    async def _run_preload(self, lease: Lease) -> None:
        """Import the preload modules in a warm container, leaving its
        namespace as it was (the modules stay imported). A failed import is
        logged once; the container is handed out all the same."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[pb.ExecuteResult] = loop.create_future()
        exec_id = uuid.uuid4().hex

        def on_message(message: pb.RunnerMessage) -> None:
            kind = message.WhichOneof("kind")
            ours = kind == "execute_result" and message.execute_result.exec_id == exec_id
            if ours and not done.done():
                done.set_result(message.execute_result)

        def on_closed(reason: str) -> None:
            if not done.done():
                done.set_exception(SandboxStartError(f"a warm container ended: {reason}"))

        timeout = self.limits.timeout_seconds
        lease.connection.attach(on_message, on_closed)
        try:
            lease.connection.send(
                pb.ControllerMessage(
                    execute=pb.Execute(
                        exec_id=exec_id,
                        code=preload_code(self.preload),
                        timeout_seconds=timeout,
                        output_limit_bytes=4096,
                    )
                )
            )
            try:
                result = await asyncio.wait_for(done, timeout + 5)
            except TimeoutError:
                self.release(lease)
                raise SandboxStartError(
                    f"importing {', '.join(self.preload)} (preload) took over {timeout:g} s"
                ) from None
            except BaseException:
                self.release(lease)
                raise
        finally:
            lease.connection.attach(None)
        if result.error.type and not self._preload_warned:
            self._preload_warned = True
            log.warning(
                "sandbox_preload_failed",
                runtime=self.id[:8],
                modules=list(self.preload),
                error=f"{result.error.type}: {result.error.message}",
            )

    def _hand_over(self, outcome: Lease | Exception) -> bool:
        """Give a pool start's outcome to the first acquire waiting for one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.done():  # its caller was cancelled
                continue
            if isinstance(outcome, Lease):
                waiter.set_result(outcome)
            else:
                waiter.set_exception(SandboxStartError(str(outcome)))
            return True
        return False


def preload_code(modules: Sequence[str]) -> str:
    """Code that imports ``modules`` and binds no name in the namespace."""
    return (
        "import importlib as _legion_importlib\n"
        "try:\n"
        f"    for _legion_module in {list(modules)!r}:\n"
        "        _legion_importlib.import_module(_legion_module)\n"
        "finally:\n"
        "    del _legion_importlib\n"
        "    if '_legion_module' in globals():\n"
        "        del _legion_module\n"
    )


async def host_sandboxes(
    *, memory: bool = True, backend: SandboxBackend | None = None
) -> list[HostSandbox]:
    """Every Legion sandbox on this machine's engine, whichever controller
    process started it (``legion ps`` without ``--remote``). With
    ``memory``, running ones have their memory read (one stats call each, all
    at once). Raises BackendUnavailable when no engine answers."""
    lister = backend or _docker_backend("", "", None)  # it only lists
    try:
        found = await lister.list(every_runtime=True)
        running = [s.sandbox_id for s in found if s.state == "running"]
        usage: dict[str, int | None] = {}
        if memory and running:
            measured = await asyncio.gather(*(lister.stats(sid) for sid in running))
            usage = {
                sid: stats.memory_bytes if stats is not None else None
                for sid, stats in zip(running, measured, strict=True)
            }
    finally:
        if backend is None:
            await lister.aclose()
    now = time.time()
    sandboxes = []
    for s in found:
        pid = s.owner.split("/")[1] if s.owner.count("/") == 2 else ""
        sandboxes.append(
            HostSandbox(
                container_id=s.sandbox_id,
                name=s.name,
                runtime_id=s.runtime_id,
                owner=s.owner,
                owner_pid=int(pid) if pid.isdigit() else None,
                owner_alive=owner_alive(s.owner),
                state=s.state,
                age_seconds=max(0.0, now - s.created),
                memory_bytes=usage.get(s.sandbox_id),
            )
        )
    return sorted(sandboxes, key=lambda sandbox: sandbox.age_seconds)


def _reap_socket_dirs(parent: Path) -> None:
    """Remove ``legion-<pid>-*`` socket directories whose process is gone."""
    for path in parent.glob("legion-*-*"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            # Only ever a socket and boot files in there; anything else is
            # not ours to delete.
            if all(_is_endpoint_file(p.name) for p in path.iterdir()):
                shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _is_endpoint_file(name: str) -> bool:
    return name == SOCKET_NAME or (name.startswith("boot-") and name.endswith(".json"))


# --- the default runtime, one per event loop -----------------------------------

_live_runtimes: weakref.WeakSet[SandboxRuntime] = weakref.WeakSet()
_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SandboxRuntime] = (
    weakref.WeakKeyDictionary()
)


async def default_runtime() -> SandboxRuntime:
    """The runtime ``Sandbox()`` uses when given none (per event loop).

    It closes itself when the loop shuts down (``asyncio.run`` finalises
    async generators before closing the loop), so its containers go with it.
    """
    loop = asyncio.get_running_loop()
    runtime = _defaults.get(loop)
    if runtime is None or runtime._state == "closed":
        runtime = _defaults[loop] = SandboxRuntime()
        closer = _close_at_loop_shutdown(runtime)
        await anext(closer)
        runtime._closer = closer  # a strong reference keeps it until shutdown
    return await runtime.start()


async def _close_at_loop_shutdown(runtime: SandboxRuntime) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await runtime.aclose()


_owners: dict[type, SandboxBackend] = {}
"""A backend of each kind that started a runtime in this process (atexit)."""


@atexit.register
def _remove_leftovers() -> None:
    # A program that never closed its runtime (or whose runtime could not
    # finish closing) must not leave containers behind: remove every one this
    # process owns. The engine threads have finished by now (the interpreter
    # joins them before atexit hooks), so no start is still under way.
    for backend in list(_owners.values()):
        with contextlib.suppress(Exception):
            backend.remove_owned_sync()
    for runtime in list(_live_runtimes):
        if runtime._channel is not None:
            runtime._channel.stop_sync()
        if runtime._dir is not None:
            shutil.rmtree(runtime._dir, ignore_errors=True)
