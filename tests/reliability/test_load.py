"""Load: 20 agents at once on a runtime with a pool of 4, each taking five
scripted steps that call a host tool. Every run must complete with its own,
correct result, in order; no container may be left; the controller's
footprint after a second wave must be what it was after the first.

Throughput and the controller's peak RSS are printed (run pytest with -s).
"""

from __future__ import annotations

import asyncio
import collections
import resource
import threading
import time

import docker
import pytest

import legion
from legion.testing import ScriptedModel, action

from .support import fill_default_executor, fill_docker_pools, settle, tracked_runtime

pytestmark = pytest.mark.docker

AGENTS = 20
POOL = 4
CONTINUE_STEPS = 4
STEPS = CONTINUE_STEPS + 1
WAVE_BOUND = 90.0


class Tally:
    """Counts each agent's steps on the host; refuses a step out of order."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def bump(self, step: int) -> int:
        agent = legion.vault.require("agent")
        with self._lock:
            if self.counts[agent] != step - 1:
                raise RuntimeError(f"{agent}: step {step} after {self.counts[agent]}")
            self.counts[agent] = step
        return step

    def whoami(self) -> str:
        return str(legion.vault.require("agent"))


TALLY = Tally()


class Stepper(legion.Agent):
    """Takes its steps one at a time, counting them on the host."""

    tools = [TALLY]
    config = {"max_iterations": STEPS + 1, "max_retries": 0}  # any failed step ends the run


def script() -> list[str]:
    steps = [action("eval_and_continue", "seen = [Tally.bump(1)]\nseen")]
    steps += [
        action("eval_and_continue", f"seen.append(Tally.bump({n}))\nseen")
        for n in range(2, CONTINUE_STEPS + 1)
    ]
    steps.append(action("eval_and_complete", "{'agent': Tally.whoami(), 'seen': seen}"))
    return steps


async def wave(runtime: legion.SandboxRuntime, label: str) -> float:
    """Run AGENTS agents at once; check every result. Returns the seconds taken."""
    TALLY.counts.clear()
    models = {f"{label}-{i}": ScriptedModel(script()) for i in range(AGENTS)}

    async def one(agent: str) -> legion.RunResult:
        return await legion.run(
            Stepper,
            "count your steps",
            model=models[agent],
            runtime=runtime,
            vault={"agent": agent},
        )

    started = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(one(agent) for agent in models)), WAVE_BOUND)
    elapsed = time.perf_counter() - started
    assert len(results) == AGENTS
    for agent, result in zip(models, results, strict=True):
        assert result.output == {"agent": agent, "seen": list(range(1, CONTINUE_STEPS + 1))}
        assert result.iterations == CONTINUE_STEPS
        assert result.usage.requests == STEPS
        assert models[agent].remaining == 0
    assert TALLY.counts == dict.fromkeys(models, CONTINUE_STEPS)
    assert len({r.run_id for r in results}) == AGENTS
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\n[load] {label}: {AGENTS} agents x {STEPS} steps on pool_size={POOL} in "
        f"{elapsed:.2f} s: {AGENTS / elapsed:.2f} runs/s, {AGENTS * STEPS / elapsed:.1f} "
        f"steps/s (one sandbox run and one tool call each); controller peak RSS "
        f"{peak_mib:.0f} MiB"
    )
    return elapsed


async def test_twenty_concurrent_agents(docker_client: docker.DockerClient) -> None:
    async with tracked_runtime(docker_client, pool_size=POOL) as tracked:
        runtime = tracked.runtime
        await asyncio.wait_for(runtime.warm(), 60)
        await fill_docker_pools(runtime.backend.client)
        await fill_default_executor()
        start = await settle(runtime, live=POOL)
        await wave(runtime, "wave 1")
        first = await settle(runtime, live=POOL, baseline=start)
        await wave(runtime, "wave 2")
        second = await settle(runtime, live=POOL, baseline=first)
        print(f"[leaks] load: start {start}; after wave 1 {first}; after wave 2 {second}")
        # Tasks and descriptors come back to where they were before any load;
        # threads may stay (idle tool and executor threads are kept), but a
        # second wave must not add to them.
        assert (first - start).tasks < 5 and (second - start).tasks < 5
        assert (first - start).fds < 5 and (second - start).fds < 5
        assert (second - first).threads < 5
