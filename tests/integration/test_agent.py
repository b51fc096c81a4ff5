"""Agents end to end: scripted model replies, real sandbox, real host tools."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pydantic
import pytest

import legion
from legion.testing import FakeOpenAIServer, Reply, ScriptedModel, action

pytestmark = pytest.mark.docker


class Ledger(legion.Tool):
    """The caller's account ledger, on the host."""

    balances: dict[str, int] = {"alice": 100, "bob": 5}

    def balance(self) -> int:
        """The current user's balance."""
        return self.balances[legion.vault.require("user")]

    def pay(self, to: str, amount: int) -> int:
        """Pay ``amount`` to ``to``; returns the new balance. Raises ValueError if short."""
        user = legion.vault.require("user")
        if self.balances[user] < amount:
            raise ValueError(f"insufficient funds: balance {self.balances[user]}")
        self.balances[user] -= amount
        self.balances[to] = self.balances.get(to, 0) + amount
        return self.balances[user]


class Accountant(legion.Agent):
    """Looks after the current user's money."""

    tools = [Ledger]
    config = {"max_iterations": 3, "max_retries": 2}


class Summary(pydantic.BaseModel):
    user: str
    balance: int


class Reporter(legion.Agent):
    """Reports balances in a fixed shape."""

    tools = [Ledger]
    output_schema = Summary


class Counter(legion.Agent):
    """Counts."""

    output_schema = {"type": "integer", "minimum": 0}


@pytest.fixture(autouse=True)
def _fresh_ledger() -> None:
    Ledger.balances = {"alice": 100, "bob": 5}


async def go(
    agent: type[legion.Agent], model: Any, runtime: legion.SandboxRuntime, **kwargs: Any
) -> legion.RunResult:
    return await legion.run(
        agent, "handle it", model=model, runtime=runtime, vault={"user": "alice"}, **kwargs
    )


