"""What a runtime can say about its live sandboxes (SandboxRuntime.sandboxes,
which ListSandboxes serves), and `legion ps` listing this machine's."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import docker
import pytest

import legion
from legion import telemetry
from legion.sandbox import image as legion_image
from legion.sandbox.docker_backend import DockerBackend
from legion.testing import ScriptedModel, action

pytestmark = pytest.mark.docker

MiB = 2**20


@pytest.fixture
async def pooled(docker_ready: None) -> AsyncIterator[legion.SandboxRuntime]:
    """A runtime of this test's own, so nothing else takes from its pool."""
    async with legion.SandboxRuntime(pool_size=1) as runtime:
        await runtime.warm()
        yield runtime


async def test_warm_container_then_acquired_by_a_run(pooled: legion.SandboxRuntime) -> None:
    (warm,) = await pooled.sandboxes()
    assert warm.container_id in pooled.live_containers
    assert (warm.in_use, warm.run_id, warm.agent) == (False, None, None)
    assert warm.age_seconds >= 0
    # An idle runner: a few MiB, measured by the engine, under the cap.
    assert warm.memory_bytes is not None and MiB < warm.memory_bytes < 256 * MiB

    with telemetry.run_context("run-introspection", None):
        sandbox = await legion.Sandbox(runtime=pooled, agent="Auditor").start()
    try:
        assert sandbox.container_id == warm.container_id  # taken from the pool
        listed = {s.container_id: s for s in await pooled.sandboxes(memory=False)}
        used = listed[warm.container_id]
        assert (used.in_use, used.run_id, used.agent) == (True, "run-introspection", "Auditor")
        assert used.memory_bytes is None  # not asked for
        assert used.age_seconds >= warm.age_seconds
    finally:
        await sandbox.close()
    listed_after = {s.container_id for s in await pooled.sandboxes(memory=False)}
    assert warm.container_id not in listed_after


async def test_memory_is_the_containers_own(pooled: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=pooled) as sandbox:
        before = {s.container_id: s for s in await pooled.sandboxes()}[sandbox.container_id]
        # Bytes written, not a lazily zeroed buffer: the pages are really in use.
        result = await sandbox.run("block = b'x' * (96 * 2**20)\nlen(block)")
        assert result.value == 96 * MiB
        after = {s.container_id: s for s in await pooled.sandboxes()}[sandbox.container_id]
    assert before.memory_bytes is not None and after.memory_bytes is not None
    assert before.memory_bytes < 64 * MiB
    assert 96 * MiB <= after.memory_bytes < 256 * MiB


async def test_memory_of_a_container_being_removed_is_none(
    docker_client: docker.DockerClient,
) -> None:
    # While a container is being removed the engine may answer a stats call
    # with an empty body: that is "gone", not "no engine".
    backend = DockerBackend(image="", runtime_id="")
    outcomes: list[int | None] = []
    try:
        for _ in range(8):
            container = docker_client.containers.run(
                legion_image.image_tag(), ["sleep", "30"], detach=True, network_mode="none"
            )
            removal = asyncio.create_task(
                asyncio.to_thread(docker_client.api.remove_container, container.id, force=True)
            )
            outcomes += await asyncio.gather(
                *(backend.memory_usage(container.id) for _ in range(12))
            )
            await removal
    finally:
        backend.close()
    assert all(used is None or used > 0 for used in outcomes)


class Probe:
    """Looks at the controller's live sandboxes from inside a tool call."""

    runtime: legion.SandboxRuntime | None = None

    async def mine(self) -> list[list[str | None]]:
        assert Probe.runtime is not None
        return [[s.run_id, s.agent] for s in await Probe.runtime.sandboxes() if s.in_use]


class Inspector(legion.Agent):
    """Reports which sandboxes are busy."""

    tools = [Probe]


async def test_an_agent_run_is_recorded_on_its_sandbox(pooled: legion.SandboxRuntime) -> None:
    Probe.runtime = pooled
    try:
        model = ScriptedModel([action("eval_and_complete", "Probe.mine()")])
        result = await legion.run(Inspector, "who is busy?", model=model, runtime=pooled)
    finally:
        Probe.runtime = None
    assert result.output == [[result.run_id, "Inspector"]]


async def test_legion_ps_lists_this_machines_containers(pooled: legion.SandboxRuntime) -> None:
    (warm,) = await pooled.sandboxes(memory=False)
    ps = subprocess.run(
        [sys.executable, "-m", "legion.cli", "ps", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ps.returncode == 0, ps.stderr
    listed = {entry["container_id"]: entry for entry in json.loads(ps.stdout)}
    entry = listed[warm.container_id]
    assert entry["runtime_id"] == pooled.id
    assert entry["owner_pid"] == os.getpid()
    assert entry["owner_alive"] is True
    assert entry["state"] == "running"
    assert entry["memory_bytes"] is not None and MiB < entry["memory_bytes"] < 256 * MiB
    assert entry["age_seconds"] >= 0

    table = subprocess.run(
        [sys.executable, "-m", "legion.cli", "ps"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["CONTAINER", "NAME", "STATE"]
    (row,) = [r for r in rows if r.startswith(warm.container_id[:12])]
    assert str(os.getpid()) in row.split() and "alive" in row.split()
