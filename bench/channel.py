"""The sandbox channel's designs side by side, in one run (issue 17).

For each way the controller can drive the channel (``LEGION_CHANNEL``:
``aio``, grpc.aio on a thread of its own; ``sync``, grpc's synchronous server
with a thread per stream), with the same image and the same sandbox limits:

- a warm exec of ``1 + 1`` and of ``print(1 + 1)`` (p50 and p99);
- an exec that makes one tool call, and the call alone (that less the bare
  expression);
- the controller's CPU time per tool call: process CPU time (every thread of
  this process) over a step of sequential calls, divided by the calls, with
  the rate limit raised so that it does not wait.

The first design measured is the default; the order alternates between them
per round so that neither always runs on a cooler machine.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import legion
from legion.sandbox.channel import CHANNEL_ENV

from .common import Measures, check, timed

KINDS = ("sync", "aio")


def tiny(x: str) -> int:
    """The cheapest host tool there is: how long its argument is."""
    return len(x)


async def _cpu_per_call(sandbox: legion.Sandbox, calls: int) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = await sandbox.run(f"n = 0\nfor _ in range({calls}):\n    n += tiny('x')\nn")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    check(result.value, calls, f"{calls} sequential tool calls", error=result.error)
    return {
        "calls": calls,
        "wall_s": round(wall, 3),
        "cpu_ms_per_call": round(cpu / calls * 1000, 4),
        "wall_ms_per_call": round(wall / calls * 1000, 4),
    }


async def measure_kind(kind: str, n: int, calls: int, log: Measures) -> dict[str, Any]:
    found: dict[str, Any] = {}
    before = os.environ.get(CHANNEL_ENV)
    os.environ[CHANNEL_ENV] = kind
    try:
        # High enough that the rate limit never makes a call wait here.
        limits = legion.SandboxLimits(tool_calls_per_second=1_000_000)
        async with (
            legion.SandboxRuntime(pool_size=0, limits=limits) as runtime,
            legion.Sandbox(runtime=runtime, tools=[tiny]) as sandbox,
        ):

            async def run(code: str, expected: object) -> None:
                result = await sandbox.run(code)
                check(result.value, expected, f"value of {code!r}", error=result.error)

            for name, code, expected in (
                ("exec_expression", "1 + 1", 2),
                ("exec_print", "print(1 + 1)", None),
                ("exec_with_tool_call", "tiny('x')", 1),
            ):
                value = await log.run(
                    f"channel {kind} {name}",
                    lambda code=code, expected=expected: timed(  # type: ignore[misc]
                        n, lambda: run(code, expected), warmup=20
                    ),
                )
                if value is not None:
                    found[name] = value
            if "exec_with_tool_call" in found and "exec_expression" in found:
                found["tool_call_only_p50_ms"] = round(
                    found["exec_with_tool_call"]["p50_ms"] - found["exec_expression"]["p50_ms"], 4
                )
            cpu = await log.run(
                f"channel {kind} cpu per call", lambda: _cpu_per_call(sandbox, calls)
            )
            if cpu is not None:
                found["tool_calls_sequential"] = cpu
    finally:
        if before is None:
            os.environ.pop(CHANNEL_ENV, None)
        else:
            os.environ[CHANNEL_ENV] = before
    return found


async def measure(smoke: bool, log: Measures) -> dict[str, Any]:
    """``{"channel_designs": {kind: {...}}}``: every design, same run."""
    print("bench: the sandbox channel's designs side by side (sync, aio)...", file=sys.stderr)
    n = 10 if smoke else 300
    calls = 200 if smoke else 10_000
    designs: dict[str, Any] = {}
    for kind in KINDS:
        designs[kind] = await measure_kind(kind, n, calls, log)
    return {"channel_designs": designs}
