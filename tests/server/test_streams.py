"""Event routing inside the service: filters (sub-agent runs included) and
the bound on what a slow client's stream may hold."""

from __future__ import annotations

import logging

import pytest

import legion
from legion import _api_codec as codec
from legion._proto import controller_pb2 as pb
from legion.server import service


def event(name: str, run_id: str, parent: str = "", conversation: str = "") -> pb.Event:
    return pb.Event(name=name, run_id=run_id, parent_run_id=parent, conversation_id=conversation)


def test_a_run_filter_follows_the_runs_it_starts() -> None:
    watching = service._Subscriber("alice", {"top"}, "", ())
    assert watching.wants(event("run.start", "top"))
    assert not watching.wants(event("run.start", "elsewhere"))
    assert watching.wants(event("run.start", "child", parent="top"))  # a sub-agent's run
    assert watching.wants(event("run.start", "grandchild", parent="child"))
    assert not watching.wants(event("run.start", "stranger", parent="elsewhere"))


def test_name_and_conversation_filters() -> None:
    names = service._Subscriber("alice", set(), "", ("human.", "run.stop"))
    assert names.wants(event("human.request", "r")) and names.wants(event("run.stop", "r"))
    assert not names.wants(event("run.start", "r"))
    turns = service._Subscriber("alice", set(), "c1", ())
    assert turns.wants(event("run.start", "r", conversation="c1"))
    assert not turns.wants(event("run.start", "r"))


def test_a_slow_clients_stream_drops_events_rather_than_grow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow = service._Subscriber("alice", set(), "", ())
    with caplog.at_level(logging.WARNING, logger="legion.server"):
        for i in range(service.EVENT_BUFFER + 25):
            service._offer(slow.queue, event("tool.call.start", str(i)), slow, "test stream")
    assert slow.queue.qsize() == service.EVENT_BUFFER and slow.dropped == 25
    assert slow.queue.get_nowait().run_id == "0"  # the oldest are kept, in order
    warnings = [r for r in caplog.records if "events_dropped" in r.getMessage()]
    assert len(warnings) == 1, "one warning per overflow, not one per event"


def test_event_data_is_json_and_never_unbounded() -> None:
    assert codec.data_json({"usage": legion.Usage(1, 2, 3, None, 1), "n": 1}) == (
        '{"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, '
        '"cost_usd": null, "requests": 1, "tool_calls": 0, "sandbox_seconds": 0.0}, "n": 1}'
    )
    assert codec.data_json({"thing": object()}).startswith('{"thing": "<object object at')
    clipped = codec.data_json({"code": "x" * (codec.MAX_EVENT_DATA + 1), "index": 3})
    assert len(clipped) < 2 * codec.CLIPPED_VALUE
    assert '"truncated": true' in clipped and '"index": 3' in clipped
