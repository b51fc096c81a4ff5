"""Agents as tools: sandbox code calls sub-agents, each in its own container."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import docker
import pytest

import legion
from legion.testing import ScriptedModel, action, use_models

from ..reliability.support import container_exists, wait_until

pytestmark = pytest.mark.docker


class Checkin:
    """Where sub-agents say they have started work, and wait for the test to
    let them go on (so it can look at them while all of them are working)."""

    seen: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def here(self, task: str) -> None:
        with self.lock:
            self.seen.append(task)
        self.gate.wait(60)


@pytest.fixture(autouse=True)
def _checkin() -> Iterator[None]:
    Checkin.seen.clear()
    Checkin.gate.clear()
    yield
    Checkin.gate.set()  # no tool thread stays blocked after its test


async def child_containers(
    runtime: legion.SandboxRuntime, events: list[legion.telemetry.Event]
) -> set[str]:
    """The containers that runs started by a sub-agent call are using now."""
    children = {e.run_id for e in events if e.name == "run.start" and e.parent_run_id}
    return {s.container_id for s in await runtime.sandboxes(memory=False) if s.run_id in children}


class Worker(legion.Agent):
    """Does one piece of work.

    Anything after the first paragraph is not shown to the parent."""

    tools = [Checkin]


class Shouter(legion.Agent):
    """Shouts what it is given."""


class Lead(legion.Agent):
    """Splits work between workers."""

    tools = [legion.SubAgents(Worker, Shouter)]
    config = {"max_iterations": 2, "max_retries": 1}


def worker_model(sleep: float = 0) -> ScriptedModel:
    """A worker that checks in from its container, then answers with its task."""

    def reply(messages: list[dict[str, str]]) -> str:
        task = messages[1]["content"]  # Checkin.here waits until the test lets it go
        code = f"import time\nCheckin.here({task!r})\ntime.sleep({sleep})\n{task!r}.upper()"
        return action("eval_and_complete", code)

    return ScriptedModel(reply)


def shouter_model() -> ScriptedModel:
    return ScriptedModel(
        lambda messages: action("return", result=messages[1]["content"].upper() + "!")
    )


def test_the_tool_describes_only_the_listed_agents_first_paragraphs() -> None:
    prompt = legion.prompt_for(Lead)
    assert "- Worker: Does one piece of work." in prompt
    assert "- Shouter: Shouts what it is given." in prompt
    assert "not shown to the parent" not in prompt


async def test_parallel_runs_each_sub_agent_in_its_own_container(
    runtime: legion.SandboxRuntime,
) -> None:
    events: list[legion.telemetry.Event] = []
    lead = ScriptedModel(
        [
            action(
                "eval_and_complete",
                'SubAgents.parallel([["Worker", "a"], ["Worker", "b"], ["Worker", "c"]])',
            )
        ]
    )
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        with use_models({"Worker": worker_model()}):
            parent = asyncio.create_task(legion.run(Lead, "split", model=lead, runtime=runtime))
            await wait_until(lambda: len(Checkin.seen) == 3, 60, "three workers")
            containers = await child_containers(runtime, events)  # all three are working
            Checkin.gate.set()
            result = await parent
    finally:
        unsubscribe()
    assert len(containers) == 3
    assert result.output == ["A", "B", "C"]  # in the order asked
    children = {e.run_id for e in events if e.name == "run.start" and e.run_id != result.run_id}
    assert len(children) == 3
    assert {e.parent_run_id for e in events if e.run_id in children} == {result.run_id}


async def test_call_returns_the_answer_and_sees_the_callers_vault(
    runtime: legion.SandboxRuntime,
) -> None:
    class Whoami:
        """Says who the caller is."""

        def user(self) -> str:
            return str(legion.vault.require("user"))

    class Teller(legion.Agent):
        """Tells the user's name."""

        tools = [Whoami]

    class Front(legion.Agent):
        """Delegates."""

        tools = [legion.SubAgents(Teller)]

    models = {
        "Front": ScriptedModel([action("eval_and_complete", 'SubAgents.call("Teller", "who?")')]),
        "Teller": ScriptedModel([action("eval_and_complete", "Whoami.user()")]),
    }
    with use_models(models):
        result = await legion.run(Front, "who am I?", runtime=runtime, vault={"user": "ada"})
    assert result.output == "ada"


