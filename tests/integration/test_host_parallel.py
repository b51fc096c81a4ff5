"""Host-side legion.parallel and legion.pipeline: the counterparts of sandbox
code's SubAgents.parallel and .pipeline (tests/integration/test_subagents.py),
with the same cancellation and error rules."""

from __future__ import annotations

import asyncio

import docker
import pytest

import legion
from legion.testing import ScriptedModel, action, use_models

from ..reliability.support import container_exists, wait_until

# the sub-agents' workers, and their gate: Checkin.here(task) waits for Checkin.gate
from .test_subagents import (
    Checkin,
    Shouter,
    Worker,
    _checkin,  # noqa: F401 - autouse: a clear gate per test
    shouter_model,
    worker_model,
)

pytestmark = pytest.mark.docker


async def containers_of(
    runtime: legion.SandboxRuntime, events: list[legion.telemetry.Event]
) -> set[str]:
    runs = {e.run_id for e in events if e.name == legion.telemetry.RUN_START}
    return {s.container_id for s in await runtime.sandboxes(memory=False) if s.run_id in runs}


async def test_parallel_runs_each_agent_in_its_own_container_at_once(
    runtime: legion.SandboxRuntime,
) -> None:
    events: list[legion.telemetry.Event] = []
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        with use_models({"Worker": worker_model()}):
            calls = [(Worker, "a"), (Worker, "b"), (Worker, "c")]
            together = asyncio.create_task(legion.parallel(calls, runtime=runtime))
            await wait_until(lambda: len(Checkin.seen) == 3, 60, "three workers")
            containers = await containers_of(runtime, events)  # all three are working
            Checkin.gate.set()
            answers = await together
    finally:
        unsubscribe()
    assert len(containers) == 3
    assert answers == ["A", "B", "C"]  # in the order asked


async def test_max_parallel_bounds_the_runs_at_once(runtime: legion.SandboxRuntime) -> None:
    with use_models({"Worker": worker_model()}):
        calls = [(Worker, "a"), (Worker, "b"), (Worker, "c")]
        together = asyncio.create_task(legion.parallel(calls, runtime=runtime, max_parallel=2))
        await wait_until(lambda: len(Checkin.seen) == 2, 60, "two workers")
        await asyncio.sleep(1)
        assert len(Checkin.seen) == 2  # the third waits for a slot
        Checkin.gate.set()
        assert await together == ["A", "B", "C"]


async def test_each_run_sees_the_vault_and_a_tools_call_is_the_parent(
    runtime: legion.SandboxRuntime,
) -> None:
    class Whoami:
        """Says who the caller is."""

        def user(self) -> str:
            return str(legion.vault.require("user"))

    class Teller(legion.Agent):
        """Tells the user's name."""

        tools = [Whoami]

    class Fanout:
        """Asks two tellers at once, from the host."""

        async def ask(self) -> list[str]:
            return await legion.parallel([(Teller, "who?"), (Teller, "who?")])

    class Front(legion.Agent):
        """Delegates from a host tool."""

        tools = [Fanout]

    events: list[legion.telemetry.Event] = []
    models = {
        "Front": ScriptedModel([action("eval_and_complete", "Fanout.ask()")]),
        "Teller": ScriptedModel(lambda messages: action("eval_and_complete", "Whoami.user()")),
    }
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        with use_models(models):
            result = await legion.run(Front, "who am I?", runtime=runtime, vault={"user": "ada"})
    finally:
        unsubscribe()
    assert result.output == ["ada", "ada"]
    children = {e.run_id for e in events if e.name == "run.start" and e.run_id != result.run_id}
    assert len(children) == 2
    assert {e.parent_run_id for e in events if e.run_id in children} == {result.run_id}


async def test_a_bad_call_is_refused_before_any_run_starts() -> None:
    for calls, problem in [
        ([(Shouter, "ok"), (dict, "x")], "parallel: calls[1]: <class 'dict'> is not a legion"),
        ([(Shouter, "ok"), (Shouter, 7)], "parallel: calls[1]: the task must be a string"),
        ([(Shouter,)], "parallel: calls[0] must be (AgentClass, task)"),
    ]:
        with pytest.raises(legion.UsageError) as caught:
            await legion.parallel(calls)  # type: ignore[arg-type]
        assert problem in str(caught.value)
    with pytest.raises(legion.UsageError, match="max_parallel"):
        await legion.parallel([(Shouter, "x")], max_parallel=0)


