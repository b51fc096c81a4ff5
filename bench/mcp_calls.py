"""What an MCP tool call from sandbox code costs over calling the same server
from the host: ``mcp_call_from_sandbox`` against ``mcp_call_host_direct``.

Both call the ``echo`` tool of one stdio server program
(bench/mcp_echo_server.py, written with the official ``mcp`` SDK), in the
same run:

- from the host: the SDK's own ``ClientSession``, each sample one
  ``call_tool`` awaited;
- from the sandbox: ``legion.MCP.stdio`` in a ``legion.Sandbox``; one run's
  code times each ``Echo.echo(...)`` call with ``time.perf_counter`` (no exec
  overhead in the samples): the stub's gRPC round trip to the controller, the
  schema check, and the controller's call on its own session.

``overhead_p50_ms`` on the sandbox row is its p50 minus the host's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import legion

from .common import Measures, check, summary

ROOT = Path(__file__).resolve().parents[1]
SERVER_ARGS = ["-m", "bench.mcp_echo_server"]
WARMUP = 3


async def host_direct(n: int) -> dict[str, Any]:
    from mcp.client.session import ClientSession  # noqa: PLC0415 - the SDK only for this measure
    from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: PLC0415

    params = StdioServerParameters(command=sys.executable, args=SERVER_ARGS, cwd=ROOT)
    samples: list[float] = []
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        for i in range(WARMUP + n):
            start = time.perf_counter()
            result = await session.call_tool("echo", {"text": f"ping {i}"})
            took = time.perf_counter() - start
            text = getattr(result.content[0], "text", None) if result.content else None
            check(text, f"ping {i}", "the echo tool's answer, called from the host")
            if i >= WARMUP:
                samples.append(took)
    return dict(summary(samples))


def _sandbox_code(n: int) -> str:
    return (
        "import time\n"
        "samples = []\n"
        f"for i in range({WARMUP + n}):\n"
        "    start = time.perf_counter()\n"
        "    answer = Echo.echo(text=f'ping {i}')\n"
        "    took = time.perf_counter() - start\n"
        "    assert answer == f'ping {i}', answer\n"
        f"    if i >= {WARMUP}:\n"
        "        samples.append(took)\n"
        "samples\n"
    )


async def from_sandbox(runtime: legion.SandboxRuntime, n: int) -> dict[str, Any]:
    server = legion.MCP.stdio(sys.executable, SERVER_ARGS, cwd=str(ROOT), name="Echo")
    try:
        async with legion.Sandbox(tools=[server], runtime=runtime) as sandbox:
            result = await sandbox.run(_sandbox_code(n), timeout=60 + n)
    finally:
        await server.close()
    check(result.error, None, "error of the sandbox's MCP call loop")
    samples = result.value
    check(isinstance(samples, list) and len(samples), n, "samples the sandbox returned")
    return dict(summary([float(s) for s in samples]))


async def measure(runtime: legion.SandboxRuntime, smoke: bool, log: Measures) -> dict[str, Any]:
    """Both measures (those that did not fail), and the overhead on the sandbox's row."""
    n = 5 if smoke else 200
    found: dict[str, Any] = {}
    host = await log.run("mcp_call_host_direct", lambda: host_direct(n))
    if host is not None:
        found["mcp_call_host_direct"] = host
    sandboxed = await log.run("mcp_call_from_sandbox", lambda: from_sandbox(runtime, n))
    if sandboxed is not None:
        if host is not None:
            sandboxed["overhead_p50_ms"] = sandboxed["p50_ms"] - host["p50_ms"]
        found["mcp_call_from_sandbox"] = sandboxed
    return found


if __name__ == "__main__":  # a quick look: python -m bench.mcp_calls
    import asyncio

    async def main() -> None:
        async with legion.SandboxRuntime(pool_size=1) as runtime:
            print(json.dumps(await measure(runtime, False, Measures()), indent=2))

    asyncio.run(main())
