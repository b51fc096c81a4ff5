"""The contract every SandboxBackend keeps (docs/BACKENDS.md).

One suite, parametrised by backend. Today: the Docker backend under runc and
under gVisor (runsc). A new backend adds a row to ``BACKENDS`` (how to make
one that reaches its engine, and one that cannot) and must pass unchanged.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

import legion
from legion.errors import BackendUnavailable
from legion.sandbox import ChannelEndpoint, SandboxBackend
from legion.sandbox import image as legion_image
from legion.sandbox.backend import StartRequest
from legion.sandbox.docker_backend import DockerBackend
from legion.sandbox.endpoint import UnixSocketEndpoint

pytestmark = pytest.mark.docker


@dataclass(frozen=True)
class BackendCase:
    name: str
    make: Callable[[str], SandboxBackend]
    """A backend for a runtime id, reaching its engine."""
    make_unreachable: Callable[[], SandboxBackend]
    """One whose engine is away."""
    limits: legion.SandboxLimits
    needs: str | None = None
    """A fixture that skips (or, in CI, fails) when the case cannot run here."""
    program: str = ""
    """Python that builds the backend in a child process, as ``backend``."""


def _docker(runtime_id: str) -> SandboxBackend:
    return DockerBackend(image=legion_image.image_tag(), runtime_id=runtime_id)


def _docker_away() -> SandboxBackend:
    # A fixed API version: the client asks the engine nothing until used.
    client = docker.DockerClient(
        base_url="unix:///nonexistent/legion-test/docker.sock", version="1.41"
    )
    return DockerBackend(image=legion_image.image_tag(), runtime_id="away", client=client)


_DOCKER_PROGRAM = (
    "from legion.sandbox.docker_backend import DockerBackend\n"
    "from legion.sandbox import image\n"
    "import uuid\n"
    "backend = DockerBackend(image=image.image_tag(), runtime_id=uuid.uuid4().hex)\n"
)

BACKENDS = [
    BackendCase(
        "docker-runc", _docker, _docker_away, legion.SandboxLimits(), None, _DOCKER_PROGRAM
    ),
    BackendCase(
        "docker-runsc",
        _docker,
        _docker_away,
        legion.SandboxLimits(runtime="runsc"),
        "gvisor_ready",
        _DOCKER_PROGRAM,
    ),
]


@pytest.fixture(params=BACKENDS, ids=lambda case: case.name)
def case(request: pytest.FixtureRequest, docker_ready: None) -> BackendCase:
    backend_case: BackendCase = request.param
    if backend_case.needs:
        request.getfixturevalue(backend_case.needs)
    return backend_case


@pytest.fixture
async def runtime(case: BackendCase) -> AsyncIterator[legion.SandboxRuntime]:
    backend = case.make(uuid.uuid4().hex)
    async with legion.SandboxRuntime(backend=backend, pool_size=0, limits=case.limits) as rt:
        yield rt


LIMITS_INSIDE = """
import os, resource
def read(*paths):
    for path in paths:
        try:
            return open(path).read().strip()
        except OSError:
            pass
{
    "memory": read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "pids": read("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "uid": os.getuid(),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    "root_writable": os.access("/", os.W_OK),
}
"""


async def test_check_says_what_the_engine_has(case: BackendCase) -> None:
    backend = case.make(uuid.uuid4().hex)
    try:
        capacity = await backend.check()
    finally:
        await backend.aclose()
    assert capacity.memory_bytes is None or capacity.memory_bytes > 256 * 1024 * 1024
    assert capacity.cpus is None or capacity.cpus >= 1


async def test_images_are_described_and_a_missing_one_names_its_build(case: BackendCase) -> None:
    backend = case.make(uuid.uuid4().hex)
    try:
        own = await backend.describe_image(backend.image)
        assert own.packages == () and own.preload == ()  # the runner's: stdlib only
        with pytest.raises(legion.ImageNotFound, match="legion image build"):
            await backend.describe_image("no-such-environment")
    finally:
        await backend.aclose()


async def test_a_sandbox_starts_dials_in_and_runs_within_its_limits(
    case: BackendCase, runtime: legion.SandboxRuntime
) -> None:
    limits = case.limits.replace(memory_mb=200, pids=64, nofile=128)
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        result = await sandbox.run(LIMITS_INSIDE)
        assert result.error is None, result.error
        inside = result.value
        sandbox_id = sandbox.container_id
        assert sandbox_id is not None
        # Read back from inside (gVisor shows no cgroup files: then only the rest).
        if inside["memory"] is not None:
            assert int(inside["memory"]) == 200 * 1024 * 1024
        if inside["pids"] is not None:
            assert int(inside["pids"]) == 64
        assert inside["uid"] == 65534
        assert inside["interfaces"] == ["lo"]
        assert inside["nofile"] == 128
        assert inside["root_writable"] is False
        # The backend sees it: state, stats, list.
        state = await runtime.backend.state(sandbox_id)
        assert state is not None and state.running
        stats = await runtime.backend.stats(sandbox_id)
        assert stats is not None and (stats.memory_bytes or 0) > 0
        assert stats.cpu_seconds is not None and stats.cpu_seconds > 0
        listed = {s.sandbox_id: s for s in await runtime.backend.list()}
        assert sandbox_id in listed and listed[sandbox_id].runtime_id == runtime.id
        assert listed[sandbox_id].state == "running"
        everyone = {s.sandbox_id for s in await runtime.backend.list(every_runtime=True)}
        assert sandbox_id in everyone
    # Closing the Sandbox removed it.
    await asyncio.sleep(0)
    for _ in range(50):
        if await runtime.backend.state(sandbox_id) is None:
            break
        await asyncio.sleep(0.1)
    assert await runtime.backend.state(sandbox_id) is None
    assert sandbox_id not in {s.sandbox_id for s in await runtime.backend.list()}


async def test_a_crash_is_seen_as_a_stopped_sandbox(
    case: BackendCase, runtime: legion.SandboxRuntime
) -> None:
    async with legion.Sandbox(runtime=runtime, limits=case.limits) as sandbox:
        with pytest.raises(legion.SandboxCrashed) as crashed:
            await sandbox.run("import os\nos._exit(3)")
        assert crashed.value.exit_code == 3


async def test_a_start_abandoned_by_its_caller_is_removed_at_close(case: BackendCase) -> None:
    runtime_id = uuid.uuid4().hex
    backend = case.make(runtime_id)
    await backend.check()
    directory = _endpoint_dir()
    endpoint = UnixSocketEndpoint(directory)
    assert isinstance(endpoint, ChannelEndpoint)
    boot = endpoint.write_boot(token="never-used", max_message_bytes=1 << 20)
    request = StartRequest(
        name=f"legion-contract-{runtime_id[:8]}", limits=case.limits, endpoint=endpoint, boot=boot
    )
    starting = asyncio.ensure_future(backend.start(request))
    await asyncio.sleep(0.01)
    starting.cancel()  # as asyncio.run cancels every task at its end
    with pytest.raises(asyncio.CancelledError):
        await starting
    await backend.aclose()
    checker = case.make(runtime_id)
    try:
        assert await checker.list() == []
    finally:
        await checker.aclose()
        boot.discard()
        directory.rmdir()


async def test_remove_of_a_sandbox_already_gone_is_fine(
    case: BackendCase, runtime: legion.SandboxRuntime
) -> None:
    async with legion.Sandbox(runtime=runtime, limits=case.limits) as sandbox:
        await sandbox.run("1")
        sandbox_id = sandbox.container_id
        assert sandbox_id is not None
    await runtime.backend.remove(sandbox_id)
    await runtime.backend.remove(sandbox_id)
    assert await runtime.backend.state(sandbox_id) is None


async def test_sandboxes_of_a_dead_controller_are_reaped(case: BackendCase) -> None:
    program = case.program + textwrap.dedent("""
        import asyncio, os, sys, legion
        async def main():
            runtime = legion.SandboxRuntime(backend=backend, pool_size=0)
            limits = legion.SandboxLimits(runtime=sys.argv[1] or None)
            sandbox = legion.Sandbox(runtime=runtime, limits=limits)
            await sandbox.run("1")
            print(runtime.id, flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    runtime_arg = case.limits.runtime or ""
    child = subprocess.Popen(
        [sys.executable, "-c", program, runtime_arg], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        runtime_id = child.stdout.readline().strip()
        assert runtime_id, "the child did not start its sandbox"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    looker = case.make(runtime_id)
    try:
        assert len(await looker.list()) == 1  # left behind by the killed controller
        reaper = case.make(uuid.uuid4().hex)
        try:
            assert await reaper.reap_orphans() >= 1
        finally:
            await reaper.aclose()
        assert await looker.list() == []
    finally:
        await looker.aclose()


async def test_an_engine_that_is_away_is_a_clear_error(case: BackendCase) -> None:
    backend = case.make_unreachable()
    try:
        with pytest.raises(BackendUnavailable):
            await backend.check()
        with pytest.raises(BackendUnavailable):
            await backend.list()
        with pytest.raises(BackendUnavailable):
            await backend.reap_orphans()
    finally:
        await backend.aclose()
    runtime = legion.SandboxRuntime(backend=case.make_unreachable(), pool_size=0)
    with pytest.raises(BackendUnavailable):
        await runtime.start()
    await runtime.aclose()


def _endpoint_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="legion-contract-"))
    path.chmod(0o711)
    return path


def test_the_docker_backend_is_a_sandbox_backend() -> None:
    assert isinstance(DockerBackend(image="x", runtime_id="y"), SandboxBackend)
