"""FakeOpenAIServer's streaming modes, over raw HTTP: pieces spaced by
``Reply.chunk_delay``, and ``streaming=False``, a server that refuses to
stream (HTTP 400, recorded, no reply of the script used)."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from legion.testing import FakeOpenAIServer, Reply

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def post(server: FakeOpenAIServer, body: dict[str, Any]) -> http.client.HTTPResponse:
    where = urlsplit(server.url)
    assert where.hostname is not None
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.request(
        "POST", f"{where.path}/chat/completions", json.dumps(body), {"Content-Type": "a/json"}
    )
    return connection.getresponse()


def test_pieces_come_chunk_delay_apart() -> None:
    with FakeOpenAIServer([Reply(content="abcdefgh", chunk_delay=0.15)]) as server:
        response = post(server, BODY)
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        arrived: list[tuple[float, str]] = []
        for line in response:
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    arrived.append((time.monotonic(), delta["content"]))
    assert [text for _, text in arrived] == ["ab", "cd", "ef", "gh"]
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(arrived)]
    assert all(gap >= 0.1 for gap in gaps), gaps


def test_a_server_that_cannot_stream_refuses_with_400_and_keeps_its_reply() -> None:
    with FakeOpenAIServer(["the only reply"], streaming=False) as server:
        refused = post(server, BODY)
        error = json.loads(refused.read())["error"]
        answered = post(server, {**BODY, "stream": False})
        content = json.loads(answered.read())["choices"][0]["message"]["content"]
        assert server.remaining == 0
    assert refused.status == 400
    assert error["type"] == "invalid_request_error"
    assert "does not stream" in error["message"]
    assert content == "the only reply"
    assert [r["stream"] for r in server.requests] == [True, False]


def test_stop_cuts_a_stream_that_is_still_coming() -> None:
    server = FakeOpenAIServer([Reply(content="abcdefgh", chunk_delay=5)]).start()
    response = post(server, BODY)
    threading.Timer(0.3, server.stop).start()
    started = time.monotonic()
    received = response.read()
    assert time.monotonic() - started < 3
    assert b"[DONE]" not in received


def test_chunk_delay_is_checked() -> None:
    with pytest.raises(ValueError, match="chunk_delay must be >= 0"):
        Reply(chunk_delay=-1)
