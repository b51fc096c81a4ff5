"""`legion serve` as a subprocess on loopback, used through `legion.Client`:
runs with their events and results, principals kept apart, human requests
answered remotely, limits, a client that goes away mid-run, and every
refusal with its status and the matching legion exception."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import legion
from legion._proto import controller_pb2 as pb
from legion.client import RemoteEvent

from .conftest import Served
from .support import Beacon, next_event, wait_for_condition

pytestmark = pytest.mark.docker

SLEEP = "#code import time\ntime.sleep(60)"


async def test_a_run_streams_its_events_and_ends_with_the_result(
    alice: legion.Client, served: Served
) -> None:
    """Acceptance 1: a scripted agent whose code calls a host tool; the tool
    sees the vault of the caller's token, never anything from the request."""
    streamed: list[legion.telemetry.Event] = []
    async with alice.events() as events:
        result = await alice.run("Coder", "#code Profile.user()", on_event=streamed.append)
        published: list[RemoteEvent] = []
        await next_event(
            events, lambda e: e.name == "run.stop" and e.run_id == result.run_id, seen=published
        )
    assert isinstance(result, legion.RunResult)
    assert result.output == "alice"
    assert result.iterations == 0
    assert result.usage.requests == 1 and result.usage.total_tokens > 0
    assert [m["role"] for m in result.messages] == ["system", "user", "assistant"]
    names = [e.name for e in streamed]
    for expected in (
        "run.start",
        "llm.request.start",
        "llm.request.stop",
        "iteration.start",
        "sandbox.eval.start",
        "tool.call.start",
        "tool.call.stop",
        "run.stop",
    ):
        assert expected in names, names
    assert names[0] == "run.start" and names[-1] == "run.stop"
    assert {e.run_id for e in streamed} == {result.run_id}
    call = next(e for e in streamed if e.name == "tool.call.start")
    assert (call.data["tool"], call.data["function"]) == ("Profile", "user")
    assert streamed[0].data["agent"] == "Coder"
    # The Events stream carried the same events, in the same order.
    assert [e.name for e in published if e.run_id == result.run_id] == names
    assert not await asyncio.to_thread(served.server.containers), "the run's sandbox is left"


async def test_list_agents(alice: legion.Client) -> None:
    agents = {a.name: a for a in await alice.list_agents()}
    assert sorted(agents) == ["Coder", "Counter", "Echo", "Editor", "Keeper"]
    assert agents["Coder"].description == (
        "Runs Python, with the caller's profile and a person at hand."
    )
    assert agents["Coder"].tools == ["Profile.user", "Human.ask"]
    assert agents["Counter"].output_schema == {"type": "integer", "minimum": 0}
    assert agents["Echo"].output_schema is None and agents["Echo"].tools == []


async def test_json_answers_come_back_as_data(alice: legion.Client) -> None:
    assert (await alice.run("Counter", "#json 7")).output == 7
    assert (await alice.run("Echo", '#json {"a": [1, null]}')).output == {"a": [1, None]}


async def test_a_failed_run_raises_what_an_embedded_run_would(alice: legion.Client) -> None:
    with pytest.raises(legion.MaxIterationsReached) as stopped:
        await alice.run("Coder", "#loop")
    assert stopped.value.iterations == 2 and stopped.value.usage.requests == 2
    assert len(stopped.value.run_id) == 32 and stopped.value.messages[0]["role"] == "system"
    assert "Coder" in str(stopped.value)

    with pytest.raises(legion.MaxRetriesReached, match="2 failed steps in a row") as retried:
        await alice.run("Echo", "#babble")
    assert retried.value.usage.requests == 2 and retried.value.run_id

    with pytest.raises(legion.ModelError, match="this model refuses") as refused:
        await alice.run("Echo", "#refuse")
    assert refused.value.run_id and refused.value.messages[-1]["role"] == "user"

    with pytest.raises(legion.MaxRetriesReached):  # a schema violation, no retries left
        await alice.run("Counter", "#json -1", max_retries=0)


