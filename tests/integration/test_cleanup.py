"""No container outlives its owner: closed runtimes, exiting programs and
controllers that were killed (their orphans are reaped by the next start)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import docker
import pytest

import legion
from legion.sandbox.docker_backend import LABEL, OWNER_LABEL

pytestmark = pytest.mark.docker

CHILD = textwrap.dedent("""
    import asyncio, os, sys, legion

    async def main():
        runtime = legion.SandboxRuntime(pool_size=2)
        await runtime.start()
        sandbox = await legion.Sandbox(runtime=runtime).start()
        assert (await sandbox.run("40 + 2")).value == 42
        print(os.getpid(), flush=True)
        if sys.argv[1] == "hang":
            await asyncio.sleep(3600)
        # "exit": leave without closing anything

    asyncio.run(main())
""")


def _owned_by(client: docker.DockerClient, pid: int) -> list[str]:
    # The low-level list: containers.list() inspects each one afterwards and
    # fails on any removed in between.
    return [
        c["Names"][0]
        for c in client.api.containers(all=True, filters={"label": LABEL})
        if c["Labels"].get(OWNER_LABEL, "").split("/")[1:2] == [str(pid)]
    ]


async def test_aclose_removes_pool_and_leased_containers(
    docker_ready: None, docker_client: docker.DockerClient
) -> None:
    runtime = legion.SandboxRuntime(pool_size=2)
    await runtime.start()
    sandbox = await legion.Sandbox(runtime=runtime).start()  # never closed by the caller
    assert sandbox.container_id is not None
    await asyncio.sleep(0.5)  # let the pool start filling
    await runtime.aclose()
    assert runtime.live_containers == frozenset()
    left = docker_client.containers.list(all=True, filters={"label": f"{LABEL}={runtime.id}"})
    assert left == []
    with pytest.raises(legion.SandboxError):
        await runtime.acquire()


def test_program_exiting_without_closing_leaves_nothing(
    docker_ready: None, docker_client: docker.DockerClient
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, "exit"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    pid = int(child.stdout.split()[0])
    assert _owned_by(docker_client, pid) == []


async def test_containers_of_a_killed_controller_are_reaped_at_start(
    docker_ready: None, docker_client: docker.DockerClient
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "hang"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert _owned_by(docker_client, pid), "the child should own running sandboxes"
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no atexit, no cleanup: orphans
        child.wait(timeout=30)
    assert _owned_by(docker_client, pid), "SIGKILL leaves the containers behind"
    async with legion.SandboxRuntime(pool_size=0):
        pass
    assert _owned_by(docker_client, pid) == []


def test_image_build_skips_an_existing_image(docker_ready: None) -> None:
    cli = os.path.join(os.path.dirname(sys.executable), "legion")
    built = subprocess.run(
        [cli, "image", "build"], capture_output=True, text=True, timeout=120, check=False
    )
    assert built.returncode == 0, built.stderr
    assert f"{legion.sandbox.image.image_tag()} is up to date" in built.stderr
    assert "building" not in built.stderr


async def test_socket_dirs_of_dead_controllers_are_removed_at_start(
    docker_ready: None, tmp_path: Path
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"legion-{dead.stdout.strip()}-abc123"
    stale.mkdir()
    (stale / "legion.sock").touch()
    mine = tmp_path / f"legion-{os.getpid()}-live"
    mine.mkdir()
    unrelated = tmp_path / f"legion-{dead.stdout.strip()}-notours"
    unrelated.mkdir()
    (unrelated / "data.txt").write_text("keep")
    async with legion.SandboxRuntime(pool_size=0, socket_dir=tmp_path) as runtime:
        assert runtime._dir is not None
        assert runtime._dir.name.startswith(f"legion-{os.getpid()}-")
    assert not stale.exists()
    assert mine.exists() and unrelated.exists()
