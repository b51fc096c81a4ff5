"""Parallel tool calls from sandbox code, without threads: ``Tool.fn.map(items)``
and the async stubs (``await Tool.afn(x)``, ``await fn.aio(x)``).

Overlap is shown on the host, not by timing: the host tool waits at a
``threading.Barrier`` that only opens when ``PARTIES`` calls are inside it at
once, so calls served one after another would break it (BrokenBarrierError
after its timeout) instead of passing slowly."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest
from bench import fanout
from bench.common import Measures

import legion

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
PARTIES = 8
BARRIER_TIMEOUT = 20.0


class Orders:
    """Orders, read on the host; ``get`` of an id under 100 waits until
    PARTIES such calls are in."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(PARTIES, timeout=BARRIER_TIMEOUT)
        self.calls: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    def get(self, order_id: int) -> dict[str, object]:
        """One order; odd ids from 100 do not exist (KeyError)."""
        with self._lock:
            self.calls.append(order_id)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if order_id < 100:
                self.barrier.wait()
            elif order_id % 2:
                raise KeyError(f"no order {order_id}")
            return {"id": order_id, "user": legion.vault.require("user")}
        finally:
            with self._lock:
                self.in_flight -= 1

    def total(self, order_id: int, currency: str) -> str:
        """Free of the barrier: for arguments of several iterables."""
        return f"{order_id} {currency}"


async def test_map_overlaps_calls_keeps_order_and_the_vault(
    runtime: legion.SandboxRuntime,
) -> None:
    orders = Orders()
    limits = legion.SandboxLimits(max_concurrent_tool_calls=PARTIES)
    async with legion.Sandbox(
        runtime=runtime, tools=[orders], limits=limits, vault={"user": "alice"}
    ) as sandbox:
        n = PARTIES * 5  # the barrier opens five times
        result = await sandbox.run(f"rows = Orders.get.map(range({n}))\nrows")
        assert result.ok, result.error
        assert result.value == [{"id": i, "user": "alice"} for i in range(n)]
        assert sorted(orders.calls) == list(range(n))
        assert orders.peak == PARTIES  # they overlapped, and never past the cap
        several = await sandbox.run("Orders.total.map([1, 2], ['EUR', 'USD'])")
        assert several.value == ["1 EUR", "2 USD"]
        uneven = await sandbox.run("Orders.total.map([1, 2], ['EUR'])")
        assert uneven.error is not None and uneven.error.type == "ValueError"
        assert "different lengths" in uneven.error.message


async def test_map_errors_are_raised_or_kept_in_place(runtime: legion.SandboxRuntime) -> None:
    orders = Orders()
    code = (
        "ids = [100 + i for i in range(8)]\n"
        "try:\n"
        "    Orders.get.map(ids)\n"
        "except KeyError as exc:\n"
        "    raised = [type(exc).__name__, str(exc), exc.__notes__]\n"
        "kept = Orders.get.map(ids, return_exceptions=True)\n"
        "odd = Orders.get.map([object()] + ids[:7], return_exceptions=True)[0]\n"
        "[raised, [r['id'] if isinstance(r, dict) else type(r).__name__ for r in kept],\n"
        " isinstance(kept[1], ToolError), type(odd).__name__]\n"
    )
    async with legion.Sandbox(runtime=runtime, tools=[orders], vault={"user": "bob"}) as sandbox:
        result = await sandbox.run(code)
    assert result.ok, result.error
    raised, kept, is_tool_error, odd = result.value
    # Every item was called; the first failed item's error is raised.
    assert raised[0] == "KeyError" and "no order 101" in raised[1]
    assert "item 1 failed (4 of 8 failed)" in raised[2][0]
    assert "return_exceptions=True" in raised[2][0]
    assert kept == [100, "KeyError", 102, "KeyError", 104, "KeyError", 106, "KeyError"]
    assert is_tool_error is True
    assert odd == "ToolArgumentError"  # not JSON: refused in the sandbox, in its place
    assert sorted(orders.calls) == sorted([100 + i for i in range(8)] * 2 + list(range(100, 107)))


async def test_map_goes_through_the_allowlist_and_validation(
    runtime: legion.SandboxRuntime,
) -> None:
    def double(x: int) -> int:
        return 2 * x

    code = (
        "checked = double.map([1, 'two', 3], return_exceptions=True)\n"
        "[c if isinstance(c, int) else [type(c).__name__, str(c)] for c in checked]\n"
    )
    async with legion.Sandbox(runtime=runtime, tools=[double]) as sandbox:
        result = await sandbox.run(code)
        assert result.ok, result.error
        assert result.value[0] == 2 and result.value[2] == 6
        assert result.value[1][0] == "ToolArgumentError" and "x" in result.value[1][1]
        empty = await sandbox.run("double.map([])")
        assert empty.value == []
        bare = await sandbox.run("double.map()")
        assert bare.error is not None and bare.error.type == "TypeError"


