"""Tool definitions and the controller-side dispatcher (allowlist, argument
validation, caps, vault context), driven with real protobuf messages."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import types

import pytest

import legion
from legion._proto import sandbox_pb2 as pb
from legion.sandbox.tools import ToolDispatcher, own_timeout, tool_from, toolset


class Counter:
    """Counts things."""

    def __init__(self) -> None:
        self.n = 0

    def bump(self, by: int = 1) -> int:
        """Add ``by``."""
        self.n += by
        return self.n

    @staticmethod
    def double(x: float) -> float:
        return 2 * x

    def _private(self) -> None: ...


def greet(name: str, *, punctuation: str = "!") -> str:
    """Say hello."""
    return f"hello {name}{punctuation}"


def test_class_tool_exposes_public_methods_only() -> None:
    tool = tool_from(Counter)
    assert tool.name == "Counter"
    assert sorted(tool.functions) == ["bump", "double"]
    assert tool.doc == "Counts things."
    assert tool.functions["bump"].signature == "(by: int = 1) -> int"
    spec = tool.spec()
    assert [f.name for f in spec.functions] == ["bump", "double"]
    assert not spec.is_function


def test_function_and_module_tools() -> None:
    tool = tool_from(greet)
    assert tool.is_function and tool.name == "greet"
    assert tool.functions[""].signature == "(name: str, *, punctuation: str = '!') -> str"
    module = types.ModuleType("textops", "Text helpers.")
    module.upper = lambda s: s.upper()  # type: ignore[attr-defined]
    module.upper.__module__ = "textops"  # type: ignore[attr-defined]
    module.__all__ = ["upper"]  # type: ignore[attr-defined]
    assert sorted(tool_from(module).functions) == ["upper"]


def test_definition_mistakes_say_how_to_fix_them() -> None:
    class Empty:
        def _hidden(self) -> None: ...

    class NeedsArgs:
        def __init__(self, url: str) -> None:
            self.url = url

        def get(self) -> str:
            return self.url

    with pytest.raises(legion.UsageError, match="no public functions"):
        tool_from(Empty)
    with pytest.raises(legion.UsageError, match="pass an instance"):
        tool_from(NeedsArgs)
    assert tool_from(NeedsArgs("x")).name == "NeedsArgs"
    with pytest.raises(legion.UsageError, match="unique"):
        toolset([greet, greet])
    with pytest.raises(legion.UsageError, match="identifier"):
        tool_from(greet, name="not a name")


def _call(tool: str, function: str, *args: object, **kwargs: object) -> pb.ToolCall:
    return pb.ToolCall(
        call_id="c1",
        exec_id="e1",
        tool=tool,
        function=function,
        args_json=json.dumps(list(args)),
        kwargs_json=json.dumps(kwargs),
    )


def _dispatcher(*tools: object, **options: float) -> ToolDispatcher:
    settings = {
        "timeout": 5.0,
        "max_concurrent": 4,
        "rate": 1000.0,
        "max_message": 4 * 1024 * 1024,
    } | options
    return ToolDispatcher(toolset(tools), **settings)  # type: ignore[arg-type]


async def test_dispatch_runs_the_real_function() -> None:
    dispatcher = _dispatcher(Counter, greet)
    ctx = contextvars.copy_context()
    result = await dispatcher.handle(_call("Counter", "bump", 5), ctx)
    assert json.loads(result.value.json) == 5
    result = await dispatcher.handle(_call("greet", "", "ada", punctuation="?"), ctx)
    assert json.loads(result.value.json) == "hello ada?"


@pytest.mark.parametrize(
    ("call", "error_type", "text"),
    [
        (_call("Nope", "x"), "ToolNotAllowed", "allowed: Counter.bump, Counter.double"),
        (_call("Counter", "_private"), "ToolNotAllowed", "is not a tool"),
        (_call("Counter", "bump", "many"), "ToolArgumentError", "by: Input should be a valid"),
        (_call("Counter", "double"), "ToolArgumentError", "x: Missing required argument"),
        (
            pb.ToolCall(call_id="c1", tool="Counter", function="bump", args_json="{oops"),
            "ToolArgumentError",
            "malformed arguments",
        ),
        (
            pb.ToolCall(call_id="c1", tool="Counter", function="bump", args_json="{}"),
            "ToolArgumentError",
            "malformed arguments",
        ),
    ],
)
async def test_dispatch_rejects_bad_calls(call: pb.ToolCall, error_type: str, text: str) -> None:
    result = await _dispatcher(Counter).handle(call, contextvars.copy_context())
    assert result.WhichOneof("outcome") == "error"
    assert result.error.type == error_type
    assert text in result.error.message


async def test_tool_errors_carry_type_and_message_only() -> None:
    def explode() -> None:
        raise KeyError("missing-thing")

    result = await _dispatcher(explode).handle(_call("explode", ""), contextvars.copy_context())
    assert result.error.type == "KeyError"
    assert result.error.message == "'missing-thing'"
    assert "Traceback" not in result.error.message and __file__ not in result.error.message


async def test_slow_tool_times_out_and_big_results_are_refused() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    def big() -> str:
        return "x" * 200_000

    dispatcher = _dispatcher(slow, big, timeout=0.2, max_message=100_000)
    ctx = contextvars.copy_context()
    timed_out = await dispatcher.handle(_call("slow", ""), ctx)
    assert timed_out.error.type == "ToolTimeout"
    too_big = await dispatcher.handle(_call("big", ""), ctx)
    assert too_big.error.type == "MessageTooLarge"


async def test_a_tools_own_timeout_error_is_not_a_tool_timeout() -> None:
    def upstream() -> None:
        raise TimeoutError("the upstream service did not answer")

    @own_timeout
    async def patient() -> str:
        await asyncio.sleep(0.3)
        return "done"

    dispatcher = _dispatcher(upstream, patient, timeout=0.1)
    ctx = contextvars.copy_context()
    raised = await dispatcher.handle(_call("upstream", ""), ctx)
    assert (raised.error.type, raised.error.message) == (
        "TimeoutError",
        "the upstream service did not answer",
    )
    # a function that keeps its own time is not cut at the sandbox's tool timeout
    waited = await dispatcher.handle(_call("patient", ""), ctx)
    assert json.loads(waited.value.json) == "done"


async def test_concurrency_cap() -> None:
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def work() -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        threading.Event().wait(0.05)
        with lock:
            in_flight -= 1
        return 1

    capped = _dispatcher(work, max_concurrent=2)
    ctx = contextvars.copy_context()
    results = await asyncio.gather(*(capped.handle(_call("work", ""), ctx) for _ in range(8)))
    assert all(r.WhichOneof("outcome") == "value" for r in results)
    assert peak == 2


async def test_tools_run_with_the_callers_vault() -> None:
    def who() -> str:
        return str(legion.vault.require("user"))

    dispatcher = _dispatcher(who)
    with legion.vault.bind(user="ada"):
        ctx = contextvars.copy_context()
    result = await dispatcher.handle(_call("who", ""), ctx)
    assert json.loads(result.value.json) == "ada"
    assert legion.vault.get("user") is None