async def test_continue_then_complete_with_tools(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [
            action("eval_and_continue", "before = Ledger.balance()\nbefore"),
            action("eval_and_complete", "after = Ledger.pay('bob', 30)\nf'{before} -> {after}'"),
        ]
    )
    result = await go(Accountant, model, runtime)
    assert result.output == "100 -> 70"
    assert result.iterations == 1
    assert Ledger.balances == {"alice": 70, "bob": 35}
    assert "Value of the last expression:\n100" in model.requests[1][-1]["content"]
    assert result.usage.requests == 2 and result.usage.total_tokens > 0
    assert [m["role"] for m in result.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


async def test_return_and_done_need_no_code(runtime: legion.SandboxRuntime) -> None:
    assert (
        await go(Accountant, ScriptedModel([action("return", result="fine")]), runtime)
    ).output == "fine"
    done = await go(Accountant, ScriptedModel([action("done")]), runtime)
    assert done.output is None and done.iterations == 0


async def test_max_iterations_stops_after_exactly_that_many_steps(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel(lambda messages: action("eval_and_continue", "1 + 1"))
    with pytest.raises(legion.MaxIterationsReached) as caught:
        await go(Accountant, model, runtime)
    assert caught.value.iterations == 3
    assert len(model.requests) == 3
    assert caught.value.run_id and caught.value.messages[0]["role"] == "system"
    assert caught.value.usage.requests == 3


async def test_max_retries_stops_after_that_many_failures_in_a_row(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel(lambda messages: "not an action")
    with pytest.raises(legion.MaxRetriesReached, match="3 failed steps in a row"):
        await go(Accountant, model, runtime)
    assert len(model.requests) == 3  # the first try and max_retries=2 retries


async def test_recovers_from_bad_json_code_errors_and_tool_errors(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel(
        [
            "Let me think... {oops",  # invalid JSON
            action("eval_and_continue", "1 / 0"),  # code error
            action("eval_and_continue", "Ledger.pay('bob', 1000)"),  # tool raises
            action(
                "eval_and_complete",
                "try:\n    Ledger.pay('bob', 1000)\nexcept ValueError as e:\n    msg = str(e)\nmsg",
            ),
        ]
    )
    result = await go(Accountant, model, runtime, max_retries=3)
    assert result.output == "insufficient funds: balance 100"
    feedback = [m[-1]["content"] for m in model.requests[1:]]
    assert "not a valid action" in feedback[0]
    assert "ZeroDivisionError" in feedback[1]
    assert "ValueError: insufficient funds" in feedback[2]


async def test_output_schema_failure_then_success(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [
            action("return", result=-1),
            action("return", result="x"),
            action("eval_and_complete", "6 * 7"),
        ]
    )
    result = await go(Counter, model, runtime)
    assert result.output == 42
    assert "-1 is less than the minimum of 0" in model.requests[1][-1]["content"]


async def test_pydantic_output_comes_back_as_an_instance(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel(
        [action("eval_and_complete", "{'user': 'alice', 'balance': Ledger.balance()}")]
    )
    result = await go(Reporter, model, runtime)
    assert result.output == Summary(user="alice", balance=100)


async def test_binding_scopes(runtime: legion.SandboxRuntime) -> None:
    script = [action("eval_and_continue", "secret = 41"), action("eval_and_complete", "secret + 1")]
    turn = await go(Accountant, ScriptedModel(list(script)), runtime)
    assert turn.output == 42
    iteration_model = ScriptedModel([*script, action("return", result="gone")])
    iteration = await go(Accountant, iteration_model, runtime, binding_scope="iteration")
    assert iteration.output == "gone"
    assert "NameError: name 'secret' is not defined" in iteration_model.requests[2][-1]["content"]


async def test_telemetry_events_in_order_with_linked_ids(runtime: legion.SandboxRuntime) -> None:
    events: list[legion.telemetry.Event] = []
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        model = ScriptedModel(
            [action("eval_and_continue", "Ledger.balance()"), action("return", result="ok")]
        )
        result = await go(Accountant, model, runtime, parent_run_id="parent-1")
    finally:
        unsubscribe()
    names = [e.name for e in events if e.run_id == result.run_id]
    assert names == [
        "run.start",
        "llm.request.start",
        "llm.request.stop",
        "iteration.start",
        "sandbox.eval.start",
        "tool.call.start",
        "tool.call.stop",
        "sandbox.eval.stop",
        "iteration.stop",
        "llm.request.start",
        "llm.request.stop",
        "run.stop",
    ]
    assert {e.parent_run_id for e in events if e.run_id == result.run_id} == {"parent-1"}
    tool_stop = next(e for e in events if e.name == "tool.call.stop")
    assert tool_stop.data["tool"] == "Ledger" and tool_stop.data["function"] == "balance"
    per_request = [e.data["usage"] for e in events if e.name == "llm.request.stop"]
    assert len(per_request) == 2
    # summed over the run, with the code's one tool call and its time in the sandbox
    model_usage = dataclasses.replace(result.usage, tool_calls=0, sandbox_seconds=0.0)
    assert per_request[0] + per_request[1] == model_usage
    assert result.usage.tool_calls == 1 and result.usage.sandbox_seconds > 0
    assert result.usage.total_tokens == sum(u.total_tokens for u in per_request) > 0
    run_stop = next(e for e in events if e.name == "run.stop")
    assert run_stop.data["usage"] == result.usage and run_stop.data["duration"] > 0


async def test_concurrent_runs_keep_their_own_vault(runtime: legion.SandboxRuntime) -> None:
    async def balance_of(user: str) -> Any:
        model = ScriptedModel([action("eval_and_complete", "Ledger.balance()")])
        return (
            await legion.run(
                Accountant, "balance?", model=model, runtime=runtime, vault={"user": user}
            )
        ).output

    assert await asyncio.gather(balance_of("alice"), balance_of("bob")) == [100, 5]


async def test_litellm_path_through_the_fake_server(runtime: legion.SandboxRuntime) -> None:
    with FakeOpenAIServer(
        [
            Reply(status=429, error_message="slow down", retry_after=0.01),
            action("eval_and_complete", "Ledger.balance()"),
        ]
    ) as server:
        result = await legion.run(
            Accountant,
            "balance?",
            runtime=runtime,
            vault={"user": "alice"},
            model="openai/fake-model",
            api_base=server.url,
            api_key="sk-test",
            model_retry_backoff=0.01,
        )
    assert result.output == 100
    assert len(server.requests) == 2  # the 429 was retried
    assert server.requests[1]["messages"][0]["role"] == "system"
    assert result.usage.requests == 1 and result.usage.prompt_tokens > 0


async def test_log_lines_carry_the_run_id(
    runtime: legion.SandboxRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level("WARNING", logger="legion.models"),
        FakeOpenAIServer(
            [
                Reply(status=503, error_message="busy"),
                action("return", result="ok"),
            ]
        ) as server,
    ):
        result = await legion.run(
            Accountant,
            "anything",
            runtime=runtime,
            model="openai/fake-model",
            api_base=server.url,
            api_key="sk-test",
            model_retry_backoff=0.01,
            parent_run_id="parent-7",
        )
    [retry] = [r.getMessage() for r in caplog.records if "model_request_retry" in r.getMessage()]
    assert f"run_id='{result.run_id}'" in retry and "parent_run_id='parent-7'" in retry
    assert "error='ServiceUnavailableError'" in retry