async def test_no_token_or_an_unknown_one_is_unauthenticated(served: Served) -> None:
    for token in (None, "not-a-token", served.tokens.alice + "x"):
        async with legion.Client(served.address, token=token) as client:
            with pytest.raises(legion.Unauthenticated) as refused:
                await client.list_agents()
            assert refused.value.code == "UNAUTHENTICATED"
            with pytest.raises(legion.Unauthenticated):
                await client.run("Echo", "hello")
            with pytest.raises(legion.Unauthenticated):
                await client.events().open()
    metadata = (("authorization", f"Basic {served.tokens.alice}"),)
    async with grpc.aio.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as basic:
            await channel.unary_unary("/legion.controller.v1.Controller/ListAgents")(
                b"", metadata=metadata
            )
    assert basic.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (basic.value.details() or "")


async def test_health_needs_no_token_and_reflection_lists_the_service(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "legion.controller.v1.Controller"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        auth = (("authorization", f"Bearer {served.tokens.alice}"),)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answers = [a async for a in reflect.ServerReflectionInfo(iter([request]), metadata=auth)]
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"legion.controller.v1.Controller", "grpc.health.v1.Health"} <= names
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            # No request is sent: a client still writing when the server refuses
            # a stream-stream call can see its own failed write (INTERNAL) instead
            # of the server's status.
            _ = [a async for a in reflect.ServerReflectionInfo(iter([]))]
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_requests_get_their_status_and_the_server_stays_up(
    alice: legion.Client, served: Served
) -> None:
    with pytest.raises(legion.NotFound, match=r"no agent named 'Nobody'.*Coder, Counter, Echo"):
        await alice.run("Nobody", "hello")
    with pytest.raises(legion.UsageError, match="task must be a non-empty string"):
        await alice.run("Echo", "   ")
    with pytest.raises(legion.UsageError, match="did you mean 'max_iterations'"):
        await alice.run("Echo", "hello", max_iteration=3)
    with pytest.raises(legion.UsageError, match="max_iterations must be a whole number"):
        await alice.run("Echo", "hello", max_iterations=0)
    with pytest.raises(legion.UsageError, match="'api_base' is the server's to set"):
        await alice.run("Echo", "hello", api_base="http://127.0.0.1:1/v1")
    with pytest.raises(legion.UsageError, match="'conversation' is for long-lived agents"):
        await alice.run("Echo", "hello", binding_scope="conversation")
    for config_json, problem in (("{", "not valid JSON"), ("[1]", "must be a JSON object")):
        request = pb.RunRequest(agent="Echo", task="hi", config_json=config_json)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            _ = [u async for u in alice.stub.Run(request, metadata=alice.metadata)]
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (bad.value.details() or "")
    with pytest.raises(legion.ResourceExhausted) as huge:
        await alice.run("Echo", "x" * (5 * 1024 * 1024))
    assert huge.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(legion.NotFound, match="no long-lived agent"):
        await alice.call("no-such-conversation", "hi")
    with pytest.raises(legion.UsageError, match="ref is empty"):
        await alice.respond_human("", "yes")
    # Still serving, and nothing above left a run behind.
    assert (await alice.run("Echo", "still here")).output == "still here"
    assert served.server.process.poll() is None


async def test_principals_see_only_their_own_runs_events_and_questions(
    alice: legion.Client, bob: legion.Client
) -> None:
    async with alice.events() as alices, bob.events(name_prefixes=["human."]) as bobs_humans:
        asking = asyncio.create_task(bob.run("Coder", "#code Human.ask('Ship it?')"))
        question = await next_event(bobs_humans, lambda e: e.name == "human.request")
        assert question.data["question"] == "Ship it?" and question.data["agent"] == "Coder"
        ref, bobs_run = question.data["ref"], question.run_id
        assert bobs_run is not None

        # alice can neither answer bob's question, nor watch his run, nor see his sandbox.
        with pytest.raises(legion.PermissionDenied, match="another principal"):
            await alice.respond_human(ref, "no")
        with pytest.raises(legion.PermissionDenied, match="another principal"):
            await alice.events(run_ids=[bobs_run]).open()
        with pytest.raises(legion.NotFound):
            await alice.respond_human("0" * 32, "no")
        assert await alice.list_sandboxes() == []
        (sandbox,) = await bob.list_sandboxes()
        assert sandbox.run_id == bobs_run and sandbox.agent == "Coder"
        assert sandbox.age_seconds >= 0 and sandbox.memory_bytes > 0

        await bob.respond_human(ref, "yes")
        result = await asyncio.wait_for(asking, 60)
        assert result.output == "yes" and result.run_id == bobs_run
        with pytest.raises(legion.NotFound, match="no human request"):
            await bob.respond_human(ref, "again")

        # alice's own run shows on her stream; none of bob's events ever did.
        mine = await alice.run("Echo", "mine")
        seen: list[RemoteEvent] = []
        await next_event(
            alices, lambda e: e.name == "run.stop" and e.run_id == mine.run_id, seen=seen
        )
    assert {e.run_id for e in seen} == {mine.run_id}


