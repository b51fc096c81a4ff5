"""Human in the loop, embedded: sandbox code asks, a handler or respond()
answers, silence times out as an exception the code can catch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import legion
from legion.testing import ScriptedModel, action

from ..reliability.support import wait_until

pytestmark = pytest.mark.docker


class Clerk(legion.Agent):
    """Asks before doing anything risky."""

    tools = [legion.Human]
    config = {"max_iterations": 2, "max_retries": 1}


class Impatient(legion.Agent):
    """Asks, but does not wait long."""

    tools = [legion.Human]
    tool_config = {"Human": {"timeout": 0.3}}


ASK = action("eval_and_complete", 'Human.ask("Refund order 17?", meta={"options": ["yes", "no"]})')


async def test_a_handler_answers_and_sees_who_asked(runtime: legion.SandboxRuntime) -> None:
    asked: list[legion.human.HumanRequest] = []

    def answer(request: legion.human.HumanRequest) -> str:
        asked.append(request)
        return "yes"

    with legion.human.handler(answer):
        result = await legion.run(Clerk, "refund?", model=ScriptedModel([ASK]), runtime=runtime)
    assert result.output == "yes"
    (request,) = asked
    assert request.question == "Refund order 17?"
    assert request.agent == "Clerk" and request.run_id == result.run_id
    assert dict(request.meta) == {"options": ["yes", "no"]}
    assert legion.human.pending() == []


async def test_an_async_handler_answers_with_json_data(runtime: legion.SandboxRuntime) -> None:
    async def answer(request: legion.human.HumanRequest) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        return {"approved": True, "by": "sam"}

    with legion.human.handler(answer):
        result = await legion.run(Clerk, "refund?", model=ScriptedModel([ASK]), runtime=runtime)
    assert result.output == {"approved": True, "by": "sam"}


async def test_respond_answers_from_elsewhere_after_the_event(
    runtime: legion.SandboxRuntime,
) -> None:
    events: list[legion.telemetry.Event] = []
    loop = asyncio.get_running_loop()

    def on_event(event: legion.telemetry.Event) -> None:
        events.append(event)
        if event.name == "human.request":  # e.g. a dashboard shows it; a person clicks later
            ref = event.data["ref"]
            assert legion.human.run_of(ref) == event.run_id
            loop.call_later(0.05, legion.human.respond, ref, "no")

    unsubscribe = legion.telemetry.subscribe(on_event)
    try:
        result = await legion.run(Clerk, "refund?", model=ScriptedModel([ASK]), runtime=runtime)
    finally:
        unsubscribe()
    assert result.output == "no"
    asked = [e for e in events if e.name.startswith("human.")]
    assert [e.name for e in asked] == ["human.request", "human.response"]
    with pytest.raises(legion.HumanRequestNotFound, match="no human request"):
        legion.human.respond(asked[0].data["ref"], "again")  # answered already


async def test_no_answer_times_out_inside_the_sandbox_code(runtime: legion.SandboxRuntime) -> None:
    code = 'try:\n    r = Human.ask("anyone?")\nexcept TimeoutError as exc:\n    r = str(exc)\nr'
    result = await legion.run(
        Impatient,
        "ask",
        model=ScriptedModel([action("eval_and_complete", code)]),
        runtime=runtime,
    )
    assert result.output == "nobody answered the question within 0.3 s"
    assert legion.human.pending() == []


async def test_a_long_lived_agent_takes_its_handler_and_respond(
    runtime: legion.SandboxRuntime,
) -> None:
    model = ScriptedModel([ASK, ASK])
    async with await legion.start(
        Clerk, model=model, runtime=runtime, on_human=lambda r: "by handler"
    ) as handle:
        assert (await handle.call("first")).output == "by handler"

    async with await legion.start(Clerk, model=model, runtime=runtime) as handle:
        turn = handle.cast("second")
        await wait_until(lambda: bool(legion.human.pending()), 30, "the question")
        (request,) = legion.human.pending()
        handle.respond(request.ref, "by respond")
        assert (await handle.result_of(turn)).output == "by respond"


def test_a_handler_must_be_callable() -> None:
    with pytest.raises(legion.UsageError, match="callable"):
        legion.human.handler("yes")  # type: ignore[arg-type]
