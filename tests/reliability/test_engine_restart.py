"""The Docker engine stops and comes back while sandboxes run.

This stops the machine's Docker engine, so it only runs where that is
allowed: LEGION_ENGINE_FAULTS=1 (CI sets it; CI owns its engine). The engine
is started again with scripts/ensure-docker, as `make test` does.

What must hold: code running when the engine goes away ends with a clear
error instead of hanging; starting a sandbox while it is away fails fast
with DockerUnavailable; once it is back the same runtime serves new
sandboxes; nothing of ours is left behind.
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

from .support import wait_until

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = os.environ.get("LEGION_ENGINE_FAULTS") == "1"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        not ALLOWED, reason="stops the Docker engine; set LEGION_ENGINE_FAULTS=1 to allow it"
    ),
]


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


async def test_the_runtime_survives_an_engine_restart(engine_comes_back: None) -> None:
    async with legion.SandboxRuntime(pool_size=1) as runtime:
        sandbox = await legion.Sandbox(runtime=runtime).start()
        assert (await sandbox.run("x = 41\nx + 1")).value == 42
        running = asyncio.create_task(sandbox.run("import time\ntime.sleep(120)"))
        await asyncio.sleep(0.5)

        await asyncio.to_thread(stop_engine)
        # the code in flight ends with a clear error, not a hang
        with pytest.raises(legion.SandboxError) as crashed:
            await asyncio.wait_for(running, 60)
        assert "sandbox" in str(crashed.value)

        # while the engine is away, a new sandbox fails fast and says why
        started = time.monotonic()
        with pytest.raises(legion.DockerUnavailable):
            await legion.Sandbox(runtime=runtime).start()
        assert time.monotonic() - started < 60

        await asyncio.to_thread(start_engine)
        # the same runtime serves again: the old sandbox gets a fresh container
        after = await sandbox.run("'x' in dir()")
        assert after.value is False
        fresh = await legion.Sandbox(runtime=runtime).start()
        assert (await fresh.run("6 * 7")).value == 42
        await fresh.close()
        await sandbox.close()
        runtime_id = runtime.id

    client = docker.from_env(timeout=30)
    mine = {"label": f"{LABEL}={runtime_id}"}
    await wait_until(
        lambda: not client.api.containers(all=True, filters=mine),
        30,
        "the runtime's containers to be removed",
    )
