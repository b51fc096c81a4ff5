"""The Docker engine stops and comes back while sandboxes, agents and a
`legion serve` are at work.

This stops the machine's Docker engine, so it only runs where that is
allowed: LEGION_ENGINE_FAULTS=1 (CI sets it; CI owns its engine). The engine
is started again with scripts/ensure-docker, as `make test` does.

What must hold: code running when the engine goes away ends with a clear
error instead of hanging; starting a sandbox while it is away fails fast with
DockerUnavailable, and so does an agent's next step; the controller service
keeps answering (a run fails with that error in its stream); once the engine
is back, the same runtime, agents and server work again; nothing of ours is
left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import docker
import pytest

import legion
from legion.sandbox.docker_backend import LABEL
from legion.testing import FakeOpenAIServer, ScriptedModel, action

from ..server.conftest import ServerProcess, script, server_env, start_server, stop_cleanly
from .support import fault_series, tracked_runtime, wait_until

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = os.environ.get("LEGION_ENGINE_FAULTS") == "1"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        not ALLOWED, reason="stops the Docker engine; set LEGION_ENGINE_FAULTS=1 to allow it"
    ),
]


class Sleeper(legion.Agent):
    """Runs whatever it is told."""

    config = {"max_retries": 3}


def engine_answers() -> bool:
    try:
        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def stop_engine() -> None:
    pid = int(Path("/var/run/docker.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while engine_answers() or Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise AssertionError("dockerd did not stop within 60 s of SIGTERM")
        time.sleep(0.2)


def start_engine() -> None:
    subprocess.run([str(ROOT / "scripts/ensure-docker")], check=True, timeout=300)


@pytest.fixture
def engine_comes_back(docker_ready: None) -> object:
    """Whatever happens in the test, the engine is running after it."""
    if not Path("/var/run/docker.pid").exists():
        pytest.fail("LEGION_ENGINE_FAULTS=1 but this engine was not started by ensure-docker")
    yield
    if not engine_answers():
        start_engine()


async def test_everything_survives_an_engine_restart(
    engine_comes_back: None, tmp_path: Path
) -> None:
    sleep = action("eval_and_continue", "import time\ntime.sleep(120)")
    with FakeOpenAIServer(script) as fake_model:
        server = start_server(
            ["--listen", "127.0.0.1:0", "--pool-size", "0"], server_env(fake_model), tmp_path
        )
        try:
            async with (
                legion.SandboxRuntime(pool_size=1) as runtime,
                legion.Client(server.address) as client,
            ):
                sandbox = await legion.Sandbox(runtime=runtime).start()
                assert (await sandbox.run("x = 41\nx + 1")).value == 42
                running = asyncio.create_task(sandbox.run("import time\ntime.sleep(120)"))
                agent = asyncio.create_task(
                    legion.run(Sleeper, "sleep", model=ScriptedModel([sleep] * 5), runtime=runtime)
                )
                remote = asyncio.create_task(
                    client.run("Echo", "#code import time\ntime.sleep(120)")
                )
                await wait_until(lambda: len(runtime.live_containers) >= 3, 60, "three sandboxes")
                await asyncio.to_thread(wait_for_containers, server, 1)

                await asyncio.to_thread(stop_engine)

                # code in flight ends with a clear error, not a hang
                with pytest.raises(legion.SandboxError) as crashed:
                    await asyncio.wait_for(running, 60)
                assert "sandbox" in str(crashed.value)
                # the agent's next step cannot get a sandbox, and says why
                with pytest.raises(legion.DockerUnavailable):
                    await asyncio.wait_for(agent, 60)
                # a new sandbox fails fast
                started = time.monotonic()
                with pytest.raises(legion.DockerUnavailable):
                    await legion.Sandbox(runtime=runtime).start()
                assert time.monotonic() - started < 60
                # the server keeps answering; its runs end with the engine's error
                assert {a.name for a in await client.list_agents()} >= {"Echo"}
                with pytest.raises(legion.SandboxError):
                    await asyncio.wait_for(remote, 60)
                with pytest.raises(legion.DockerUnavailable):
                    await client.run("Echo", "#code 1 + 1")

                await asyncio.to_thread(start_engine)

                # the same runtime serves again: the old sandbox gets a fresh container
                after = await sandbox.run("'x' in dir()")
                assert after.value is False
                fresh = await legion.Sandbox(runtime=runtime).start()
                assert (await fresh.run("6 * 7")).value == 42
                await fresh.close()
                await sandbox.close()
                done = ScriptedModel([action("eval_and_complete", "40 + 2")])
                assert (await legion.run(Sleeper, "add", model=done, runtime=runtime)).output == 42
                # and so does the server
                assert (await client.run("Echo", "#code 6 * 7")).output == 42
                runtime_id = runtime.id
        finally:
            stop_cleanly(server)  # exits 0, no container of its own left

    client = docker.from_env(timeout=30)
    mine = {"label": f"{LABEL}={runtime_id}"}
    await wait_until(
        lambda: not client.api.containers(all=True, filters=mine),
        30,
        "the runtime's containers to be removed",
    )


def wait_for_containers(server: ServerProcess, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(server.containers()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not start {count} sandboxes")
        time.sleep(0.1)


async def test_engine_restarts_leave_nothing_growing(
    engine_comes_back: None, docker_client: docker.DockerClient
) -> None:
    """The controller's footprint (tasks, descriptors, threads) over a series
    of engine restarts, each under code in flight, and no container left."""
    async with (
        tracked_runtime(docker_client, pool_size=1) as tracked,
        legion.Sandbox(runtime=tracked.runtime) as sandbox,
    ):

        async def one_fault(i: int) -> None:
            assert (await sandbox.run(f"n = {i}\nn")).value == i
            tracked.note(sandbox)
            running = asyncio.create_task(sandbox.run("import time\ntime.sleep(120)"))
            await asyncio.sleep(0.2)
            await asyncio.to_thread(stop_engine)
            with pytest.raises(legion.SandboxError):
                await asyncio.wait_for(running, 60)
            await asyncio.to_thread(start_engine)
            assert (await sandbox.run("'n' in dir()")).value is False  # a fresh container

        await fault_series(
            "engine restart", tracked.runtime, one_fault, live=2, docker_client=docker_client
        )
