"""Tool calls in bulk from one step of sandbox code.

- ``tool_map_100x10ms``: ``Wait.ms10.map(range(100))``, a host tool that
  sleeps 10 ms, with ``max_concurrent_tool_calls=16``: the calls overlap, so
  it takes about 7 rounds of 10 ms, not 1 s. Timed in the sandbox around the
  ``.map`` (no exec overhead in the samples), with a 0.25 s pause between
  samples so that the default rate's bucket (500 calls a second, bursts of
  500) is full again: the sample is one map's time, not the sustained rate
  (at that, 100 calls take 200 ms whatever the overlap). Goal: p50 at most
  150 ms.
- ``tool_calls_10k_sequential``: 10,000 calls of a tiny host tool, one after
  another in a ``for`` loop; the whole ``Sandbox.run`` timed on the host.
  Goal: at most 5 s. Run with ``tool_calls_per_second`` raised to 100,000:
  at the default (500 a second) the rate alone makes it 20 s, which is the
  point of the default, not a cost of the channel.

Each row carries its ``goal_ms`` and whether its p50 ``met`` it; missing a
goal is reported there, not as a failed measure (a busy machine is slower).
"""

from __future__ import annotations

import time
from typing import Any

import legion

from .common import Measures, check, summary

MAP_CALLS = 100
MAP_GOAL_MS = 150.0
SEQUENTIAL_GOAL_MS = 5000.0
WARMUP = 2


class Wait:
    """Host tools for the fan-out measures."""

    def ms10(self, i: int) -> int:
        """Sleep 10 ms on the host; returns ``i``."""
        time.sleep(0.01)
        return i

    def tiny(self, i: int) -> int:
        """Returns ``i`` at once."""
        return i


def _goal(found: dict[str, Any], goal_ms: float) -> dict[str, Any]:
    return {**found, "goal_ms": goal_ms, "met": found["p50_ms"] <= goal_ms}


async def tool_map(runtime: legion.SandboxRuntime, n: int) -> dict[str, Any]:
    limits = legion.SandboxLimits(max_concurrent_tool_calls=16)
    code = (
        "import time\n"
        "samples = []\n"
        f"for _ in range({WARMUP + n}):\n"
        "    start = time.perf_counter()\n"
        f"    got = Wait.ms10.map(range({MAP_CALLS}))\n"
        "    samples.append(time.perf_counter() - start)\n"
        f"    assert got == list(range({MAP_CALLS})), got\n"
        "    time.sleep(0.25)\n"
        f"samples[{WARMUP}:]\n"
    )
    async with legion.Sandbox(runtime=runtime, tools=[Wait], limits=limits) as sandbox:
        result = await sandbox.run(code, timeout=60 + n)
    check(result.error, None, "error of the .map loop")
    check(len(result.value or []), n, "samples the sandbox returned")
    return _goal(dict(summary([float(s) for s in result.value])), MAP_GOAL_MS)


async def sequential_calls(runtime: legion.SandboxRuntime, calls: int, n: int) -> dict[str, Any]:
    limits = legion.SandboxLimits(tool_calls_per_second=100_000.0)
    code = f"total = 0\nfor i in range({calls}):\n    total += Wait.tiny(i)\ntotal\n"
    samples = []
    async with legion.Sandbox(runtime=runtime, tools=[Wait], limits=limits) as sandbox:
        for _ in range(n):
            start = time.perf_counter()
            result = await sandbox.run(code, timeout=120)
            samples.append(time.perf_counter() - start)
            check(result.value, calls * (calls - 1) // 2, "sum of the calls", error=result.error)
    found = _goal(dict(summary(samples)), SEQUENTIAL_GOAL_MS)
    found["calls"] = calls
    found["calls_per_second"] = calls / (found["p50_ms"] / 1e3)
    return found


async def measure(runtime: legion.SandboxRuntime, smoke: bool, log: Measures) -> dict[str, Any]:
    """Both measures (those that did not fail)."""
    found: dict[str, Any] = {}
    mapped = await log.run("tool_map_100x10ms", lambda: tool_map(runtime, 2 if smoke else 20))
    if mapped is not None:
        found["tool_map_100x10ms"] = mapped
    # Smoke mode makes the same loop, shorter: the goal is for 10,000.
    calls = 1000 if smoke else 10_000
    sequential = await log.run(
        "tool_calls_10k_sequential", lambda: sequential_calls(runtime, calls, 1 if smoke else 3)
    )
    if sequential is not None:
        found["tool_calls_10k_sequential"] = sequential
    return found