class Breaker(legion.Agent):
    """Checks in, then fails."""

    tools = [Checkin]


async def test_one_failure_in_parallel_cancels_the_rest(runtime: legion.SandboxRuntime) -> None:
    events: list[legion.telemetry.Event] = []
    breaker = ScriptedModel(
        lambda messages: action("eval_and_complete", "Checkin.here('x')\nraise ValueError('no')")
    )
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        with use_models({"Worker": worker_model(sleep=60), "Breaker": breaker}):
            calls = [(Worker, "slow"), (Breaker, "x")]
            together = asyncio.create_task(legion.parallel(calls, runtime=runtime, max_retries=0))
            await wait_until(lambda: len(Checkin.seen) == 2, 60, "both at work")
            containers = await containers_of(runtime, events)
            Checkin.gate.set()  # the worker now sleeps 60 s: only cancelling ends it early
            with pytest.raises(legion.MaxRetriesReached) as caught:
                await asyncio.wait_for(together, 45)
    finally:
        unsubscribe()
    assert caught.value.__notes__ == [
        "parallel: call 1 (Breaker) failed; the other calls were cancelled"
    ]
    assert len(containers) == 2
    client = docker.from_env()
    for container in containers:  # gone before parallel raised
        assert not await container_exists(client, container)


async def test_parallel_can_return_errors_in_place(runtime: legion.SandboxRuntime) -> None:
    answers = iter([action("return", result="HI!"), *["not an action"] * 10])
    shouter = ScriptedModel(lambda messages: next(answers))
    with use_models({"Shouter": shouter}):
        first, second = await legion.parallel(
            [(Shouter, "hi"), (Shouter, "x")], return_errors=True, max_parallel=1, max_retries=1
        )
    assert first == "HI!"
    assert isinstance(second, legion.MaxRetriesReached)


async def test_cancelling_parallel_removes_the_containers(runtime: legion.SandboxRuntime) -> None:
    events: list[legion.telemetry.Event] = []
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        with use_models({"Worker": worker_model(sleep=60)}):
            together = asyncio.create_task(
                legion.parallel([(Worker, "a"), (Worker, "b")], runtime=runtime)
            )
            await wait_until(lambda: len(Checkin.seen) == 2, 60, "two workers")
            containers = await containers_of(runtime, events)
            together.cancel()
            with pytest.raises(asyncio.CancelledError):
                await together
    finally:
        unsubscribe()
    assert len(containers) == 2
    client = docker.from_env()
    for container in containers:
        assert not await container_exists(client, container)


async def test_a_pipeline_passes_each_answer_to_the_next_step(
    runtime: legion.SandboxRuntime,
) -> None:
    async def lower_again(previous: str) -> str:
        return previous.lower() + " again"

    with use_models({"Shouter": shouter_model()}):
        answer = await legion.pipeline(
            [
                (Shouter, "hello"),
                (Shouter, lower_again),  # an async function of the previous answer
                (Shouter, "and"),
            ],
            runtime=runtime,
        )
    # step 2 got a function of step 1's answer; step 3 got its task with step 2's answer
    assert answer == "AND\n\nTHE PREVIOUS STEP'S ANSWER:\n'HELLO! AGAIN!'!"
    with use_models({"Shouter": shouter_model()}):
        started = await legion.pipeline([(Shouter, lambda p: f"{p} there")], start="hi")
    assert started == "HI THERE!"


async def test_a_bad_pipeline_step_fails_with_a_clear_error(
    runtime: legion.SandboxRuntime,
) -> None:
    with pytest.raises(legion.UsageError, match="pipeline step 1: the task must be a string"):
        await legion.pipeline([(Shouter, "fine"), (Shouter, 42)])  # type: ignore[list-item]
    ran: list[str] = []

    def shout(messages: list[dict[str, str]]) -> str:
        ran.append(messages[1]["content"])
        return action("return", result="ok")

    bad_step = "pipeline step 1: the task must be a string, not int"
    with use_models({"Shouter": ScriptedModel(shout)}), pytest.raises(legion.UsageError) as caught:
        await legion.pipeline([(Shouter, "first"), (Shouter, lambda p: 42), (Shouter, "x")])
    assert str(caught.value) == bad_step
    assert ran == ["first"]  # the steps after the bad one did not run
