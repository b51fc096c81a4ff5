"""Measurements the security tests share."""

from __future__ import annotations

import time

import docker
import pytest

import legion

SPIN_TWO_PROCESSES = (
    "import multiprocessing, time\n"
    "def spin():\n"
    "    end = time.time() + 3\n"
    "    while time.time() < end:\n"
    "        pass\n"
    "procs = [multiprocessing.Process(target=spin) for _ in range(2)]\n"
    "[p.start() for p in procs]; [p.join() for p in procs]"
)


async def cores_used_spinning(sandbox: legion.Sandbox, client: docker.DockerClient) -> float:
    """Cores the container used (from the engine's cgroup figures) while two
    processes in it spin for 3 s: 2 without a quota."""
    container = sandbox.container_id
    assert container is not None

    def used() -> float:
        stats = client.api.stats(container, stream=False)
        return float(stats["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e9

    before, started = used(), time.monotonic()
    result = await sandbox.run(SPIN_TWO_PROCESSES)
    assert result.ok, result.error
    return (used() - before) / (time.monotonic() - started)


@pytest.fixture(scope="module", params=["runner", "data"], name="runtime")
def runtime_per_image(
    request: pytest.FixtureRequest, runtime: legion.SandboxRuntime
) -> legion.SandboxRuntime:
    """``runtime`` for a suite that imports this: the shared runtime (the
    runner's image, the standard library only), then one whose image is the
    ``data`` environment (numpy, pandas, matplotlib; the same default limits).
    Each test runs in both: more packages must not mean a weaker sandbox (the
    same seccomp profile, user, network and read-only root)."""
    if request.param == "data":
        data_runtime: legion.SandboxRuntime = request.getfixturevalue("data_runtime")
        return data_runtime
    return runtime
