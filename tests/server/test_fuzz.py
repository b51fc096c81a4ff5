"""Property-based fuzzing of the controller API from a hostile client.

hypothesis builds calls to every method of the Controller service: garbage
bytes or messages with arbitrary fields (unknown agents, bad JSON, huge
strings, refs and run ids that match nothing), under arbitrary metadata with
good, bad or no tokens. The real `legion serve` subprocess must answer each
with one of the documented statuses (never INTERNAL or UNKNOWN), and still
serve correctly afterwards; its log must hold no traceback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from legion._proto import controller_pb2 as pb

from .conftest import Served

pytestmark = pytest.mark.docker

SERVICE = "/legion.controller.v1.Controller/"
STREAMS = {"Run", "Call", "Events"}
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}

OVER_SIZE = 5 * 1024 * 1024
"""Bytes past the server's limit (4 MiB by default)."""
texts = st.text(max_size=100)
huge = st.integers(min_value=10_000, max_value=1_000_000).map(lambda n: "x" * n)
strings = st.one_of(texts, huge)
# Tasks that the fake model answers at once (no sandbox): none of its "#" commands.
tasks = st.one_of(texts, huge).filter(lambda t: not t.startswith("#"))
agents = st.one_of(
    st.just("Echo"), st.just("Counter"), st.sampled_from(["", "echo", "Echo\x00", "Coder "]), texts
)
json_ish = st.one_of(
    st.just(""),
    st.sampled_from(
        [
            "",
            "{}",
            "{",
            "[]",
            "null",
            '"x"',
            "1e999",
            '{"max_iterations": 1}',
            '{"max_iterations": -1}',
            '{"max_iterations": "many"}',
            '{"model": "openai/gpt-4o"}',
            '{"api_key": "sk-stolen"}',
            '{"sandbox_limits": {"memory_mb": 100000}}',
            '{"sandbox_timeout": NaN}',
            '{"temperature": 0.5}',
            '{"binding_scope": "conversation"}',
            "[" * 1000,
        ]
    ),
    texts,
)
ids = st.one_of(st.just(""), st.text(alphabet="0123456789abcdef", min_size=32, max_size=32), texts)


def _requests() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "ListAgents": st.just(pb.ListAgentsRequest()),
        "Run": st.builds(
            lambda agent, task, config: pb.RunRequest(agent=agent, task=task, config_json=config),
            agents,
            tasks,
            json_ish,
        ),
        "StartAgent": st.builds(
            lambda a, c, i: pb.StartAgentRequest(agent=a, config_json=c, conversation_id=i),
            agents,
            json_ish,
            ids,
        ),
        "Call": st.builds(lambda i, m: pb.CallRequest(conversation_id=i, message=m), ids, strings),
        "Cast": st.builds(lambda i, m: pb.CastRequest(conversation_id=i, message=m), ids, strings),
        "StopAgent": st.builds(lambda i: pb.StopAgentRequest(conversation_id=i), ids),
        "Events": st.builds(
            lambda r, c, p: pb.EventsRequest(run_ids=r, conversation_id=c, name_prefixes=p),
            st.lists(ids, max_size=5),
            ids,
            st.lists(texts, max_size=5),
        ),
        "RespondHuman": st.builds(
            lambda r, a: pb.RespondHumanRequest(ref=r, answer_json=a), ids, json_ish
        ),
        "RespondApproval": st.builds(
            lambda r, a, why: pb.RespondApprovalRequest(ref=r, approved=a, reason=why),
            ids,
            st.booleans(),
            strings,
        ),
        "ListSandboxes": st.just(pb.ListSandboxesRequest()),
    }


REQUESTS = _requests()


