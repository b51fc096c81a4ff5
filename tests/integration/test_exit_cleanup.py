"""Programs as users write them, each run as its own process: no container
outlives the runtime that started it, even while the warm pool is refilling.

Three ways a program ends its runtime, each with pools of 0, 2 and 8 and
under runc and runsc:

- ``aclose``: the program closes its runtime; none of the runtime's
  containers exists when ``aclose()`` returns (the program itself looks);
- ``asyncio.run``: the default runtime of ``legion.Sandbox()``, closed with
  the loop; none exists when ``asyncio.run`` returns (the program looks);
- ``unclosed``: neither the runtime nor its loop is ever closed; none exists
  once the interpreter has exited (this test looks, by owner label).

Each program uses three sandboxes in a row and ends at once, so pool starts
are in flight when it ends (the case that used to leave a container).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import docker
import pytest

from legion.sandbox.docker_backend import LABEL, OWNER_LABEL

pytestmark = pytest.mark.docker

PROGRAM = textwrap.dedent("""
    import asyncio, os, sys
    import docker, legion
    from legion.sandbox.docker_backend import OWNER_LABEL, owner_id

    mode, pool, runtime_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    limits = legion.SandboxLimits(runtime=None if runtime_name == "runc" else runtime_name)

    def mine() -> int:
        client = docker.from_env(timeout=30)
        try:
            label = f"{OWNER_LABEL}={owner_id()}"
            return len(client.api.containers(all=True, filters={"label": label}))
        finally:
            client.close()

    async def three(runtime=None, sandbox_limits=None):
        for _ in range(3):
            async with legion.Sandbox(runtime=runtime, limits=sandbox_limits) as sandbox:
                assert (await sandbox.run("1 + 1")).value == 2

    async def closed_by_the_program():
        runtime = legion.SandboxRuntime(pool_size=pool, limits=limits)
        async with runtime:
            await three(runtime)
        print("after aclose:", mine(), flush=True)

    if mode == "aclose":
        asyncio.run(closed_by_the_program())
    elif mode == "asyncio.run":
        # The default runtime (its pool: LEGION_POOL_SIZE), closed with the loop.
        os.environ["LEGION_POOL_SIZE"] = str(pool)
        asyncio.run(three(sandbox_limits=None if runtime_name == "runc" else limits))
        print("after asyncio.run:", mine(), flush=True)
    else:
        loop = asyncio.new_event_loop()
        runtime = legion.SandboxRuntime(pool_size=pool, limits=limits)
        loop.run_until_complete(three(runtime))
        print("leaving with the runtime open", flush=True)
""")


def _owned_by(client: docker.DockerClient, pid: int) -> list[str]:
    return [
        f"{c['Names'][0]} ({c['Status']})"
        for c in client.api.containers(all=True, filters={"label": LABEL})
        if c["Labels"].get(OWNER_LABEL, "").split("/")[1:2] == [str(pid)]
    ]


@pytest.fixture(params=["runc", "runsc"])
def container_runtime(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "runsc":
        request.getfixturevalue("gvisor_ready")
    return name


@pytest.mark.parametrize("pool", [0, 2, 8])
@pytest.mark.parametrize("mode", ["aclose", "asyncio.run", "unclosed"])
def test_no_container_outlives_the_program(
    docker_client: docker.DockerClient, container_runtime: str, mode: str, pool: int
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LEGION_POOL_SIZE"}
    child = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, mode, str(pool), container_runtime],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = child.communicate(timeout=180)
    finally:
        child.kill()
    assert child.returncode == 0, err[-3000:]
    if mode == "aclose":
        assert "after aclose: 0" in out, (out, err[-3000:])
    elif mode == "asyncio.run":
        assert "after asyncio.run: 0" in out, (out, err[-3000:])
    # The program has exited; its containers would carry its pid as owner.
    left = _owned_by(docker_client, child.pid)
    assert left == [], f"{mode}, pool {pool}, {container_runtime}: left {left}"
