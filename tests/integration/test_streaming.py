"""Streamed replies in a real run (real Docker, litellm against a
FakeOpenAIServer on loopback): each model request's ``llm.delta`` events
arrive in order, before its ``llm.request.stop``, and add up to the reply;
the run's result, steps and conversation are what they are when the server
cannot stream and the model is asked plainly."""

from __future__ import annotations

from typing import Any

import pytest

import legion
from legion import telemetry
from legion.testing import FakeOpenAIServer, Reply, action

pytestmark = pytest.mark.docker

STEPS = [
    action("eval_and_continue", "total = sum(range(10))\nprint('total is', total)"),
    action("eval_and_complete", "{'total': total, 'twice': total * 2}"),
]


class Summer(legion.Agent):
    """Adds numbers up with Python."""

    config = {"max_iterations": 3, "max_retries": 1}


async def run_with(
    server: FakeOpenAIServer, runtime: legion.SandboxRuntime
) -> tuple[legion.RunResult, list[telemetry.Event]]:
    seen: list[telemetry.Event] = []
    unsubscribe = telemetry.subscribe(seen.append)
    try:
        result = await legion.run(
            Summer,
            "Add the numbers below 10, then double it.",
            runtime=runtime,
            model="openai/fake-model",
            api_base=server.url,
            api_key="sk-test",
        )
    finally:
        unsubscribe()
    return result, [e for e in seen if e.run_id == result.run_id]


def requests(events: list[telemetry.Event]) -> list[list[telemetry.Event]]:
    """The run's model requests: each one's events from start to stop."""
    found: list[list[telemetry.Event]] = []
    current: list[telemetry.Event] | None = None
    for event in events:
        if event.name == telemetry.LLM_REQUEST_START:
            current = []
            found.append(current)
        if current is not None:
            current.append(event)
        if event.name == telemetry.LLM_REQUEST_STOP:
            current = None
    return found


async def test_deltas_stream_in_order_before_the_stop_and_add_up_to_each_reply(
    runtime: legion.SandboxRuntime,
) -> None:
    script = [Reply(content=step, chunk_delay=0.1) for step in STEPS]
    async with FakeOpenAIServer(script) as server:
        result, events = await run_with(server, runtime)
    assert result.output == {"total": 45, "twice": 90}
    assert result.iterations == 1
    assert [r["stream"] for r in server.requests] == [True, True]

    made = requests(events)
    assert len(made) == 2
    for step, request in zip(STEPS, made, strict=True):
        names = [e.name for e in request]
        assert names[0] == telemetry.LLM_REQUEST_START
        assert names[-1] == telemetry.LLM_REQUEST_STOP
        deltas = request[1:-1]
        assert deltas and all(e.name == telemetry.LLM_DELTA for e in deltas), names
        assert "".join(e.data["text"] for e in deltas) == step == request[-1].data["reply"]
        times = [e.time for e in request]
        assert times == sorted(times)
    # The code ran after its reply was complete.
    names = [e.name for e in events]
    last_delta = len(names) - 1 - names[::-1].index(telemetry.LLM_DELTA)
    assert names.index(telemetry.SANDBOX_EVAL_START) > names.index(telemetry.LLM_REQUEST_STOP)
    assert names.index(telemetry.SANDBOX_EVAL_STOP) < last_delta  # step 2 streamed after


async def test_a_server_that_cannot_stream_gives_the_same_run(
    runtime: legion.SandboxRuntime,
) -> None:
    async with FakeOpenAIServer([Reply(content=s, chunk_delay=0.05) for s in STEPS]) as server:
        streamed, streamed_events = await run_with(server, runtime)
    async with FakeOpenAIServer(STEPS, streaming=False) as plain_server:
        plain, plain_events = await run_with(plain_server, runtime)

    def shape(result: legion.RunResult) -> tuple[Any, ...]:
        return result.output, result.iterations, result.messages, result.usage.requests

    assert shape(plain) == shape(streamed)
    # Refused once, then asked plainly for the rest of the run: no deltas.
    assert [r.get("stream") for r in plain_server.requests] == [True, None, None]
    assert not [e for e in plain_events if e.name == telemetry.LLM_DELTA]
    assert [e for e in streamed_events if e.name == telemetry.LLM_DELTA]
    replies = [
        [e.data["reply"] for e in events if e.name == telemetry.LLM_REQUEST_STOP]
        for events in (streamed_events, plain_events)
    ]
    assert replies == [STEPS, STEPS]
