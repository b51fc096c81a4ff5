"""A closed runtime must hold nothing of the process's: no container, no
task, no thread, no socket, even while the caller still holds the object."""

from __future__ import annotations

import docker
import pytest

import legion
from legion.sandbox.docker_backend import LABEL

from .support import FAULTS, Footprint, labelled_containers

pytestmark = pytest.mark.docker


async def open_use_close() -> legion.SandboxRuntime:
    runtime = legion.SandboxRuntime(pool_size=0)
    async with runtime, legion.Sandbox(runtime=runtime) as sandbox:
        assert (await sandbox.run("6 * 7")).value == 42
    assert runtime.live_containers == frozenset()
    return runtime


async def test_closed_runtimes_release_everything(docker_client: docker.DockerClient) -> None:
    await open_use_close()  # process-wide things (gRPC's) are made on first use
    before = Footprint.now()
    kept = [await open_use_close() for _ in range(FAULTS)]  # the caller keeps its objects
    after = Footprint.now()
    growth = after - before
    print(
        f"\n[leaks] {FAULTS} runtimes opened, used, closed and kept: before {before}; "
        f"after {after}; growth tasks={growth.tasks:+d} fds={growth.fds:+d} "
        f"threads={growth.threads:+d}"
    )
    ids = {runtime.id for runtime in kept}
    assert not [
        row for row in labelled_containers(docker_client) if row["Labels"].get(LABEL) in ids
    ]
    assert growth.tasks < FAULTS
    assert growth.threads < FAULTS
    assert growth.fds < FAULTS, (
        f"{FAULTS} closed runtimes still hold {growth.fds} more file descriptors (the Docker "
        f"client each runtime made is not closed by aclose())"
    )
