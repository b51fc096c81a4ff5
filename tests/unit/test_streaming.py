"""Streamed model replies through the real litellm client and a
FakeOpenAIServer on loopback: ``llm.delta`` events carry the text as it
arrives, in order and before the request's stop event, and add up to the
reply; a server that cannot stream is asked again plainly; nobody listening
means no streaming at all; a streamed reply is bounded by the model timeout as
a whole. No Docker, no network, no key."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import legion
from legion import telemetry
from legion.models import LiteLLMModel, ModelReply
from legion.models import _stream as stream_module
from legion.testing import FakeOpenAIServer, Reply, action

MESSAGES = [{"role": "user", "content": "What is six times seven?"}]
REPLY = action("eval_and_complete", "result = 6 * 7\nresult")


@pytest.fixture
def events() -> Iterator[list[telemetry.Event]]:
    seen: list[telemetry.Event] = []
    unsubscribe = telemetry.subscribe(seen.append)
    yield seen
    unsubscribe()


def model(server: FakeOpenAIServer, **options: float) -> LiteLLMModel:
    options = {"timeout": 10.0, "retries": 0, "backoff": 0.01, **options}
    return LiteLLMModel(
        "openai/fake-model",
        api_base=server.url,
        api_key="sk-test",
        timeout=options["timeout"],
        retries=int(options["retries"]),
        backoff=options["backoff"],
    )


async def ask(llm: LiteLLMModel) -> ModelReply:
    """One request inside an ``llm.request`` span, as a run makes it."""
    with telemetry.span(telemetry.LLM_REQUEST, model=llm.name) as stop:
        reply = await llm.complete(MESSAGES)
        stop["reply"] = telemetry.excerpt(reply.content)
    return reply


def deltas(events: list[telemetry.Event]) -> list[telemetry.Event]:
    return [e for e in events if e.name == telemetry.LLM_DELTA]


async def test_deltas_arrive_in_order_before_the_stop_and_add_up_to_the_reply(
    events: list[telemetry.Event],
) -> None:
    async with FakeOpenAIServer([Reply(content=REPLY, chunk_delay=0.2)]) as server:
        reply = await ask(model(server))
    assert reply.content == REPLY
    assert server.requests[0]["stream"] is True
    streamed = deltas(events)
    texts = [e.data["text"] for e in streamed]
    assert "".join(texts) == REPLY
    assert {e.data["attempt"] for e in streamed} == {1}
    names = [e.name for e in events]
    assert names == [
        telemetry.LLM_REQUEST_START,
        *[telemetry.LLM_DELTA] * len(streamed),
        telemetry.LLM_REQUEST_STOP,
    ]
    assert events[-1].data["reply"] == REPLY
    # As it arrives: the server's four pieces came 0.2 s apart, so the deltas
    # are spread out too (pieces a busy client read together go out together).
    piece = -(-len(REPLY) // 4)
    assert len(streamed) >= 2 and all(text for text in texts), texts
    assert all(len("".join(texts[: i + 1])) % piece == 0 for i in range(len(texts) - 1)), texts
    assert streamed[-1].time - streamed[0].time >= 0.2
    assert reply.usage.requests == 1 and reply.usage.completion_tokens > 0


async def test_a_server_that_cannot_stream_is_asked_plainly_and_not_asked_to_stream_again(
    events: list[telemetry.Event],
) -> None:
    async with FakeOpenAIServer([REPLY, action("return", result=42)], streaming=False) as server:
        first = await ask(model(server))
        second = await ask(model(server))
    assert (first.content, second.content) == (REPLY, action("return", result=42))
    assert [r.get("stream") for r in server.requests] == [True, None, None]
    assert deltas(events) == []
    stops = [e for e in events if e.name == telemetry.LLM_REQUEST_STOP]
    assert [e.data["reply"] for e in stops] == [first.content, second.content]
    assert first.usage.requests == 1 and first.usage.total_tokens > 0


async def test_nobody_listening_means_a_plain_request() -> None:
    assert not telemetry.active()
    async with FakeOpenAIServer([REPLY]) as server:
        reply = await model(server).complete(MESSAGES)
    assert reply.content == REPLY
    assert "stream" not in server.requests[0]


async def test_stream_false_never_streams(events: list[telemetry.Event]) -> None:
    async with FakeOpenAIServer([REPLY]) as server:
        llm = LiteLLMModel("openai/fake-model", api_base=server.url, api_key="k", stream=False)
        assert (await ask(llm)).content == REPLY
    assert "stream" not in server.requests[0]
    assert deltas(events) == []


async def test_a_streamed_reply_is_bounded_by_the_timeout_as_a_whole(
    events: list[telemetry.Event],
) -> None:
    """Each piece comes well within the timeout; the whole reply does not."""
    slow = Reply(content=REPLY, chunk_delay=0.3)
    async with FakeOpenAIServer([slow, slow]) as server:
        started = time.monotonic()
        with pytest.raises(legion.ModelError) as failed:
            await ask(model(server, timeout=0.5, retries=1))
        took = time.monotonic() - started
    assert "failed after 2 attempts" in str(failed.value)
    assert "TimeoutError: no complete reply within 0.5 s" in str(failed.value)
    assert took < 2 * 1.2, took  # two attempts cut at 0.5 s, not two whole 1.2 s replies
    assert events[-1].name == telemetry.LLM_REQUEST_EXCEPTION
    # The cut attempts' text did arrive, each marked with its attempt.
    assert {e.data["attempt"] for e in deltas(events)} == {1, 2}


async def test_a_retried_request_streams_again_as_the_next_attempt(
    events: list[telemetry.Event],
) -> None:
    script = [Reply(content='{"action": "ret', chunk_delay=0.4), Reply(content=REPLY)]
    async with FakeOpenAIServer(script) as server:
        reply = await ask(model(server, timeout=0.6, retries=1))
    assert reply.content == REPLY
    second = [e.data["text"] for e in deltas(events) if e.data["attempt"] == 2]
    assert "".join(second) == REPLY
    assert all(e.data["attempt"] == 1 for e in deltas(events)[: -len(second)])


async def test_a_long_reply_streams_its_excerpt_and_the_cut_marker(
    events: list[telemetry.Event],
) -> None:
    long = action("return", result="x" * (telemetry.EXCERPT_CHARS + 500))
    async with FakeOpenAIServer([long]) as server:
        reply = await ask(model(server))
    assert reply.content == long
    text = "".join(e.data["text"] for e in deltas(events))
    assert text == telemetry.excerpt(long) == events[-1].data["reply"]
    cut = len(long) - telemetry.EXCERPT_CHARS
    assert text.endswith(f"[... {cut} more characters cut ...]")


def test_pieces_closer_than_the_interval_go_out_together(
    events: list[telemetry.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(stream_module.time, "monotonic", lambda: now[0])
    feed = stream_module.DeltaFeed(3, limit=10)
    feed.add("ab")  # the first piece goes at once
    feed.add("cd")
    now[0] += stream_module.DELTA_INTERVAL / 2
    feed.add("")
    feed.add("ef")
    now[0] += stream_module.DELTA_INTERVAL
    feed.add("ghijkl")  # over the limit: "ghij" is kept, the rest counted
    feed.add("mn")
    feed.close()
    sent = [(e.data["text"], e.data["attempt"]) for e in deltas(events)]
    assert sent == [("ab", 3), ("cdefghij", 3), (telemetry.cut_marker(4), 3)]


@pytest.mark.parametrize(
    "fault",
    [Reply(status=429, error_message="slow down", retry_after=0.01), Reply(status=500)],
    ids=["429", "500"],
)
async def test_a_refused_streamed_request_is_retried_as_before(
    events: list[telemetry.Event], fault: Reply
) -> None:
    async with FakeOpenAIServer([fault, REPLY]) as server:
        reply = await ask(model(server, retries=1))
    assert reply.content == REPLY
    assert [r["stream"] for r in server.requests] == [True, True]
    assert {e.data["attempt"] for e in deltas(events)} == {2}
    assert "".join(e.data["text"] for e in deltas(events)) == REPLY


async def test_a_bad_request_is_an_error_either_way_and_streaming_stays_on(
    events: list[telemetry.Event],
) -> None:
    """A 400 that the plain request gets too was not about streaming."""
    refusal = Reply(status=400, error_message="this model refuses the request")
    async with FakeOpenAIServer([refusal, refusal, REPLY]) as server:
        with pytest.raises(legion.ModelError, match="refused the request: BadRequestError"):
            await ask(model(server))
        assert (await ask(model(server))).content == REPLY
    assert [r.get("stream") for r in server.requests] == [True, None, True]
