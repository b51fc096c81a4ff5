"""``Tool.fn.map`` and the async stubs, on the runner alone: a thread here
plays the controller, reading the runner's outgoing ToolCalls and answering
them in an order of its choosing. (With real Docker and the real controller:
tests/integration/test_tool_fanout.py.)"""

from __future__ import annotations

import asyncio
import contextvars
import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import legion
from legion._proto import sandbox_pb2 as controller_pb
from legion.sandbox.tools import MAX_QUEUED_CALLS, ToolDispatcher, toolset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sandbox_image"))
from legion_runner import runner
from legion_runner._proto import sandbox_pb2 as pb


class Host:
    """Answers the runner's tool calls on its own thread: ``answer(call)``
    returns the value (or raises KeyError, sent as the tool's error). Calls
    are held until ``batch`` of them are in (or none came for a moment), then
    answered last first; with ``hold``, not at all until :meth:`release`."""

    def __init__(
        self,
        r: runner.Runner,
        answer: Callable[[pb.ToolCall], Any],
        *,
        batch: int = 1,
        hold: bool = False,
    ) -> None:
        self.runner = r
        self.answer = answer
        self.batch = batch
        self.hold = hold
        self.calls: list[pb.ToolCall] = []
        self.peak = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self.hold = False

    def _serve(self) -> None:
        held: list[pb.ToolCall] = []
        outbox: queue.SimpleQueue[Any] = self.runner._outbox
        while True:
            try:
                message = outbox.get(timeout=0.05)
            except queue.Empty:
                message = "idle"
            if message is None:
                return
            if isinstance(message, pb.RunnerMessage) and message.WhichOneof("kind") == "tool_call":
                held.append(message.tool_call)
                self.calls.append(message.tool_call)
                self.peak = max(self.peak, len(held))
                if len(held) < self.batch:
                    continue
            if self.hold:
                continue
            for call in reversed(held):
                self.runner._resolve(self._result(call))
            held = []

    def _result(self, call: pb.ToolCall) -> pb.ToolResult:
        try:
            value = self.answer(call)
        except KeyError as exc:
            return pb.ToolResult(
                call_id=call.call_id, error=pb.ToolError(type="KeyError", message=str(exc))
            )
        return pb.ToolResult(call_id=call.call_id, value=pb.Value(json=json.dumps(value)))

    def stop(self) -> None:
        self.runner._outbox.put(None)
        self._thread.join(5)


def _runner() -> runner.Runner:
    r = runner.Runner("unix:/nowhere", "token", max_message=1 << 20)
    spec = pb.ToolSpec(
        name="Orders",
        functions=[
            pb.FunctionSpec(name="get", signature="(order_id: int)"),
            pb.FunctionSpec(name="total", signature="(order_id: int, currency: str)"),
        ],
    )
    r._define_tools(pb.DefineTools(tools=[spec]))
    r._current_exec = "exec-1"
    return r


def _first_arg(call: pb.ToolCall) -> Any:
    args = json.loads(call.args_json)
    if args[0] % 2:
        raise KeyError(f"no order {args[0]}")
    return args


@pytest.fixture
def orders() -> Iterator[tuple[Any, Host]]:
    r = _runner()
    host = Host(r, _first_arg, batch=8)
    yield r._namespace["Orders"], host
    host.stop()


def test_map_keeps_the_order_of_the_items_whatever_the_order_of_answers(
    orders: tuple[Any, Host],
) -> None:
    stub, host = orders
    assert stub.get.map(range(0, 32, 2)) == [[i] for i in range(0, 32, 2)]
    assert host.peak == 8  # all eight were out at once: answered only when all were in


def test_map_with_several_iterables_and_errors_in_place(orders: tuple[Any, Host]) -> None:
    stub, host = orders
    got = stub.total.map([2, 3, 4, 6, 8, 10, 12, 14], "abcdefgh", return_exceptions=True)
    assert got[0] == [2, "a"] and got[2] == [4, "c"]
    assert isinstance(got[1], KeyError) and isinstance(got[1], runner.ToolError)
    assert got[1].tool == "Orders" and got[1].function == "total"
    with pytest.raises(KeyError) as raised:
        stub.get.map([1, 2, 3, 4, 5, 6, 7, 8])
    assert raised.value.__notes__[0].startswith("Orders.get.map: item 0 failed (4 of 8 failed)")
    assert len(host.calls) == 16  # every item was called, failures or not


def test_map_keeps_a_window_of_calls_in_flight() -> None:
    r = _runner()
    host = Host(r, lambda call: 0, hold=True)
    try:
        finished: list[Any] = []
        worker = threading.Thread(
            target=lambda: finished.append(r._namespace["Orders"].get.map([0] * 200)),
            daemon=True,
        )
        worker.start()
        deadline = time.monotonic() + 10
        while host.peak < runner._FANOUT_WINDOW and time.monotonic() < deadline:
            worker.join(0.01)
        worker.join(0.2)  # time for more to go out, were the window not kept
        assert worker.is_alive() and host.peak == runner._FANOUT_WINDOW
        host.release()  # the rest go out as answers free the window
        worker.join(10)
        assert finished == [[0] * 200] and len(host.calls) == 200
    finally:
        host.stop()


