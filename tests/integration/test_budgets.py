"""Budgets of runs that use the sandbox: each stops the run at its limit with
``UsageLimitExceeded``, the usage is exact, and the sandbox and sub-agents'
sandboxes are gone when the error reaches the caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

import legion
from legion.testing import ScriptedModel, action, use_models

pytestmark = pytest.mark.docker


class Ledger:
    """Counts its calls on the host."""

    calls = 0
    lock = threading.Lock()

    def tick(self) -> int:
        with Ledger.lock:
            Ledger.calls += 1
            return Ledger.calls


class Clerk(legion.Agent):
    """Ticks the ledger."""

    tools = [Ledger]
    config = {"max_retries": 3, "max_iterations": 5}


class Researcher(legion.Agent):
    """Finds things out with the ledger."""

    tools = [Ledger]
    config = {"max_retries": 0}


class Lead(legion.Agent):
    """Hands work to a researcher."""

    tools = [legion.SubAgents(Researcher)]
    config = {"max_retries": 0, "max_iterations": 3}


def recorder() -> tuple[list[legion.telemetry.Event], Callable[[], None]]:
    events: list[legion.telemetry.Event] = []
    return events, legion.telemetry.subscribe(events.append)


async def containers_of(runtime: legion.SandboxRuntime, run_ids: set[str]) -> list[str]:
    return [s.container_id for s in await runtime.sandboxes(memory=False) if s.run_id in run_ids]


async def lead_over_budget(
    runtime: legion.SandboxRuntime,
    lead: ScriptedModel,
    researcher_step: str,
    researcher_tokens: int,
    **budget: float,
) -> tuple[legion.UsageLimitExceeded, list[legion.telemetry.Event]]:
    """Run Lead with ``budget``; its researcher repeats one step forever.
    The error it stops with, and every event of the run and its sub-agent."""
    researcher = ScriptedModel(lambda messages: researcher_step, tokens_per_reply=researcher_tokens)
    events, unsubscribe = recorder()
    try:
        with (
            use_models({"Researcher": researcher}),
            pytest.raises(legion.UsageLimitExceeded) as caught,
        ):
            await legion.run(Lead, "lead", model=lead, runtime=runtime, **budget)
    finally:
        unsubscribe()
    return caught.value, events


@pytest.fixture(autouse=True)
def _fresh_ledger() -> None:
    Ledger.calls = 0


async def test_max_tool_calls_refuses_the_call_past_it_and_stops_the_run(
    runtime: legion.SandboxRuntime,
) -> None:
    code = "for _ in range(10):\n    Ledger.tick()\n'never'"
    model = ScriptedModel([action("eval_and_complete", code)], tokens_per_reply=7)
    events, unsubscribe = recorder()
    try:
        with pytest.raises(legion.UsageLimitExceeded) as caught:
            await legion.run(Clerk, "tick", model=model, runtime=runtime, max_tool_calls=3)
    finally:
        unsubscribe()
    exc = caught.value
    assert Ledger.calls == 3  # the fourth call never reached the tool
    assert exc.usage.tool_calls == 3 and exc.counted.tool_calls == 3
    assert (exc.limit, exc.allowed, exc.used) == ("max_tool_calls", 3, 4)
    spent = [e.data["usage"].total_tokens for e in events if e.name == "llm.request.stop"]
    assert exc.usage.requests == 1 and exc.usage.total_tokens == sum(spent)
    assert exc.usage.sandbox_seconds > 0
    assert len(model.requests) == 1  # stopped, not retried
    run_ids = {e.run_id for e in events if e.run_id}
    assert await containers_of(runtime, run_ids) == []


async def test_max_sandbox_seconds_stops_the_step_at_the_limit(
    runtime: legion.SandboxRuntime,
) -> None:
    steps = [
        action("eval_and_continue", "import time\ntime.sleep(0.5)\n1"),
        action("eval_and_continue", "import time\ntime.sleep(30)\n2"),
    ]
    model = ScriptedModel(steps)
    events, unsubscribe = recorder()
    started = time.monotonic()
    try:
        with pytest.raises(legion.UsageLimitExceeded) as caught:
            await legion.run(Clerk, "sleep", model=model, runtime=runtime, max_sandbox_seconds=2)
    finally:
        unsubscribe()
    took = time.monotonic() - started
    exc = caught.value
    assert exc.limit == "max_sandbox_seconds" and exc.allowed == 2
    # the 30 s step was cut when the two steps together reached 2 s
    assert 2.0 <= exc.usage.sandbox_seconds < 3.0, exc.usage.sandbox_seconds
    assert took < 15, took
    assert exc.iterations == 1 and len(model.requests) == 2
    stops = [e for e in events if e.name == "run.exception"]
    assert stops and "UsageLimitExceeded" in str(stops[-1].data.get("error"))
    run_ids = {e.run_id for e in events if e.run_id}
    assert await containers_of(runtime, run_ids) == []


async def test_sub_agents_spend_their_callers_budget(runtime: legion.SandboxRuntime) -> None:
    """The researcher's tokens and tool calls count against the lead's budget:
    the lead stops when they are spent, and the researcher's sandbox goes too."""
    lead = ScriptedModel(
        [action("eval_and_complete", "SubAgents.call('Researcher', 'dig')")], tokens_per_reply=5
    )
    exc, events = await lead_over_budget(
        runtime, lead, action("eval_and_continue", "Ledger.tick()"), 5, max_tool_calls=4
    )
    assert exc.limit == "max_tool_calls" and exc.scope == "run of Lead"
    # the lead's one call (SubAgents.call) and the researcher's three ticks
    assert Ledger.calls == 3
    assert exc.usage.tool_calls == 1
    assert exc.counted.tool_calls == 4
    assert exc.usage.requests == len(lead.requests) == 1
    # everything the researcher's model spent is counted against the lead
    researcher_tokens = sum(
        e.data["usage"].total_tokens
        for e in events
        if e.name == "llm.request.stop" and e.parent_run_id
    )
    assert exc.counted.total_tokens == exc.usage.total_tokens + researcher_tokens
    children = {e.run_id for e in events if e.name == "run.start" and e.parent_run_id}
    assert len(children) == 1
    child_errors = [e for e in events if e.name == "run.exception" and e.run_id in children]
    assert child_errors, "the researcher's run ended with the lead's"
    run_ids = {e.run_id for e in events if e.run_id}
    assert await containers_of(runtime, run_ids) == []


async def test_a_sub_agent_stops_when_its_caller_runs_out_of_tokens(
    runtime: legion.SandboxRuntime,
) -> None:
    lead = ScriptedModel(
        [action("eval_and_complete", "SubAgents.call('Researcher', 'dig')")], tokens_per_reply=5
    )
    exc, events = await lead_over_budget(
        runtime, lead, action("eval_and_continue", "1"), 400, max_tokens=2000
    )
    assert exc.limit == "max_tokens" and exc.scope == "run of Lead"
    spent = [
        e.data["usage"].total_tokens
        for e in events
        if e.name == "llm.request.stop" and e.data.get("usage") is not None
    ]
    assert exc.counted.total_tokens == sum(spent) > 2000
    assert sum(spent[:-1]) <= 2000  # it stopped at the request that overspent
    run_ids = {e.run_id for e in events if e.run_id}
    assert await containers_of(runtime, run_ids) == []