async def test_an_unlisted_agent_is_refused_inside_the_sandbox(
    runtime: legion.SandboxRuntime,
) -> None:
    code = (
        "try:\n    r = SubAgents.call('Lead', 'recurse')\n"
        "except LookupError as exc:\n    r = str(exc)\nr"
    )
    lead = ScriptedModel([action("eval_and_complete", code)])
    result = await legion.run(Lead, "try", model=lead, runtime=runtime)
    assert result.output == "'Lead' is not an agent you may call; you may call: Worker, Shouter"


async def test_one_failure_in_parallel_cancels_the_rest(runtime: legion.SandboxRuntime) -> None:
    failing = ScriptedModel(["not an action"] * 10)  # Shouter gives up after its retries
    code = (
        "try:\n    r = SubAgents.parallel([['Worker', 'slow'], ['Shouter', 'x']])\n"
        "except RuntimeError as exc:\n    r = str(exc)\n"
        "r"
    )
    lead = ScriptedModel([action("eval_and_complete", code)])
    with use_models({"Worker": worker_model(sleep=30), "Shouter": failing}):
        result = await legion.run(Lead, "go", model=lead, runtime=runtime)
    assert result.output.startswith("parallel: call 1 (Shouter) failed with MaxRetriesReached")
    assert result.output.endswith("the other calls were cancelled")


async def test_parallel_can_return_errors_in_place(runtime: legion.SandboxRuntime) -> None:
    code = "SubAgents.parallel([['Shouter', 'hi'], ['Shouter', 'x']], return_errors=True)"
    answers = iter([action("return", result="HI!"), *["not an action"] * 10])
    shouter = ScriptedModel(lambda messages: next(answers))
    lead = ScriptedModel([action("eval_and_complete", code)])
    with use_models({"Shouter": shouter}):
        result = await legion.run(Lead, "go", model=lead, runtime=runtime)
    first, second = result.output
    assert first == "HI!"
    assert second["error"]["type"] == "MaxRetriesReached"


async def test_cancelling_the_parent_removes_the_children(runtime: legion.SandboxRuntime) -> None:
    events: list[legion.telemetry.Event] = []
    lead = ScriptedModel(
        [action("eval_and_complete", 'SubAgents.parallel([["Worker", "a"], ["Worker", "b"]])')]
    )
    unsubscribe = legion.telemetry.subscribe(events.append)
    try:
        with use_models({"Worker": worker_model(sleep=60)}):
            parent = asyncio.create_task(legion.run(Lead, "go", model=lead, runtime=runtime))
            await wait_until(lambda: len(Checkin.seen) == 2, 60, "two workers")
            containers = await child_containers(runtime, events)
            parent.cancel()
            with pytest.raises(asyncio.CancelledError):
                await parent
    finally:
        unsubscribe()
    assert len(containers) == 2
    client = docker.from_env()
    for container in containers:
        assert not await container_exists(client, container)


async def test_a_pipeline_passes_each_answer_to_the_next_step(
    runtime: legion.SandboxRuntime,
) -> None:
    code = (
        "SubAgents.pipeline([\n"
        "    ['Shouter', 'hello'],\n"
        "    ['Shouter', lambda previous: previous.lower() + ' again'],\n"
        "    ['Shouter', 'and'],\n"
        "])"
    )
    lead = ScriptedModel([action("eval_and_complete", code)])
    with use_models({"Shouter": shouter_model()}):
        result = await legion.run(Lead, "go", model=lead, runtime=runtime)
    # step 2 got a function of step 1's answer; step 3 got its task with step 2's answer
    assert result.output == "AND\n\nTHE PREVIOUS STEP'S ANSWER:\n'HELLO! AGAIN!'!"


async def test_a_bad_pipeline_step_fails_in_the_code_with_a_clear_error(
    runtime: legion.SandboxRuntime,
) -> None:
    code = (
        "try:\n    r = SubAgents.pipeline([['Shouter', lambda p: 42]])\n"
        "except TypeError as exc:\n    r = str(exc)\nr"
    )
    lead = ScriptedModel([action("eval_and_complete", code)])
    result = await legion.run(Lead, "go", model=lead, runtime=runtime)
    assert result.output == "pipeline step 0: the task must be a string, not int"