@st.composite
def calls(draw: st.DrawFn, method: str, alice: str) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """A request body for ``method`` and its metadata: mostly alice's token
    (to get past the door), else a bad, garbled or missing one."""
    shape = draw(st.integers(0, 19))
    if shape < 4:
        body = draw(st.binary(max_size=3000))  # whatever bytes
    elif shape == 4:
        body = draw(REQUESTS[method]).SerializeToString() + b"\0" * OVER_SIZE  # too big
    else:
        body = draw(REQUESTS[method]).SerializeToString()
    metadata: list[tuple[str, str]] = []
    if draw(st.integers(0, 3)):
        metadata.append(("authorization", f"Bearer {alice}"))
    else:
        bad = st.sampled_from(
            ["Bearer", f"Basic {alice}", f"Bearer {alice}x", f"bearer {alice}x", ""]
        ) | st.from_regex(r"[!-~][ -~]{0,58}[!-~]", fullmatch=True)
        if draw(st.booleans()):
            metadata.append(("authorization", draw(bad)))
    extra_keys = st.from_regex(r"x-[a-z0-9_.-]{1,20}", fullmatch=True)
    extra_values = st.from_regex(r"[!-~]{0,40}", fullmatch=True)
    metadata += draw(st.lists(st.tuples(extra_keys, extra_values), max_size=3))
    if draw(st.integers(0, 9)) == 0:
        metadata.append(("authorization", f"Bearer {alice}"))  # one more
    return body, tuple(metadata)


async def call(
    channel: grpc.aio.Channel, method: str, body: bytes, metadata: tuple[tuple[str, str], ...]
) -> grpc.StatusCode:
    """Make the call with raw bytes; its status (an open Events stream counts as OK)."""
    if method not in STREAMS:
        try:
            await channel.unary_unary(SERVICE + method)(body, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK
    stream = channel.unary_stream(SERVICE + method)(body, metadata=metadata, timeout=60)
    try:
        if method == "Events":
            await stream.initial_metadata()
            if not stream.done():  # subscribed: a live stream, as asked
                stream.cancel()
                return grpc.StatusCode.OK
        async for _ in _drain(stream):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    code: grpc.StatusCode = await stream.code()
    return code


async def _drain(stream: Any) -> AsyncIterator[bytes]:
    async for message in stream:
        yield message


async def still_serving(channel: grpc.aio.Channel, token: str) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    listed = await channel.unary_unary(
        SERVICE + "ListAgents", response_deserializer=pb.ListAgentsResponse.FromString
    )(b"", metadata=metadata, timeout=30)
    assert sorted(a.name for a in listed.agents) == ["Coder", "Counter", "Echo", "Editor", "Keeper"]
    request = pb.RunRequest(agent="Echo", task="still here").SerializeToString()
    updates = [
        pb.RunUpdate.FromString(u)
        async for u in _drain(
            channel.unary_stream(SERVICE + "Run")(request, metadata=metadata, timeout=60)
        )
    ]
    assert updates[-1].result.output_json == '"still here"', updates[-1]


@pytest.fixture(scope="module")
async def channel(served: Served) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(served.address, options=options) as channel:
        yield channel


@pytest.fixture(scope="module")
def alice_token(served: Served) -> str:
    return served.tokens.alice


def test_strategies_cover_every_method() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Controller"].methods}
    assert set(REQUESTS) == methods


@pytest.mark.parametrize("method", sorted(REQUESTS))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_any_call_gets_a_documented_status_and_the_server_keeps_serving(
    channel: grpc.aio.Channel, alice_token: str, served: Served, method: str, data: st.DataObject
) -> None:
    body, metadata = data.draw(calls(method, alice_token))
    code = await call(channel, method, body, metadata)
    event(f"{method}: {code.name}")
    assert code in DOCUMENTED, f"{method} answered {code}"
    assert served.server.process.poll() is None, "the server died"
    await still_serving(channel, alice_token)


def test_the_fuzzed_server_logged_no_traceback(served: Served) -> None:
    log = served.server.log()
    assert "Traceback" not in log and "run_failed" not in log, log[-5000:]