def test_map_raises_cancelled_when_the_execution_is_cancelled() -> None:
    r = _runner()
    host = Host(r, lambda call: 0, hold=True)
    outcome: list[BaseException] = []

    def mapper() -> None:
        try:
            r._namespace["Orders"].get.map(range(4))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=mapper, daemon=True)
    try:
        worker.start()
        deadline = time.monotonic() + 10
        while len(host.calls) < 4 and time.monotonic() < deadline:
            worker.join(0.01)
        r._worker = worker
        r._cancel("exec-1")
        worker.join(5)
        assert len(outcome) == 1 and isinstance(outcome[0], runner.ExecutionCancelled)
        assert r._pending == {}
    finally:
        host.stop()


def test_map_needs_iterables_of_the_same_length(orders: tuple[Any, Host]) -> None:
    stub, _ = orders
    with pytest.raises(TypeError, match=r"Orders\.get\.map\(\) takes an iterable"):
        stub.get.map()
    with pytest.raises(ValueError, match="different lengths"):
        stub.total.map([1, 2], ["EUR"])
    assert stub.get.map([]) == []
    bad = stub.get.map([object(), 2], return_exceptions=True)
    assert isinstance(bad[0], runner.ToolArgumentError) and bad[1] == [2]


def test_async_stubs_resolve_in_the_codes_loop(orders: tuple[Any, Host]) -> None:
    stub, host = orders

    async def main() -> Any:
        rows = await asyncio.gather(*(stub.aget(i) for i in range(0, 16, 2)))
        with pytest.raises(KeyError):
            await stub.get.aio(3)
        return rows

    assert asyncio.run(main()) == [[i] for i in range(0, 16, 2)]
    assert host.peak == 8


def test_an_answer_after_the_codes_loop_closed_does_not_break_the_runner() -> None:
    r = _runner()
    host = Host(r, lambda call: 0, hold=True)
    try:

        async def give_up() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(r._namespace["Orders"].aget(2), 0.05)

        asyncio.run(give_up())  # the loop is closed now
        assert r._pending == {}  # the call given up on is forgotten
        closed = asyncio.new_event_loop()
        closed.close()
        pending = runner._PendingCall(
            "exec-1", on_done=lambda p: closed.call_soon_threadsafe(print)
        )
        pending.settle(None)  # RuntimeError of the closed loop: swallowed on the reader
    finally:
        host.stop()


def test_a_tool_stub_has_async_forms_unless_a_host_function_has_the_name() -> None:
    r = runner.Runner("unix:/nowhere", "token", max_message=1 << 20)
    spec = pb.ToolSpec(
        name="Store",
        functions=[pb.FunctionSpec(name="get"), pb.FunctionSpec(name="aget")],
    )
    r._define_tools(pb.DefineTools(tools=[spec]))
    stub = r._namespace["Store"]
    assert stub.aget.__qualname__ == "Store.aget"  # the host's own function wins
    assert stub.get.aio.__qualname__ == "Store.get.aio"
    assert stub.aaget.__qualname__ == "Store.aget.aio"
    # A snapshot saves them as references to the tool, as the functions themselves.
    assert r._tool_refs[id(stub.aaget)] == ("tool", "Store", "aaget")
    assert r._resolve_ref(("tool", "Store", "aaget")) is stub.aaget
    assert "return_exceptions=True" in (stub.get.map.__doc__ or "")


def test_the_system_prompt_tells_the_model_in_one_line() -> None:
    class Stock(legion.Tool):
        """Stock on the host."""

        def count(self, item: str) -> int:
            """How many there are."""
            return len(item)

    class Shop(legion.Agent):
        """Sells things."""

        tools = [Stock]

    class Plain(legion.Agent):
        """No tools."""

    lines = [line for line in legion.prompt_for(Shop).splitlines() if ".map(items)" in line]
    assert len(lines) == 1 and "Tool.afunction(x)" in lines[0]
    assert ".map(" not in legion.prompt_for(Plain)


async def test_the_controller_holds_a_bounded_number_of_calls_per_sandbox() -> None:
    opened = asyncio.Event()

    async def wait_open(i: int) -> int:
        await opened.wait()
        return i

    dispatcher = ToolDispatcher(
        toolset([wait_open]), timeout=30, max_concurrent=4, rate=1e6, max_message=1 << 20
    )
    context = contextvars.copy_context()

    def call(i: int) -> controller_pb.ToolCall:
        return controller_pb.ToolCall(call_id=str(i), tool="wait_open", args_json=f"[{i}]")

    held = [
        asyncio.create_task(dispatcher.handle(call(i), context)) for i in range(MAX_QUEUED_CALLS)
    ]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in held)
    over = await asyncio.wait_for(dispatcher.handle(call(-1), context), 1)
    assert over.error.type == "ToolRateLimited" and "already waiting" in over.error.message
    opened.set()
    results = await asyncio.gather(*held)
    assert [json.loads(r.value.json) for r in results] == list(range(MAX_QUEUED_CALLS))
    again = await dispatcher.handle(call(7), context)  # room again once they ended
    assert again.value.json == "7"
