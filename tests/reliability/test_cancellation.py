"""The caller cancelling: a task awaiting ``Sandbox.run`` or ``legion.run``
is cancelled while code runs, while the model is asked, or while the
container is still starting. The cancellation must reach the caller as
CancelledError within a bound, the cancelled work's container must be gone
once its Sandbox is closed (for ``legion.run``: once the cancellation has
propagated), and the runtime must go on serving other sandboxes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import docker
import pytest

import legion
from legion.models import ModelReply, Usage
from legion.testing import action

from .support import container_exists, fault_series, tracked_runtime, wait_until

pytestmark = pytest.mark.docker

PROMPT = 5.0
"""Seconds within which a cancellation must have propagated."""
latencies: dict[str, list[float]] = {}
"""Seconds each cancellation took to propagate, per test (printed)."""


class Beacon:
    """Tells the test that the sandbox code has got this far."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def here(self) -> None:
        self.reached.set()


BEACON = Beacon()


class Sleeper(legion.Agent):
    """Runs long code."""

    tools = [BEACON]


class StallingModel:
    """Answers from a script, then never answers again (until cancelled)."""

    name = "stalling"

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)
        self.stalled = asyncio.Event()

    async def complete(self, messages: Sequence[dict[str, str]]) -> ModelReply:
        if self.replies:
            return ModelReply(self.replies.pop(0), Usage(requests=1), self.name)
        self.stalled.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def cancel_promptly(task: asyncio.Task[Any], label: str) -> None:
    """Cancel ``task``; assert it ends cancelled within PROMPT."""
    started = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=PROMPT)
    took = time.monotonic() - started
    assert task in done, f"the cancelled task was still running after {PROMPT:g} s"
    assert task.cancelled(), f"the task ended without CancelledError: {task.exception()!r}"
    latencies.setdefault(label, []).append(took)


def print_latencies(label: str) -> None:
    took = latencies.pop(label)
    print(f"[cancel] {label}: {len(took)} cancellations, slowest {max(took) * 1000:.0f} ms")


async def second_sandbox_works(runtime: legion.SandboxRuntime) -> None:
    async with legion.Sandbox(runtime=runtime) as other:
        result = await asyncio.wait_for(other.run("'still serving'"), 30)
        assert result.value == "still serving", result.error


async def test_cancelled_sandbox_run(docker_client: docker.DockerClient) -> None:
    beacon = Beacon()
    async with tracked_runtime(docker_client, pool_size=1) as tracked:

        async def one_fault(_: int) -> None:
            beacon.reached.clear()
            sandbox = await legion.Sandbox(runtime=tracked.runtime, tools=[beacon]).start()
            container = tracked.note(sandbox)
            running = asyncio.create_task(sandbox.run("Beacon.here()\nimport time\ntime.sleep(30)"))
            await asyncio.wait_for(beacon.reached.wait(), 30)
            await cancel_promptly(running, "Sandbox.run")
            await asyncio.wait_for(sandbox.close(), PROMPT)
            assert container not in tracked.runtime.live_containers
            assert not await container_exists(docker_client, container)
            await second_sandbox_works(tracked.runtime)

        await fault_series(
            "cancelled Sandbox.run", tracked.runtime, one_fault, live=1, docker_client=docker_client
        )
    print_latencies("Sandbox.run")


@pytest.mark.parametrize("where", ["code", "model"])
async def test_cancelled_agent_run(docker_client: docker.DockerClient, where: str) -> None:
    async with tracked_runtime(docker_client, pool_size=1) as tracked:

        async def one_fault(_: int) -> None:
            BEACON.reached = asyncio.Event()
            if where == "code":
                code = "Beacon.here()\nimport time\ntime.sleep(30)"
                model = StallingModel([action("eval_and_continue", code)])
                reached = BEACON.reached
            else:
                model = StallingModel([action("eval_and_continue", "Beacon.here()\nx = 1")])
                reached = model.stalled
            running = asyncio.create_task(
                legion.run(Sleeper, "take your time", model=model, runtime=tracked.runtime)
            )
            await asyncio.wait_for(reached.wait(), 30)
            during = set(tracked.runtime.live_containers)
            await cancel_promptly(running, f"legion.run in {where}")
            # The run closed its sandbox before the cancellation reached us.
            removed = during - tracked.runtime.live_containers
            assert len(removed) == 1, (during, tracked.runtime.live_containers)
            assert not await container_exists(docker_client, removed.pop())
            await second_sandbox_works(tracked.runtime)

        await fault_series(
            f"cancelled legion.run (in {where})",
            tracked.runtime,
            one_fault,
            live=1,
            docker_client=docker_client,
        )
    print_latencies(f"legion.run in {where}")


# Cancelled at these points of a cold start (which takes about 0.4 s): before
# the create call, while the engine creates or starts the container, while
# waiting for the runner's Hello.
CANCEL_AFTER = [0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2]


async def test_cancelled_while_the_container_starts(docker_client: docker.DockerClient) -> None:
    cancelled = 0
    async with tracked_runtime(docker_client, pool_size=0) as tracked:

        async def one_fault(i: int) -> None:
            nonlocal cancelled
            sandbox = legion.Sandbox(runtime=tracked.runtime)
            starting = asyncio.create_task(sandbox.run("1"))
            await asyncio.sleep(CANCEL_AFTER[i % len(CANCEL_AFTER)])
            if starting.done():  # a fast engine: it started and ran before the cancel
                assert starting.result().value == 1
            else:
                await cancel_promptly(starting, "cold start")
                cancelled += 1
            await asyncio.wait_for(sandbox.close(), PROMPT)
            # Whatever the engine created for it is removed in the background,
            # without the runtime being closed.
            await wait_until(
                lambda: not tracked.runtime.live_containers, 15, "the abandoned start's removal"
            )
            await second_sandbox_works(tracked.runtime)

        await fault_series(
            "cancelled cold start", tracked.runtime, one_fault, live=0, docker_client=docker_client
        )
    assert cancelled >= 5, f"only {cancelled} starts were still in progress when cancelled"
    print_latencies("cold start")


async def test_sandbox_is_usable_right_after_a_cancelled_run(
    docker_client: docker.DockerClient,
) -> None:
    """Cancelling ``run`` must stop the cancelled code (or replace the
    container), as a timeout does: the next ``run`` on the same Sandbox must
    not wait behind code nobody is waiting for."""
    beacon = Beacon()
    async with (
        tracked_runtime(docker_client, pool_size=1) as tracked,
        legion.Sandbox(runtime=tracked.runtime, tools=[beacon]) as sandbox,
    ):
        running = asyncio.create_task(sandbox.run("Beacon.here()\nimport time\ntime.sleep(60)"))
        await asyncio.wait_for(beacon.reached.wait(), 30)
        await cancel_promptly(running, "before the next run")
        print_latencies("before the next run")
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(sandbox.run("'next'"), 5)
        except TimeoutError:
            result = None
        if result is None:
            pytest.fail(
                f"the next run on the same Sandbox was still waiting after "
                f"{time.monotonic() - started:.0f} s: the cancelled code (time.sleep(60)) "
                f"kept running in the container and the new code queued behind it",
                pytrace=False,
            )
        assert result.value == "next", result.error
