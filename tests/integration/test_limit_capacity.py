"""Limits beyond what the engine has are refused before any container starts,
naming the unit; surprising ones start, with a warning in the log."""

from __future__ import annotations

import logging

import docker
import pytest

import legion
from legion.sandbox.docker_backend import LABEL

pytestmark = pytest.mark.docker


def _containers_of(client: docker.DockerClient, runtime: legion.SandboxRuntime) -> list[str]:
    label = f"{LABEL}={runtime.id}"
    return [c["Id"] for c in client.api.containers(all=True, filters={"label": label})]


async def test_a_runtime_with_memory_in_bytes_does_not_start(
    docker_client: docker.DockerClient,
) -> None:
    runtime = legion.SandboxRuntime(pool_size=2, limits=legion.SandboxLimits(memory_mb=134_217_728))
    with pytest.raises(legion.UsageError, match=r"memory_mb=134217728 MiB .* not bytes"):
        await runtime.start()
    await runtime.aclose()
    assert _containers_of(docker_client, runtime) == []


async def test_a_sandbox_asking_for_more_than_the_engine_has_is_refused(
    runtime: legion.SandboxRuntime, docker_client: docker.DockerClient
) -> None:
    cpus = docker_client.info()["NCPU"]
    for limits, words in (
        (legion.SandboxLimits(memory_mb=134_217_728), "in MiB, not bytes"),
        (legion.SandboxLimits(cpus=cpus + 1), f"more than the engine's {cpus} CPUs"),
    ):
        sandbox = legion.Sandbox(runtime=runtime, limits=limits)
        with pytest.raises(legion.UsageError, match=words):
            await sandbox.run("1")
        assert sandbox.container_id is None
        await sandbox.close()
    # Refused before a container was made: none of the runtime's has them.
    for container_id in _containers_of(docker_client, runtime):
        host = docker_client.api.inspect_container(container_id)["HostConfig"]
        assert host["Memory"] < 134_217_728 * 1024 * 1024
        assert host["NanoCpus"] <= cpus * 1e9


async def test_surprising_limits_start_with_a_warning(
    runtime: legion.SandboxRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    limits = legion.SandboxLimits(memory_mb=96, tmpfs_mb=128, runtime=runtime.limits.runtime)
    with caplog.at_level(logging.WARNING, logger="legion.sandbox.runtime"):
        async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
            assert (await sandbox.run("6 * 7")).value == 42
    said = [r.getMessage() for r in caplog.records if "sandbox_limits_surprising" in r.getMessage()]
    assert any("count against the memory" in line for line in said), said
