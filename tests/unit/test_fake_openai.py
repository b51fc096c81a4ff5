"""FakeOpenAIServer, driven through the real litellm client (and raw HTTP for
the routes litellm never calls). No Docker, no network, no key."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from types import ModuleType
from typing import Any

import pytest

from legion.testing._fake_openai import FakeOpenAIServer, Reply

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def litellm() -> ModuleType:
    # Imported here, not at the top: litellm is slow to import and must not
    # fetch its cost map from the network.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True  # no "Give Feedback" banner on each error
    return litellm


async def ask(litellm: ModuleType, server: FakeOpenAIServer, **options: Any) -> Any:
    options.setdefault("messages", MESSAGES)
    options.setdefault("num_retries", 0)
    return await litellm.acompletion(
        model="openai/fake-model", api_base=server.url, api_key="sk-test", **options
    )


def http(
    method: str, url: str, body: bytes | None = None, timeout: float = 5
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


async def test_content_and_usage_come_back(litellm: ModuleType) -> None:
    script = [Reply(content="Paris.", prompt_tokens=11, completion_tokens=3), "Still Paris."]
    async with FakeOpenAIServer(script) as server:
        explicit = await ask(litellm, server)
        estimated = await ask(litellm, server)

    assert explicit.choices[0].message.content == "Paris."
    assert explicit.choices[0].finish_reason == "stop"
    assert explicit.model.endswith("fake-model")
    usage = explicit.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 3, 14)
    # Defaults: message text length // 4 and content length // 4.
    assert estimated.usage.prompt_tokens == len(MESSAGES[0]["content"]) // 4
    assert estimated.usage.completion_tokens == len("Still Paris.") // 4


async def test_list_script_is_consumed_in_order_and_requests_are_recorded(
    litellm: ModuleType,
) -> None:
    async with FakeOpenAIServer(["one", Reply(content="two"), "three"]) as server:
        assert server.remaining == 3
        answers = []
        for n in range(3):
            messages = [{"role": "user", "content": f"question {n}"}]
            response = await ask(litellm, server, messages=messages, temperature=0.5)
            answers.append(response.choices[0].message.content)
        assert server.remaining == 0

    assert answers == ["one", "two", "three"]
    assert [r["messages"] for r in server.requests] == [
        [{"role": "user", "content": f"question {n}"}] for n in range(3)
    ]
    assert all(r["model"] == "fake-model" and r["temperature"] == 0.5 for r in server.requests)


async def test_callable_script_sees_the_messages_and_may_keep_state(
    litellm: ModuleType,
) -> None:
    seen: list[list[dict[str, Any]]] = []

    def respond(messages: list[dict[str, Any]]) -> Reply | str:
        seen.append(messages)
        if len(seen) == 1:
            return f"echo {len(seen)}: {messages[-1]['content']}"
        return Reply(content=f"echo {len(seen)}: {messages[-1]['content']}", completion_tokens=9)

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ping"},
    ]
    async with FakeOpenAIServer(respond) as server:
        assert server.remaining is None
        first = await ask(litellm, server, messages=conversation)
        second = await ask(litellm, server, messages=[{"role": "user", "content": "pong"}])

    assert first.choices[0].message.content == "echo 1: ping"
    assert second.choices[0].message.content == "echo 2: pong"
    assert second.usage.completion_tokens == 9
    assert seen[0] == conversation


async def test_429_with_retry_after_raises_rate_limit_error(litellm: ModuleType) -> None:
    script = [Reply(status=429, retry_after=1.5, error_message="slow down"), "never sent"]
    async with FakeOpenAIServer(script) as server:
        with pytest.raises(litellm.RateLimitError, match="slow down") as caught:
            await ask(litellm, server)

    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1.5"
    assert len(server.requests) == 1 and server.remaining == 1  # num_retries=0: no retry


async def test_retry_after_is_honoured_when_the_client_retries(litellm: ModuleType) -> None:
    # The class docstring's example.
    async with FakeOpenAIServer([Reply(status=429, retry_after=0.1), "Paris"]) as server:
        answer = await ask(litellm, server, num_retries=1)

    assert answer.choices[0].message.content == "Paris"
    assert len(server.requests) == 2 and server.remaining == 0


async def test_500_raises_an_exception_litellm_maps(litellm: ModuleType) -> None:
    async with FakeOpenAIServer([Reply(status=500, error_message="the model fell over")]) as s:
        with pytest.raises((litellm.InternalServerError, litellm.APIError)) as caught:
            await ask(litellm, s)

    assert caught.value.status_code == 500
    assert "the model fell over" in str(caught.value)


async def test_exhausted_script_answers_a_clear_error(litellm: ModuleType) -> None:
    async with FakeOpenAIServer(["only one"]) as server:
        await ask(litellm, server)
        with pytest.raises(litellm.InternalServerError) as caught:
            await asyncio.wait_for(ask(litellm, server), timeout=5)

    assert "script exhausted after 1 replies" in str(caught.value)
    assert len(server.requests) == 2


async def test_streaming_yields_the_whole_content(litellm: ModuleType) -> None:
    content = "The capital of France is Paris, on the Seine."
    async with FakeOpenAIServer([Reply(content=content, completion_tokens=7)]) as server:
        stream = await ask(litellm, server, stream=True, stream_options={"include_usage": True})
        pieces: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = getattr(chunk, "usage", None) or usage

    assert "".join(pieces) == content
    assert len(pieces) > 1  # really split into several deltas
    assert usage is not None and usage.completion_tokens == 7
    assert server.requests[0]["stream"] is True


async def test_a_slow_answer_times_the_client_out_and_stop_does_not_wait(
    litellm: ModuleType,
) -> None:
    server = FakeOpenAIServer([Reply(content="too late", delay=2)]).start()
    try:
        started = time.monotonic()
        with pytest.raises(litellm.Timeout):
            await ask(litellm, server, timeout=0.5)
        assert time.monotonic() - started < 1.5
    finally:
        started = time.monotonic()
        await asyncio.to_thread(server.stop)
        stopping = time.monotonic() - started

    assert stopping < 1  # the handler still sleeping on `delay` is not waited for
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "body", [b"this is not json", b'{"choices": [{"message": {"content": "trunc']
)
async def test_a_garbage_body_gives_an_error_not_a_hang(litellm: ModuleType, body: bytes) -> None:
    async with FakeOpenAIServer([Reply(raw_body=body)]) as server:
        # litellm reports the client-side JSON failure as a 500 of its own.
        with pytest.raises(litellm.InternalServerError, match="OpenAIException"):
            await asyncio.wait_for(ask(litellm, server), timeout=5)
    assert len(server.requests) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com", ""])
def test_a_host_that_is_not_loopback_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FakeOpenAIServer(["hi"], host=host)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "::1"])
def test_loopback_hosts_are_served(host: str) -> None:
    with FakeOpenAIServer(["hi"], host=host) as server:
        status, body = http(
            "POST",
            f"{server.url}/chat/completions",
            json.dumps({"model": "m", "messages": []}).encode(),
        )
    assert status == 200 and body["choices"][0]["message"]["content"] == "hi"


def test_sync_code_can_use_it_too(litellm: ModuleType) -> None:
    with FakeOpenAIServer(["from sync code"]) as server:
        response = litellm.completion(
            model="openai/fake-model",
            api_base=server.url,
            api_key="sk-test",
            messages=MESSAGES,
            num_retries=0,
        )
    assert response.choices[0].message.content == "from sync code"


def test_raw_http_routes_and_error_bodies(capfd: pytest.CaptureFixture[str]) -> None:
    request = json.dumps({"model": "gpt-x", "messages": MESSAGES}).encode()
    with FakeOpenAIServer(["bare path"], model="my-model") as server:
        base = server.url.removesuffix("/v1")
        models = http("GET", f"{server.url}/models")
        bare = http("POST", f"{base}/chat/completions", request)
        missing = http("POST", f"{server.url}/completions", request)
        malformed = http("POST", f"{server.url}/chat/completions", b"{not json")
        exhausted = http("POST", f"{server.url}/chat/completions", request)

    assert models == (200, {"object": "list", "data": [models[1]["data"][0]]})
    assert models[1]["data"][0]["id"] == "my-model"
    status, body = bare
    assert status == 200 and body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-fake-") and body["model"] == "gpt-x"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "bare path"}
    assert missing[0] == 404 and missing[1]["error"]["type"] == "invalid_request_error"
    assert malformed[0] == 400 and malformed[1]["error"]["type"] == "invalid_request_error"
    assert set(malformed[1]["error"]) >= {"message", "type", "code"}
    assert exhausted[0] == 500 and exhausted[1]["error"]["type"] == "server_error"
    assert len(server.requests) == 2  # the malformed body was never a request
    assert capfd.readouterr().err == ""  # no per-request log lines


def test_lifecycle_errors_are_clear() -> None:
    server = FakeOpenAIServer(["hi"])
    with pytest.raises(RuntimeError, match="after start"):
        _ = server.url
    server.start()
    with pytest.raises(RuntimeError, match="started once"):
        server.start()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        http("GET", f"{server.url}/models", timeout=1)
    with pytest.raises(TypeError, match="list of replies"):
        FakeOpenAIServer("hi")
    with pytest.raises(ValueError, match="status"):
        Reply(status=42)