async def test_async_stubs_overlap_in_the_codes_event_loop(
    runtime: legion.SandboxRuntime,
) -> None:
    orders = Orders()

    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "late"

    code = (
        "import asyncio\n"
        "async def main():\n"
        "    ticks = 0\n"
        "    async def tick():\n"
        "        nonlocal ticks\n"
        "        while True:\n"
        "            ticks += 1\n"
        "            await asyncio.sleep(0.01)\n"
        "    ticker = asyncio.create_task(tick())\n"
        f"    rows = await asyncio.gather(*(Orders.aget(i) for i in range({PARTIES * 2})))\n"
        "    ticker.cancel()\n"
        "    try:\n"
        "        await Orders.aget(101)\n"
        "    except KeyError as exc:\n"
        "        missing = str(exc)\n"
        "    try:\n"
        "        await asyncio.wait_for(slow.aio(2), 0.1)\n"
        "    except TimeoutError:\n"
        "        gave_up = True\n"
        "    again = await Orders.total.aio(7, 'EUR')\n"
        "    return [r['id'] for r in rows], missing, gave_up, again, ticks\n"
        "asyncio.run(main())\n"
    )
    async with legion.Sandbox(
        runtime=runtime, tools=[orders, slow], vault={"user": "carol"}
    ) as sandbox:
        result = await sandbox.run(code)
        assert result.ok, result.error
        ids, missing, gave_up, again, ticks = result.value
        assert ids == list(range(PARTIES * 2))
        assert "no order 101" in missing
        assert gave_up is True and again == "7 EUR"
        assert ticks > 0  # the loop ran other coroutines while the calls were out
        assert orders.peak == PARTIES
        # A call given up on leaves nothing behind: blocking calls still work.
        after = await sandbox.run("Orders.total(1, 'EUR')")
        assert after.value == "1 EUR"


GATHER_STUCK = (
    "import asyncio\n"
    "async def main():\n"
    "    return await asyncio.gather(stuck.aio(1), stuck.aio(2))\n"
    "asyncio.run(main())\n"
)


@pytest.mark.parametrize("code", ["stuck.map(range(4))", GATHER_STUCK])
async def test_a_timeout_while_calls_are_out_stops_the_code(
    runtime: legion.SandboxRuntime, code: str
) -> None:
    def stuck(x: int) -> int:
        time.sleep(3)
        return x

    async with legion.Sandbox(runtime=runtime, tools=[stuck]) as sandbox:
        result = await sandbox.run(code, timeout=1)
        assert result.timed_out
        later = await sandbox.run("1 + 1")
        assert later.value == 2


async def test_the_bench_measures_run_and_record_their_goals(
    runtime: legion.SandboxRuntime,
) -> None:
    log = Measures(fail="")
    found = await fanout.measure(runtime, True, log)
    assert log.failures == {}
    mapped, sequential = found["tool_map_100x10ms"], found["tool_calls_10k_sequential"]
    assert mapped["n"] == 2 and mapped["goal_ms"] == 150.0 and isinstance(mapped["met"], bool)
    # 100 calls of 10 ms, 16 at a time, cannot take less than 7 rounds.
    assert mapped["p50_ms"] >= 70.0
    assert sequential["n"] == 1 and sequential["calls"] == 1000


async def test_the_readme_example_runs_as_documented(runtime: legion.SandboxRuntime) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    [block] = [b for b in blocks if "Orders.get.map(order_ids)" in b]

    class Orders:
        def get(self, order_id: int) -> int:
            if order_id < 0:
                raise KeyError(order_id)
            return order_id * 10

        def total(self, order_id: int, currency: str) -> str:
            return f"{order_id} {currency}"

    prelude = "order_ids = [1, 2, 3]\nids = [4, -1]\ncurrencies = ['EUR', 'USD']\n"
    shown = "\n[rows, totals, [k if isinstance(k, int) else type(k).__name__ for k in kept]]"
    async with legion.Sandbox(runtime=runtime, tools=[Orders]) as sandbox:
        result = await sandbox.run(prelude + block + shown)
    assert result.ok, result.error
    assert result.value == [[10, 20, 30], ["4 EUR", "-1 USD"], [40, "KeyError"]]


async def test_mcp_tools_fan_out_too(runtime: legion.SandboxRuntime) -> None:
    # The bench's echo server: the official mcp SDK over stdio, no network.
    server = legion.MCP.stdio(
        sys.executable, ["-m", "bench.mcp_echo_server"], cwd=str(ROOT), name="Echo"
    )
    code = "import asyncio\n[Echo.echo.map(['a', 'b', 'c']), asyncio.run(Echo.aecho(text='d'))]"
    try:
        async with legion.Sandbox(runtime=runtime, tools=[server]) as sandbox:
            result = await sandbox.run(code)
    finally:
        await server.close()
    assert result.ok, result.error
    assert result.value == [["a", "b", "c"], "d"]
