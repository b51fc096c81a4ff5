"""The tool-call rate limit from sandbox code: by default a call over the rate
waits for its turn (backpressure), never faster than the rate and never stuck;
``tool_rate_limit_mode="fail"`` keeps failing fast.

Times are taken in the host tool itself, where a call is served. The checks
are on counts and lower bounds only: a slow machine makes calls later, never
earlier, so none of them depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import bisect
import threading
import time

import pytest

import legion

pytestmark = pytest.mark.docker

LOOP = "for _ in range({n}):\n    count_chars('x')\n'done'"


class Served:
    """A host tool that notes when each call is served, and how many at once."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()

    def count_chars(self, text: str) -> int:
        with self._lock:
            self.stamps.append(time.monotonic())
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            return len(text)
        finally:
            with self._lock:
                self.in_flight -= 1

    def most_in_window(self, seconds: float) -> int:
        """The most calls served in any window of ``seconds``."""
        stamps = sorted(self.stamps)
        return max(
            bisect.bisect_left(stamps, start + seconds) - i for i, start in enumerate(stamps)
        )


# A served time trails the moment the call was let through by however long the
# controller took to hand it to a thread: on a busy machine, a few calls' worth.
SLACK = 3


def assert_within_rate(served: Served, rate: float) -> None:
    """No window holds more calls than the bucket allows: a burst of ``rate``
    plus ``rate`` a second."""
    for seconds in (0.5, 1.0):
        allowed = rate + rate * seconds + SLACK
        seen = served.most_in_window(seconds)
        assert seen <= allowed, f"{seen} calls served within {seconds} s; at most {allowed}"


async def test_a_loop_of_thousands_of_calls_completes_with_default_limits(
    runtime: legion.SandboxRuntime,
) -> None:
    # The reproduction: 3000 calls against the default 500 a second
    # failed with ToolRateLimited; now they wait their turn.
    assert legion.SandboxLimits().tool_rate_limit_mode == "wait"
    served = Served()
    async with legion.Sandbox(runtime=runtime, tools=[served.count_chars]) as sandbox:
        result = await sandbox.run(LOOP.format(n=3000))
    assert result.ok, result.error
    assert result.value == "done"
    assert len(served.stamps) == 3000
    assert_within_rate(served, 500)


async def test_calls_over_the_rate_wait_and_never_exceed_it(
    runtime: legion.SandboxRuntime,
) -> None:
    rate, calls = 50, 150
    limits = runtime.limits.replace(tool_calls_per_second=rate)
    served = Served()
    async with legion.Sandbox(
        runtime=runtime, limits=limits, tools=[served.count_chars]
    ) as sandbox:
        result = await sandbox.run(LOOP.format(n=calls))
    assert result.ok, result.error
    assert len(served.stamps) == calls
    # A burst of `rate`, then the other 100 at `rate` a second: 2 s at least
    # (less a little for the first call's hand-over to a thread).
    took = served.stamps[-1] - served.stamps[0]
    assert took >= (calls - rate) / rate - 0.2, f"{calls} calls took only {took:.2f} s"
    assert_within_rate(served, rate)


async def test_waiting_calls_from_threads_with_one_concurrent_call_do_not_deadlock(
    runtime: legion.SandboxRuntime,
) -> None:
    # Six threads share one concurrency slot while the rate makes them wait.
    rate, threads, each = 50, 6, 25
    limits = runtime.limits.replace(tool_calls_per_second=rate, max_concurrent_tool_calls=1)
    served = Served()
    code = (
        "import threading\n"
        f"out = [0] * {threads}\n"
        "def work(i):\n"
        f"    out[i] = sum(count_chars('x' * i) for _ in range({each}))\n"
        f"pool = [threading.Thread(target=work, args=(i,)) for i in range({threads})]\n"
        "for t in pool: t.start()\n"
        "for t in pool: t.join()\n"
        "out"
    )
    async with legion.Sandbox(
        runtime=runtime, limits=limits, tools=[served.count_chars]
    ) as sandbox:
        result = await asyncio.wait_for(sandbox.run(code), 90)
    assert result.ok, result.error
    assert result.value == [i * each for i in range(threads)]
    assert len(served.stamps) == threads * each
    assert served.peak == 1
    assert_within_rate(served, rate)


async def test_fail_mode_fails_a_call_over_the_rate(runtime: legion.SandboxRuntime) -> None:
    limits = runtime.limits.replace(tool_calls_per_second=5, tool_rate_limit_mode="fail")
    served = Served()
    async with legion.Sandbox(
        runtime=runtime, limits=limits, tools=[served.count_chars]
    ) as sandbox:
        result = await sandbox.run(
            "calls = 0\n"
            "try:\n"
            "    for _ in range(50):\n"
            "        count_chars('x')\n"
            "        calls += 1\n"
            "except ToolError as exc:\n"
            "    caught = [type(exc).__name__, str(exc)]\n"
            "calls, caught"
        )
    assert result.ok, result.error
    calls, (error_type, message) = result.value
    assert error_type == "ToolRateLimited"
    assert "more than 5 tool calls a second" in message
    # A burst of five passes; a call over it fails instead of waiting.
    assert 5 <= calls == len(served.stamps) < 50


async def test_a_wait_longer_than_the_tool_timeout_fails_at_once(
    runtime: legion.SandboxRuntime,
) -> None:
    # A burst of one, then one call every 2 s: the second call's turn is
    # further away than the 1 s tool timeout.
    limits = runtime.limits.replace(
        tool_calls_per_second=0.5, tool_timeout_seconds=1, timeout_seconds=30
    )
    served = Served()
    async with legion.Sandbox(
        runtime=runtime, limits=limits, tools=[served.count_chars]
    ) as sandbox:
        result = await sandbox.run("count_chars('a')\ncount_chars('b')")
    assert not result.timed_out
    assert result.error is not None
    assert result.error.type == "ToolRateLimited"
    assert "longer than the tool timeout (1 s)" in result.error.message
    assert "tool_calls_per_second" in result.error.message
    assert len(served.stamps) == 1


async def test_the_run_timeout_ends_calls_waiting_for_their_turn(
    runtime: legion.SandboxRuntime,
) -> None:
    limits = runtime.limits.replace(tool_calls_per_second=1, timeout_seconds=2)
    served = Served()
    async with legion.Sandbox(
        runtime=runtime, limits=limits, tools=[served.count_chars]
    ) as sandbox:
        result = await sandbox.run(LOOP.format(n=20))
        assert result.timed_out, result
        at_timeout = len(served.stamps)
        assert 1 <= at_timeout <= 4  # a burst of one, then one a second for 2 s
        # The cancelled waiters are gone: none is served later.
        await asyncio.sleep(2)
        assert len(served.stamps) == at_timeout
        after = await sandbox.run("count_chars('fresh')")
        assert after.value == 5
