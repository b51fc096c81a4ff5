"""Host tools going wrong: raising, hanging past their timeout (sync and
async), returning what JSON cannot carry. Each fault is an error (or a marked
value) inside the sandbox that the code can catch; the sandbox survives it,
and the controller's footprint does not grow with the number of faults."""

from __future__ import annotations

import asyncio
import threading

import docker
import pytest

import legion

from .support import fault_series, tracked_runtime, wait_until

pytestmark = pytest.mark.docker

TOOL_TIMEOUT = 0.5


class QuotaExceededError(Exception):
    pass


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque handle 7>"


class Faulty:
    """Host tools that fail in every way a tool can."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self.finished = 0
        self.async_cancelled = 0
        self._lock = threading.Lock()

    def explode(self, kind: str) -> None:
        if kind == "custom":
            raise QuotaExceededError("over quota: 3 of 2 calls")
        raise ValueError(f"bad value: {kind}")

    def hang(self) -> str:
        with self._lock:
            self.entered += 1
        self.release.wait(60)
        with self._lock:
            self.finished += 1
        return "too late"

    async def hang_async(self) -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.async_cancelled += 1
            raise
        return "too late"

    def opaque(self) -> object:
        return Opaque()


PROBE = """
import time

def timed(fn):
    started = time.monotonic()
    try:
        return ["returned", fn()]
    except ToolTimeout as exc:
        return [type(exc).__name__, isinstance(exc, TimeoutError), time.monotonic() - started,
                str(exc)]

out = {}
try:
    Faulty.explode("custom")
except ToolError as exc:
    out["custom"] = [type(exc).__name__, str(exc), exc.tool, exc.function]
try:
    Faulty.explode("builtin")
except ValueError as exc:
    out["builtin"] = [type(exc).__name__, isinstance(exc, ToolError), str(exc)]
out["hang"] = timed(Faulty.hang)
out["hang_async"] = timed(Faulty.hang_async)
value = Faulty.opaque()
out["opaque"] = [type(value).__name__, isinstance(value, str), str(value)]
out
"""


def check_timeout(outcome: list[object], label: str) -> None:
    assert outcome[:2] == ["ToolTimeout", True], outcome
    waited = outcome[2]
    assert isinstance(waited, float) and TOOL_TIMEOUT * 0.9 <= waited < TOOL_TIMEOUT + 3, outcome
    assert f"{label} did not answer within {TOOL_TIMEOUT:g} s" in str(outcome[3])


async def test_tool_faults_are_catchable_in_the_sandbox(docker_client: docker.DockerClient) -> None:
    faulty = Faulty()
    limits = legion.SandboxLimits(tool_timeout_seconds=TOOL_TIMEOUT)
    async with (
        tracked_runtime(docker_client, pool_size=1, limits=limits) as tracked,
        legion.Sandbox(runtime=tracked.runtime, tools=[faulty]) as sandbox,
    ):
        await sandbox.start()
        container = sandbox.container_id

        async def one_fault(i: int) -> None:
            faulty.release.clear()
            result = await asyncio.wait_for(sandbox.run(PROBE), 30)
            assert result.ok, f"{result.error}\n{result.error and result.error.traceback}"
            out = result.value
            assert out["custom"] == [
                "QuotaExceededError",
                "over quota: 3 of 2 calls",
                "Faulty",
                "explode",
            ]
            assert out["builtin"] == ["ValueError", True, "bad value: builtin"]
            check_timeout(out["hang"], "Faulty.hang")
            check_timeout(out["hang_async"], "Faulty.hang_async")
            assert out["opaque"] == ["HostRepr", True, "<Opaque handle 7>"]
            # The async tool was cancelled at its timeout; the sync one still
            # holds its thread until released.
            assert faulty.async_cancelled == i + 1
            assert faulty.entered == i + 1 and faulty.finished == i
            faulty.release.set()
            await wait_until(lambda: faulty.finished == i + 1, 10, "the hung tool's thread")
            # The same container survived every fault, bindings and all.
            assert sandbox.container_id == container
            assert (await sandbox.run("sorted(out)")).value == sorted(out)

        await fault_series("tool faults", tracked.runtime, one_fault, live=2)
