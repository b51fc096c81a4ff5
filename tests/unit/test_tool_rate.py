"""The tool-call rate limit in the dispatcher: waiting calls keep their order,
a turn too far away is refused, fail mode fails, bad modes are refused.
(The timing, against a real sandbox, is in tests/integration/test_tool_rate.py.)"""

from __future__ import annotations

import asyncio
import contextvars
import json

import pytest

import legion
from legion._proto import sandbox_pb2 as pb
from legion.sandbox.tools import ToolDispatcher, toolset


def _call(call_id: str, *args: object) -> pb.ToolCall:
    return pb.ToolCall(call_id=call_id, tool="note", args_json=json.dumps(list(args)))


def _dispatcher(
    served: list[int], *, rate: float, timeout: float = 30.0, mode: str = "wait"
) -> ToolDispatcher:
    def note(i: int) -> int:
        served.append(i)
        return i

    return ToolDispatcher(
        toolset([note]),
        timeout=timeout,
        max_concurrent=4,
        rate=rate,
        max_message=4 * 1024 * 1024,
        rate_mode=mode,  # type: ignore[arg-type]
    )


async def test_waiting_calls_are_served_first_come_first_served() -> None:
    served: list[int] = []
    dispatcher = _dispatcher(served, rate=10)
    ctx = contextvars.copy_context()
    # A burst of 10 passes at once; the other 5 wait, and keep their order.
    results = await asyncio.gather(*(dispatcher.handle(_call(str(i), i), ctx) for i in range(15)))
    assert [json.loads(r.value.json) for r in results] == list(range(15))
    assert served[10:] == list(range(10, 15))


async def test_a_turn_further_away_than_the_tool_timeout_is_refused_at_once() -> None:
    served: list[int] = []
    # A burst of one, then one call a second: the third call's turn is 2 s
    # away, past the 1.5 s tool timeout, so it is refused without waiting.
    dispatcher = _dispatcher(served, rate=1, timeout=1.5)
    ctx = contextvars.copy_context()
    first, second, third = await asyncio.gather(
        *(dispatcher.handle(_call(str(i), i), ctx) for i in range(3))
    )
    assert first.WhichOneof("outcome") == second.WhichOneof("outcome") == "value"
    assert third.error.type == "ToolRateLimited"
    assert "longer than the tool timeout (1.5 s)" in third.error.message
    assert served == [0, 1]


async def test_fail_mode_fails_calls_over_the_burst() -> None:
    served: list[int] = []
    dispatcher = _dispatcher(served, rate=3, mode="fail")
    ctx = contextvars.copy_context()
    outcomes = [(await dispatcher.handle(_call(str(i), i), ctx)) for i in range(5)]
    assert [r.WhichOneof("outcome") for r in outcomes] == ["value"] * 3 + ["error"] * 2
    assert outcomes[-1].error.type == "ToolRateLimited"
    assert "more than 3 tool calls a second" in outcomes[-1].error.message
    assert served == [0, 1, 2]


async def test_a_rate_below_one_a_second_still_allows_a_call() -> None:
    # The bucket holds at least one call, or a rate of 0.5 could never pay for any.
    served: list[int] = []
    dispatcher = _dispatcher(served, rate=0.5, mode="fail")
    result = await dispatcher.handle(_call("0", 0), contextvars.copy_context())
    assert result.WhichOneof("outcome") == "value"


def test_an_unknown_mode_is_refused_with_the_choices() -> None:
    with pytest.raises(legion.UsageError, match=r"'wait', 'fail'.*got 'drop'"):
        _dispatcher([], rate=1, mode="drop")


def test_waiting_is_the_default() -> None:
    assert legion.SandboxLimits().tool_rate_limit_mode == "wait"
    assert legion.SandboxLimits(tool_rate_limit_mode="fail").tool_rate_limit_mode == "fail"
