"""The dashboard's trace shows a model reply growing as its ``llm.delta``
events come: each one patches the open model call's entry, a retried
request's reply starts over, the stop event's excerpt has the last word, and
what is shown stays bounded."""

from __future__ import annotations

import itertools
from typing import Any

from legion import telemetry
from legion.client import RemoteEvent
from legion.dashboard import state as live
from legion.dashboard.state import LiveState, Patch

_clock = itertools.count(1_000_000)


def event(name: str, **data: Any) -> RemoteEvent:
    return RemoteEvent(name, "r", None, float(next(_clock)), data)


def replies(patches: list[Patch]) -> list[str]:
    """The reply of the model call's trace entry, as each patch showed it."""
    return [
        item.fields.get("reply", "")
        for patch in patches
        if patch.list_name == "trace"
        for item in patch.items
        if item.template == "llm"
    ]


def test_the_reply_grows_then_the_stop_event_settles_it() -> None:
    state = LiveState("alice")
    state.apply(event(telemetry.RUN_START, agent="Solver", task="6 * 7?"))
    state.apply(event(telemetry.LLM_REQUEST_START, model="m", prompt="6 * 7?"))
    shown: list[str] = []
    for piece in ('{"action": ', '"return", ', '"result": 42}'):
        shown += replies(state.apply(event(telemetry.LLM_DELTA, text=piece, attempt=1)))
    assert shown == ['{"action": ', '{"action": "return", ', '{"action": "return", "result": 42}']
    stop = event(telemetry.LLM_REQUEST_STOP, reply='{"action": "return", "result": 42}')
    assert replies(state.apply(stop)) == ['{"action": "return", "result": 42}']
    # A delta after the call ended has no open entry to grow.
    assert replies(state.apply(event(telemetry.LLM_DELTA, text="late", attempt=1))) == []


def test_a_retried_request_starts_over_and_what_is_shown_is_bounded() -> None:
    state = LiveState("alice")
    state.apply(event(telemetry.RUN_START, agent="Solver", task="t"))
    state.apply(event(telemetry.LLM_REQUEST_START, model="m", prompt="t"))
    state.apply(event(telemetry.LLM_DELTA, text='{"action": "ret', attempt=1))
    assert replies(state.apply(event(telemetry.LLM_DELTA, text="{", attempt=2))) == ["{"]
    state.apply(event(telemetry.LLM_DELTA, text="x" * live.TEXT, attempt=2))
    assert replies(state.apply(event(telemetry.LLM_DELTA, text="more", attempt=2))) == []
    run = state.runs["r"]
    assert len(run.trace[run.open_llm].fields["reply"]) < live.TEXT + 100
