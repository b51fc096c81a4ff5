"""What a trace is built from: with a subscriber, run, model, code and tool
events carry the prompt, the reply, the output and value, the tool calls'
arguments and results and the answer, each cut to a bounded excerpt; and the
caller's vault, which tools read on the host, appears in none of them."""

from __future__ import annotations

import json

import pytest

import legion
from legion import telemetry
from legion.testing import ScriptedModel, action

pytestmark = pytest.mark.docker

SECRET = "s3cr3t-vault-value"


class Vaulted(legion.Tool):
    """The caller's secret, read on the host; only its length leaves."""

    def length(self, plus: int = 0) -> int:
        return len(legion.vault.require("secret")) + plus


class Tracer(legion.Agent):
    """Runs code with a tool that reads the vault."""

    tools = [Vaulted]
    config = {"max_iterations": 3, "max_retries": 1}


async def test_events_carry_what_a_trace_shows_cut_and_never_the_vault(
    runtime: legion.SandboxRuntime,
) -> None:
    long = "y" * (telemetry.EXCERPT_CHARS + 1000)
    model = ScriptedModel(
        [
            action("eval_and_continue", f"print({long!r})\nVaulted.length(plus=1)"),
            action("eval_and_complete", "{'done': True}"),
        ]
    )
    seen: list[telemetry.Event] = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        result = await legion.run(
            Tracer, "trace me", model=model, runtime=runtime, vault={"secret": SECRET}
        )
    finally:
        unsubscribe()
    assert result.output == {"done": True}

    def named(name: str) -> list[telemetry.Event]:
        return [e for e in seen if e.name == name and e.run_id == result.run_id]

    first, second = named("llm.request.stop")
    assert first.data["prompt"] == "trace me"
    assert first.data["reply"].startswith('{"action": "eval_and_continue"')
    assert first.data["reply"].endswith("more characters cut ...]")  # it held the long text
    assert str(len(SECRET) + 1) in second.data["prompt"]  # the step's value, fed back

    step = named("sandbox.eval.stop")[0]
    assert step.data["stdout"].startswith("y" * 100)
    assert step.data["stdout"].endswith("more characters cut ...]")
    assert len(step.data["stdout"]) < telemetry.EXCERPT_CHARS + 100
    assert step.data["value"] == str(len(SECRET) + 1) and step.data["stderr"] == ""

    (start,) = named("tool.call.start")
    (stop,) = named("tool.call.stop")
    assert (start.data["args"], start.data["kwargs"]) == ("[]", '{"plus": 1}')
    assert start.data["call_id"] and stop.data["call_id"] == start.data["call_id"]
    assert stop.data["result"] == str(len(SECRET) + 1)

    (done,) = named("run.stop")
    assert json.loads(done.data["output"]) == {"done": True}

    for event in seen:
        assert SECRET not in json.dumps(dict(event.data), default=str), event.name
