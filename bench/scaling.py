"""How our costs grow, and what the stronger boundary costs.

- exec latency against output size (1 KB to 10 MB) and against the number of
  sandboxes running at once (1, 4, 16, 64);
- single-use sandboxes a second (acquire, run, remove) on this machine;
- the agent loop's own overhead per iteration with a model that answers at
  once, for 1 and 20 agents at a time;
- warm exec, tool call and cold start under gVisor (runsc), when registered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import docker

import legion
from legion.testing import ScriptedModel, action

from .common import Measures, check, summary


def count_chars(text: str) -> int:
    return len(text)


async def exec_vs_output_size(
    runtime: legion.SandboxRuntime, n: int, log: Measures
) -> dict[str, Any]:
    limits = legion.SandboxLimits(output_limit_bytes=16 * 1024 * 1024, timeout_seconds=60)
    out: dict[str, Any] = {}
    async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
        for label, size in (
            ("1kb", 1_000),
            ("100kb", 100_000),
            ("1mb", 1_000_000),
            ("10mb", 10_000_000),
        ):

            async def one_size(size: int = size) -> dict[str, float]:
                samples = []
                for _ in range(n if size < 1_000_000 else max(2, n // 5)):
                    code = f"print('x' * {size - 1})"
                    result = await sandbox.run(code)
                    what = f"characters printed by {code}"
                    check(len(result.stdout), size, what, error=result.error)
                    check(result.stdout_truncated, False, f"{code}: stdout cut")
                    samples.append(result.duration)
                return summary(samples)

            name = f"exec_output_{label}"
            if (value := await log.run(name, one_size)) is not None:
                out[name] = value
    return out


async def exec_vs_concurrency(
    levels: tuple[int, ...], rounds: int, log: Measures
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with legion.SandboxRuntime(pool_size=0) as runtime:
        for k in levels:

            async def level(k: int = k) -> dict[str, float]:
                sandboxes = [legion.Sandbox(runtime=runtime) for _ in range(k)]
                try:
                    await asyncio.gather(*(s.start() for s in sandboxes))
                    samples: list[float] = []
                    for _ in range(rounds):
                        results = await asyncio.gather(*(s.run("1 + 1") for s in sandboxes))
                        errors = [str(r.error) for r in results if r.error]
                        check(
                            [r.value for r in results],
                            [2] * k,
                            f"values of '1 + 1' in {k} sandboxes at once",
                            error="; ".join(errors),
                        )
                        samples += [r.duration for r in results]
                    return summary(samples)
                finally:
                    await asyncio.gather(*(s.close() for s in sandboxes))

            name = f"exec_with_{k}_sandboxes_running"
            if (value := await log.run(name, level)) is not None:
                out[name] = value
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
                    result = await sandbox.run("1 + 1")
                    check(result.value, 2, "value of '1 + 1'", error=result.error)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


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
            check(result.iterations, n_steps, "iterations of a scripted agent run")

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


async def under_gvisor(n: int, log: Measures) -> dict[str, Any]:
    limits = legion.SandboxLimits(runtime="runsc")
    out: dict[str, Any] = {}
    async with legion.SandboxRuntime(pool_size=0) as runtime:

        async def cold_start() -> dict[str, float]:
            cold = []
            for _ in range(max(2, n // 20)):
                start = time.perf_counter()
                async with legion.Sandbox(runtime=runtime, limits=limits) as sandbox:
                    result = await sandbox.run("1 + 1")
                    check(result.value, 2, "value of '1 + 1' under runsc", error=result.error)
                    cold.append(time.perf_counter() - start)
            return summary(cold)

        async def warm_and_tool() -> dict[str, Any]:
            async with legion.Sandbox(
                runtime=runtime, limits=limits, tools=[count_chars]
            ) as sandbox:
                warm, tool = [], []
                for _ in range(n):
                    plain = await sandbox.run("1 + 1")
                    check(plain.value, 2, "value of '1 + 1' under runsc", error=plain.error)
                    warm.append(plain.duration)
                    call = await sandbox.run("count_chars('x')")
                    check(call.value, 1, "a tool call's value under runsc", error=call.error)
                    tool.append(call.duration)
                return {
                    "runsc_warm_exec_expression": summary(warm),
                    "runsc_exec_with_tool_call": summary(tool),
                }

        if (cold := await log.run("runsc_cold_start_to_first_result", cold_start)) is not None:
            out["runsc_cold_start_to_first_result"] = cold
        out.update(await log.run("runsc_warm_exec_and_tool_call", warm_and_tool) or {})
    return out


async def measure(
    runtime: legion.SandboxRuntime, smoke: bool, log: Measures
) -> tuple[dict[str, Any], dict[str, float]]:
    """The measures (summaries, for the table) and the throughputs (per second).
    A measure that fails is in ``log.failures`` instead."""
    measures: dict[str, Any] = {}
    rates: dict[str, float] = {}

    async def put(into: dict[str, Any], name: str, measure: Callable[[], Awaitable[Any]]) -> None:
        if (value := await log.run(name, measure)) is not None:
            into[name] = value

    async def merge(group: str, measures_in: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        measures.update(await log.run(group, measures_in) or {})

    await merge(
        "exec_vs_output_size", lambda: exec_vs_output_size(runtime, 3 if smoke else 20, log)
    )
    levels = (1, 4) if smoke else (1, 4, 16, 64)
    await merge("exec_vs_concurrency", lambda: exec_vs_concurrency(levels, 2 if smoke else 10, log))
    # Enough steps, even in the smoke run, for the difference to stand above noise.
    await put(
        measures, "agent_iteration_1_agent", lambda: agent_loop_overhead(1, 12 if smoke else 20)
    )
    await put(
        measures,
        "agent_iteration_20_agents",
        lambda: agent_loop_overhead(2 if smoke else 20, 8 if smoke else 10),
    )
    await put(
        rates, "single-use sandboxes per second", lambda: single_use_per_second(4 if smoke else 40)
    )
    if log.run_sync("runsc registered", runsc_registered):
        await merge("under_gvisor", lambda: under_gvisor(3 if smoke else 100, log))
    return measures, rates