async def test_events_filters_by_run_and_name(alice: legion.Client) -> None:
    first = await alice.run("Echo", "first")
    async with (
        alice.events(run_ids=[first.run_id]) as old_run,
        alice.events(name_prefixes=["run.stop", "llm.request.stop"]) as stops,
    ):
        second = await alice.run("Echo", "second")
        seen: list[RemoteEvent] = []
        await next_event(stops, lambda e: e.name == "run.stop", seen=seen)
        assert [e.name for e in seen] == ["llm.request.stop", "run.stop"]
        assert {e.run_id for e in seen} == {second.run_id}
        # Nothing of the second run reaches a stream watching only the first.
        with pytest.raises(TimeoutError):
            await next_event(old_run, lambda e: True, timeout=0.5)


async def test_concurrent_runs_are_limited_per_principal(
    served: Served, alice: legion.Client
) -> None:
    async with legion.Client(served.address, token=served.tokens.carol) as carol:
        beacon = Beacon("sandbox.eval.start")
        first = asyncio.create_task(carol.run("Coder", SLEEP, on_event=beacon))
        await asyncio.wait_for(beacon.reached.wait(), 60)
        with pytest.raises(legion.ResourceExhausted, match="max_concurrent_runs=1"):
            await carol.run("Echo", "one more")
        # Other principals are not held back by carol's limit.
        assert (await alice.run("Echo", "meanwhile")).output == "meanwhile"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        # Once the cancelled run has ended, carol may run again.
        await wait_for_condition(lambda: not served.server.containers(), 30, "the sandbox to go")
        for _ in range(50):
            try:
                assert (await carol.run("Echo", "again")).output == "again"
                break
            except legion.ResourceExhausted:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("carol's cancelled run still counted against her limit")


async def test_a_client_that_goes_away_gets_its_run_cancelled_and_sandbox_removed(
    served: Served, alice: legion.Client
) -> None:
    async with (
        legion.Client(served.address, token=served.tokens.alice) as leaving,
        alice.events(name_prefixes=["run."]) as runs,
    ):
        beacon = Beacon("sandbox.eval.start")
        running = asyncio.create_task(leaving.run("Coder", SLEEP, on_event=beacon))
        await asyncio.wait_for(beacon.reached.wait(), 60)
        assert len(await asyncio.to_thread(served.server.containers)) == 1
        await leaving.close()  # the connection goes, mid-run
        with pytest.raises((asyncio.CancelledError, legion.RemoteError)):
            await running
        ended = await next_event(
            runs, lambda e: e.run_id == beacon.run_id and e.name != "run.start"
        )
    assert ended.name == "run.exception" and "CancelledError" in ended.data["error"]
    await wait_for_condition(
        lambda: not served.server.containers(), 30, "the cancelled run's container to go"
    )
    assert (await alice.run("Echo", "still serving")).output == "still serving"


def test_the_sync_client_has_the_same_methods(served: Served) -> None:
    with legion.SyncClient(served.address, token=served.tokens.bob) as client:
        names = [a.name for a in client.list_agents()]
        assert names == ["Coder", "Counter", "Echo", "Editor", "Keeper"]
        events = client.events(name_prefixes=["run."])
        names: list[str] = []
        result = client.run("Echo", "in sync", on_event=lambda e: names.append(e.name))
        assert result.output == "in sync" and names[0] == "run.start" and names[-1] == "run.stop"
        assert [next(events).name, next(events).name] == ["run.start", "run.stop"]
        events.close()
        with pytest.raises(legion.NotFound):
            client.run("Nobody", "x")
        with pytest.raises(legion.MaxIterationsReached):
            client.run("Coder", "#loop", max_iterations=1)
