"""Long-lived agents through the controller: StartAgent / Call / Cast /
StopAgent, kept apart by principal, and a conversation (history and
variables) that survives a restart of `legion serve` through its SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

import legion
from legion.testing import FakeOpenAIServer

from .conftest import Served, server_env, start_server, stop_cleanly
from .support import next_event

pytestmark = pytest.mark.docker


async def test_calls_keep_history_and_variables(alice: legion.Client) -> None:
    cid = await alice.start("Keeper")
    try:
        first = await alice.call(cid, "#code total = 40\ntotal")
        streamed: list[legion.telemetry.Event] = []
        second = await alice.call(cid, "#code total + 2", on_event=streamed.append)
    finally:
        await alice.stop(cid)
    assert (first.output, second.output) == (40, 42)
    # the second turn's conversation holds the first turn
    users = [m["content"] for m in second.messages if m["role"] == "user"]
    assert users == ["#code total = 40\ntotal", "#code total + 2"]
    turn = next(e for e in streamed if e.name == "turn.start")
    assert turn.data["conversation_id"] == cid
    assert {e.run_id for e in streamed} == {second.run_id}


async def test_cast_result_arrives_on_events_in_order(alice: legion.Client) -> None:
    cid = await alice.start("Echo")
    try:
        async with alice.events(conversation_id=cid, name_prefixes=["turn."]) as events:
            first = await alice.cast(cid, '#json "one"')
            second = await alice.cast(cid, '#json "two"')
            results = []
            while len(results) < 2:
                event = await next_event(events, lambda e: e.name == "turn.result")
                results.append((event.data["turn_id"], event.data["output"]))
    finally:
        await alice.stop(cid)
    assert results == [(first, "one"), (second, "two")]


async def test_a_conversation_is_its_principals_only(
    alice: legion.Client, bob: legion.Client
) -> None:
    cid = await alice.start("Echo")
    try:
        with pytest.raises(legion.PermissionDenied, match="another principal"):
            await bob.call(cid, "hello")
        with pytest.raises(legion.PermissionDenied):
            await bob.start("Echo", conversation_id=cid)
        with pytest.raises(legion.PermissionDenied):
            await bob.stop(cid)
        assert (await alice.call(cid, "still mine")).output == "still mine"
    finally:
        await alice.stop(cid)
    with pytest.raises(legion.NotFound, match="resume it with StartAgent"):
        await alice.call(cid, "after stop")
    with pytest.raises(legion.PermissionDenied):  # stored, and still alice's
        await bob.start("Echo", conversation_id=cid)


async def test_bad_requests_get_clear_errors(alice: legion.Client) -> None:
    with pytest.raises(legion.NotFound, match="no conversation"):
        await alice.start("Echo", conversation_id="nope")
    with pytest.raises(legion.NotFound, match="no long-lived agent"):
        await alice.cast("nope", "hi")
    with pytest.raises(legion.NotFound, match="no agent named"):
        await alice.start("Ghost")
    cid = await alice.start("Echo")
    try:
        with pytest.raises(legion.UsageError, match="non-empty"):
            await alice.call(cid, "   ")
        with pytest.raises(legion.ConversationError, match="with agent 'Echo', not 'Keeper'"):
            await alice.start("Keeper", conversation_id=cid)  # it is Echo's conversation
    finally:
        await alice.stop(cid)


async def test_a_conversation_survives_a_server_restart(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Acceptance 4 of the long-lived agents issue: history and variables
    come back from the SQLite store in a new `legion serve` process."""
    store = tmp_path / "conversations.sqlite3"
    args = ["--listen", "127.0.0.1:0", "--store", str(store), "--pool-size", "0"]
    env = server_env(fake_model)

    first = start_server(args, env, tmp_path)
    try:
        async with legion.Client(first.address) as client:
            cid = await client.start("Keeper")
            assert (await client.call(cid, "#code total = 40\ntotal")).output == 40
    finally:
        stop_cleanly(first)  # SIGTERM: no container left

    second = start_server(args, env, tmp_path)
    try:
        async with legion.Client(second.address) as client:
            assert await client.start("Keeper", conversation_id=cid) == cid
            again = await client.call(cid, "#code total + 2")
            await client.stop(cid)
    finally:
        stop_cleanly(second)
    assert again.output == 42
    users = [m["content"] for m in again.messages if m["role"] == "user"]
    assert users == ["#code total = 40\ntotal", "#code total + 2"]


def test_the_sync_client_has_the_same_shapes(served: Served) -> None:
    with legion.SyncClient(served.address, token=served.tokens.alice) as client:
        cid = client.start("Echo")
        assert client.call(cid, "hi").output == "hi"
        client.stop(cid)
