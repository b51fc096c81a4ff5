"""How our costs grow, and what the stronger boundary costs.

- exec latency against output size (1 KB to 10 MB) and against the number of
  sandboxes running at once (1, 4, 16, 64);
- single-use sandboxes a second (acquire, run, remove) on this machine;
- controller CPU per tool call;
- the agent loop's own overhead per iteration with a model that answers at
  once, for 1 and 20 agents at a time;
- warm exec, tool call and cold start under gVisor (runsc), when registered.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import docker

import legion
from legion.testing import ScriptedModel, action

from .common import summary


def count_chars(text: str) -> int:
    return len(text)


async def exec_vs_output_size(runtime: legion.SandboxRuntime, n: int) -> dict[str, Any]:
    limits = legion.SandboxLimits(output_limit_bytes=16 * 1024 * 1024, timeout_seconds=60)
    out: dict[str, Any] = {}
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        for label, size in (
            ("1kb", 1_000),
            ("100kb", 100_000),
            ("1mb", 1_000_000),
            ("10mb", 10_000_000),
        ):
            samples = []
            for _ in range(n if size < 1_000_000 else max(2, n // 5)):
                result = await sandbox.run(f"print('x' * {size - 1})")
                assert len(result.stdout) == size and not result.stdout_truncated
                samples.append(result.duration)
            out[f"exec_output_{label}"] = summary(samples)
    return out


async def exec_vs_concurrency(levels: tuple[int, ...], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        for k in levels:
            sandboxes = [legion.Sandbox(runtime=runtime) for _ in range(k)]
            await asyncio.gather(*(s.start() for s in sandboxes))
            try:
                samples: list[float] = []
                for _ in range(rounds):
                    results = await asyncio.gather(*(s.run("1 + 1") for s in sandboxes))
                    assert all(r.value == 2 for r in results)
                    samples += [r.duration for r in results]
                out[f"exec_with_{k}_sandboxes_running"] = summary(samples)
            finally:
                await asyncio.gather(*(s.close() for s in sandboxes))
    return out


async def single_use_per_second(total: int, concurrency: int = 4) -> float:
    async with legion.SandboxRuntime(pool_size=concurrency) as runtime:
        await runtime.warm()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                async with legion.Sandbox(runtime=runtime) as sandbox:
                    assert (await sandbox.run("1 + 1")).value == 2

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


async def controller_cpu_per_tool_call(runtime: legion.SandboxRuntime, calls: int) -> float:
    """Milliseconds of this process's CPU per tool call (one run making ``calls``)."""
    async with legion.Sandbox(runtime=runtime, tools=[count_chars]) as sandbox:
        await sandbox.run("count_chars('warm')")
        code = f"for _ in range({calls}):\n    count_chars('x')\n'done'"
        start = time.process_time()
        assert (await sandbox.run(code)).value == "done"
        return (time.process_time() - start) * 1000 / calls


class Idle(legion.Agent):
    """Does nothing useful: measures the loop."""


async def agent_loop_overhead(agents: int, steps: int) -> dict[str, Any]:
    """Wall time per extra iteration of ``agents`` concurrent runs with an
    instant scripted model: (runs of ``steps`` steps - runs of 1 step) / (steps
    - 1), so acquiring and removing each run's sandbox cancels out. The pool
    holds a sandbox for every agent, warmed before each batch."""

    async def batch(runtime: legion.SandboxRuntime, n_steps: int) -> float:
        async def one() -> None:
            script = [action("eval_and_continue", "1 + 1")] * n_steps
            model = ScriptedModel([*script, action("return", result=1)])
            result = await legion.run(
                Idle, "go", model=model, runtime=runtime, max_iterations=n_steps + 1
            )
            assert result.iterations == n_steps

        await runtime.warm()
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(agents)))
        return time.perf_counter() - start

    async with legion.SandboxRuntime(pool_size=agents) as runtime:
        samples = []
        for _ in range(3):
            short, long = await batch(runtime, 1), await batch(runtime, steps)
            samples.append(max(0.0, long - short) / (steps - 1))
    return summary(samples)


def runsc_registered() -> bool:
    return "runsc" in docker.from_env().info().get("Runtimes", {})


async def under_gvisor(n: int) -> dict[str, Any]:
    limits = legion.SandboxLimits(runtime="runsc")
    out: dict[str, Any] = {}
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        cold = []
        for _ in range(max(2, n // 20)):
            start = time.perf_counter()
            async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
                assert (await sandbox.run("1 + 1")).value == 2
                cold.append(time.perf_counter() - start)
        out["runsc_cold_start_to_first_result"] = summary(cold)
        async with legion.Sandbox(runtime=runtime, limits=limits, tools=[count_chars]) as sandbox:
            warm, tool = [], []
            for _ in range(n):
                warm.append((await sandbox.run("1 + 1")).duration)
                tool.append((await sandbox.run("count_chars('x')")).duration)
            out["runsc_warm_exec_expression"] = summary(warm)
            out["runsc_exec_with_tool_call"] = summary(tool)
    return out


async def measure(
    runtime: legion.SandboxRuntime, smoke: bool
) -> tuple[dict[str, Any], dict[str, float]]:
    """The measures (summaries, for the table) and the throughputs (per second)."""
    measures: dict[str, Any] = {}
    measures.update(await exec_vs_output_size(runtime, 3 if smoke else 20))
    measures.update(
        await exec_vs_concurrency((1, 4) if smoke else (1, 4, 16, 64), 2 if smoke else 10)
    )
    # Enough steps, even in the smoke run, for the difference to stand above noise.
    measures["agent_iteration_1_agent"] = await agent_loop_overhead(1, 12 if smoke else 20)
    measures["agent_iteration_20_agents"] = await agent_loop_overhead(
        2 if smoke else 20, 8 if smoke else 10
    )
    rates = {
        "single-use sandboxes per second": await single_use_per_second(4 if smoke else 40),
        "controller CPU ms per tool call": await controller_cpu_per_tool_call(
            runtime, 50 if smoke else 1000
        ),
    }
    if runsc_registered():
        measures.update(await under_gvisor(3 if smoke else 100))
    return measures, rates
