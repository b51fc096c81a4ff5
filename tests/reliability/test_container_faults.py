"""The container dies under the controller: killed from outside while code
runs or while a host tool is serving it, or the runner itself crashing.

Each fault must surface as :class:`legion.SandboxCrashed` from ``run`` within
a bound, the next ``run`` must get a fresh container, no container may be
left, and repeating the fault must not grow the controller's footprint.
"""

from __future__ import annotations

import asyncio
import signal
import threading

import docker
import pytest

import legion

from .support import (
    FAULTS,
    WARMUP,
    container_exists,
    fault_series,
    kill_container,
    tracked_runtime,
    wait_until,
)

pytestmark = pytest.mark.docker

BOUND = 15.0
"""Seconds within which a fault must surface; the code under attack would run
for 30 s or more."""
SIGKILL_EXIT = 128 + signal.SIGKILL
SIGSEGV_EXIT = 128 + signal.SIGSEGV


class Beacon:
    """Tells the test that the sandbox code has got this far."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def here(self) -> None:
        self.reached.set()


class Gate:
    """A host tool that blocks its thread until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.finished = 0
        self._lock = threading.Lock()

    def wait(self) -> str:
        self.entered.set()
        opened = self.opened.wait(60)
        with self._lock:
            self.finished += 1
        return "opened" if opened else "gave up"


async def assert_fresh_and_working(sandbox: legion.Sandbox, killed: str) -> None:
    after = await asyncio.wait_for(sandbox.run("marker"), BOUND)
    assert after.error is not None and after.error.type == "NameError", after
    assert sandbox.container_id not in (None, killed)
    assert (await asyncio.wait_for(sandbox.run("6 * 7"), BOUND)).value == 42


async def test_container_killed_mid_execution(docker_client: docker.DockerClient) -> None:
    beacon = Beacon()
    async with (
        tracked_runtime(docker_client, pool_size=1) as tracked,
        legion.Sandbox(runtime=tracked.runtime, tools=[beacon]) as sandbox,
    ):

        async def one_fault(_: int) -> None:
            beacon.reached.clear()
            assert (await sandbox.run("marker = 'set before the kill'")).ok
            running = asyncio.create_task(sandbox.run("Beacon.here()\nimport time\ntime.sleep(30)"))
            await asyncio.wait_for(beacon.reached.wait(), BOUND)
            killed = tracked.note(sandbox)
            await kill_container(docker_client, killed)
            with pytest.raises(legion.SandboxCrashed) as crash:
                await asyncio.wait_for(running, BOUND)
            assert not isinstance(crash.value, legion.SandboxOOMKilled)
            assert crash.value.exit_code == SIGKILL_EXIT
            assert f"exit code {SIGKILL_EXIT}" in str(crash.value)
            assert "variables from earlier runs are gone" in str(crash.value)
            await assert_fresh_and_working(sandbox, killed)
            tracked.note(sandbox)

        await fault_series(
            "docker kill mid-execution",
            tracked.runtime,
            one_fault,
            live=2,
            docker_client=docker_client,
        )
    assert len(tracked.seen) == WARMUP + FAULTS + 1  # a fresh container after every kill


async def test_container_killed_mid_tool_call(docker_client: docker.DockerClient) -> None:
    gate = Gate()
    async with (
        tracked_runtime(docker_client, pool_size=1) as tracked,
        legion.Sandbox(runtime=tracked.runtime, tools=[gate]) as sandbox,
    ):

        async def one_fault(i: int) -> None:
            gate.entered.clear()
            gate.opened.clear()
            assert (await sandbox.run("marker = 'set before the kill'")).ok
            running = asyncio.create_task(sandbox.run("Gate.wait()"))
            await wait_until(gate.entered.is_set, BOUND, "the tool to be entered")
            killed = tracked.note(sandbox)
            await kill_container(docker_client, killed)
            with pytest.raises(legion.SandboxCrashed) as crash:
                await asyncio.wait_for(running, BOUND)
            assert crash.value.exit_code == SIGKILL_EXIT
            # The crash was reported while the tool still blocked its thread:
            # the controller does not wait for a tool whose sandbox is gone.
            assert gate.finished == 2 * i
            gate.opened.set()
            await wait_until(lambda: gate.finished == 2 * i + 1, BOUND, "the tool thread to finish")
            await assert_fresh_and_working(sandbox, killed)
            tracked.note(sandbox)
            # Tools still work in the fresh container.
            gate.opened.set()
            served = await asyncio.wait_for(sandbox.run("Gate.wait()"), BOUND)
            assert served.value == "opened", served.error
            assert gate.finished == 2 * i + 2

        await fault_series(
            "docker kill mid-tool-call",
            tracked.runtime,
            one_fault,
            live=2,
            docker_client=docker_client,
        )


CRASHES = {
    "os._exit": ("import os\nos._exit(3)", 3),
    "segfault": ("import ctypes\nctypes.string_at(0)", SIGSEGV_EXIT),
}


@pytest.mark.parametrize("kind", sorted(CRASHES))
async def test_runner_crash(docker_client: docker.DockerClient, kind: str) -> None:
    code, exit_code = CRASHES[kind]
    async with (
        tracked_runtime(docker_client, pool_size=1) as tracked,
        legion.Sandbox(runtime=tracked.runtime) as sandbox,
    ):

        async def one_fault(_: int) -> None:
            assert (await sandbox.run("marker = 'set before the crash'")).ok
            crashed = tracked.note(sandbox)
            with pytest.raises(legion.SandboxCrashed) as crash:
                await asyncio.wait_for(sandbox.run(code), BOUND)
            assert not isinstance(crash.value, legion.SandboxOOMKilled)
            assert crash.value.exit_code == exit_code
            assert f"exit code {exit_code}" in str(crash.value)
            await assert_fresh_and_working(sandbox, crashed)
            tracked.note(sandbox)

        await fault_series(
            f"runner {kind}", tracked.runtime, one_fault, live=2, docker_client=docker_client
        )
        dead = [c for c in tracked.seen if c != sandbox.container_id]
        assert dead and not any([await container_exists(docker_client, c) for c in dead])


async def test_crash_message_names_the_runner(docker_client: docker.DockerClient) -> None:
    """A crashed runner is reported as the runner's doing, not as the
    controller's channel server stopping: that server is fine and serves the
    next run."""
    async with (
        tracked_runtime(docker_client, pool_size=0) as tracked,
        legion.Sandbox(runtime=tracked.runtime) as sandbox,
    ):
        for code, _ in CRASHES.values():
            with pytest.raises(legion.SandboxCrashed) as crash:
                await asyncio.wait_for(sandbox.run(code), BOUND)
            assert (await sandbox.run("'the channel server still serves'")).ok
            message = str(crash.value)
            assert "runner" in message and "channel server stopped" not in message, message
