"""A Node.js program drives a real `legion serve` over gRPC: it lists the
agents, runs one (its events stream back), lists the live sandboxes while the
run's human request waits, answers that request, and is refused with a wrong
token. Only the model is fake: an OpenAI-compatible server on loopback that
runs the code a task gives after ``#code``."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from .conftest import HERE, Served

pytestmark = pytest.mark.docker

QUESTION = "Ship order A-1 to the new address?"
ANSWER = "yes, ship it"
# The sandbox code: ask a person (the call blocks until answered), then
# return the answer with who is calling (the vault of alice's token).
TASK = (
    f"#code answer = Human.ask({QUESTION!r}, meta={{'order': 'A-1'}})\n"
    "{'user': Profile.user(), 'approved': answer}"
)


def node_client(node: str, served: Served, *args: str) -> dict[str, Any]:
    """Run client.mjs against ``served`` as alice; its JSON summary."""
    done = subprocess.run(
        [node, "client.mjs", "--address", served.address, *args],
        check=False,
        cwd=HERE,
        env={**os.environ, "LEGION_SERVER_TOKEN": served.tokens.alice},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def test_node_client_lists_runs_and_answers_a_human(node: str, served: Served) -> None:
    summary = node_client(node, served, "--agent", "Coder", "--task", TASK, "--answer", ANSWER)

    agents = {agent["name"]: agent for agent in summary["agents"]}
    assert set(agents) == {"Echo", "Coder", "Counter", "Keeper", "Editor"}
    assert agents["Coder"]["tools"] == ["Profile.user", "Human.ask"]
    assert agents["Coder"]["description"].startswith("Runs Python")
    assert agents["Counter"]["output_schema"] == {"type": "integer", "minimum": 0}
    assert agents["Echo"]["output_schema"] is None

    assert summary["unauthenticated"] == "UNAUTHENTICATED"

    run = summary["run"]
    assert run.get("error") is None, run
    result = run["result"]
    # The person's answer reached the sandbox code, which returned it.
    assert result["output"] == {"user": "alice", "approved": ANSWER}
    assert result["usage"]["requests"] == 1
    names = [event["name"] for event in run["events"]]
    for expected in ("run.start", "llm.request.stop", "tool.call.start", "human.request"):
        assert expected in names, names
    assert names.index("human.request") < names.index("run.stop")
    assert {event["run_id"] for event in run["events"]} == {result["run_id"]}

    human = summary["human"]
    assert human is not None, "no human.request arrived on Events"
    assert human["question"] == QUESTION
    assert human["agent"] == "Coder"
    assert human["meta"] == {"order": "A-1"}
    assert human["run_id"] == result["run_id"]
    assert human["answer"] == ANSWER
    # While the question waited, the run's sandbox was live and measured.
    (sandbox,) = human["sandboxes_while_waiting"]
    assert sandbox["run_id"] == result["run_id"] and sandbox["agent"] == "Coder"
    assert sandbox["memory_bytes"] > 2**20


def test_node_client_sees_the_reply_stream_in(node: str, served: Served) -> None:
    """Streaming replies: a Node program gets each model request's
    ``llm.delta`` events on the Run stream, before the request's stop, and
    they add up to the reply."""
    task = '#json {"from": "node", "n": [1, 2, 3]}'
    summary = node_client(node, served, "--agent", "Echo", "--task", task)
    assert summary["run"]["result"]["output"] == {"from": "node", "n": [1, 2, 3]}
    (request,) = summary["streaming"]
    reply = '{"action": "return", "result": {"from": "node", "n": [1, 2, 3]}}'
    assert request["deltas"] and request["streamed"] == reply == request["reply"]
    assert set(request["attempts"]) == {1}
