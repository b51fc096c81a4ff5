"""A fake OpenAI-compatible chat-completions server, for tests that must go
through a real client (litellm, the openai SDK) without a key or a network.

It answers from a script, records every request, and can misbehave on demand:
error statuses, ``Retry-After``, slow answers, garbage bodies. Standard library
only; it runs in a daemon thread, so sync and async tests use it alike.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeAlias
from urllib.parse import urlsplit

__all__ = ["FakeOpenAIServer", "Reply", "Script"]


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted answer to a chat-completions request.

    With the defaults it is a successful answer carrying ``content``. A
    ``status`` other than 200 sends an OpenAI-style error body instead;
    ``raw_body`` replaces the whole body with bytes sent as they are.
    """

    content: str = ""
    """The assistant message text."""
    status: int = 200
    """HTTP status. Not 200: an error body ``{"error": {...}}`` with ``error_message``."""
    error_message: str = ""
    """The message in the error body; empty means the status's reason phrase."""
    retry_after: float | None = None
    """Seconds to send in a ``Retry-After`` header (with a 429, say); None sends none."""
    delay: float = 0.0
    """Seconds to wait before answering, to make a client time out."""
    chunk_delay: float = 0.0
    """Streamed answers only: seconds to wait before each piece of ``content``,
    so a client sees the text arrive over time (or times out halfway)."""
    prompt_tokens: int | None = None
    """Usage figure; None estimates it from the request (message text length // 4, at least 1)."""
    completion_tokens: int | None = None
    """Usage figure; None estimates it from ``content`` (length // 4, at least 1)."""
    raw_body: bytes | None = None
    """If set, sent as-is with ``status`` in place of any JSON (truncated or garbage bodies)."""

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"Reply.status must be an HTTP status (100-599), got {self.status}")
        if self.delay < 0:
            raise ValueError(f"Reply.delay must be >= 0 seconds, got {self.delay}")
        if self.chunk_delay < 0:
            raise ValueError(f"Reply.chunk_delay must be >= 0 seconds, got {self.chunk_delay}")


Script: TypeAlias = Sequence[Reply | str] | Callable[[list[dict[str, Any]]], Reply | str]
"""Replies in order (a ``str`` means ``Reply(content=...)``), or a function of
the request's ``messages`` that returns the reply."""

_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    429: "rate_limit_exceeded",
}
_CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
_MODELS_PATHS = frozenset({"/v1/models", "/models"})
_STREAM_PIECES = 4
_NO_STREAMING = (
    'FakeOpenAIServer(streaming=False) does not stream: send the request without "stream": true'
)


class FakeOpenAIServer:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint on loopback.

    A list script answers one reply per request, in order, and answers HTTP
    500 ("script exhausted") once used up. A callable script is called with
    each request's ``messages`` (one call at a time, so it may keep state).
    Requests with ``"stream": true`` get Server-Sent Events: the content in
    four pieces (:attr:`Reply.chunk_delay` apart), then usage when
    ``stream_options.include_usage`` asks for it. With ``streaming=False`` the
    server is one that cannot stream: such a request is refused with HTTP 400
    (it is recorded, and uses no reply of the script). ``GET /v1/models``
    lists ``model``. The port is chosen by the OS; ``url`` is the base URL to
    give a client once started. Use it as a context manager, sync or async:

        import litellm
        from legion.testing import FakeOpenAIServer, Reply

        async def test_agent_survives_a_rate_limit():
            script = [Reply(status=429, retry_after=0.1), "Paris"]
            async with FakeOpenAIServer(script) as server:
                answer = await litellm.acompletion(
                    model="openai/fake-model", api_base=server.url, api_key="sk-test",
                    messages=[{"role": "user", "content": "Capital of France?"}],
                    num_retries=1,
                )
            assert answer.choices[0].message.content == "Paris"
            assert len(server.requests) == 2 and server.remaining == 0
    """

    def __init__(
        self,
        script: Script,
        *,
        model: str = "fake-model",
        host: str = "127.0.0.1",
        streaming: bool = True,
    ) -> None:
        self.model = model
        self.streaming = streaming
        """False: requests with ``"stream": true`` are refused (HTTP 400)."""
        self.requests: list[dict[str, Any]] = []
        """Every chat-completions request body received, in order."""
        self._host, self._family = _loopback(host)
        self._replies: list[Reply | str] | None
        self._respond: Callable[[list[dict[str, Any]]], Reply | str] | None
        if callable(script):
            self._replies, self._respond = None, script
        elif isinstance(script, str | bytes):
            raise TypeError("script is a single string; pass a list of replies, e.g. [text]")
        else:
            self._replies, self._respond = list(script), None
            for item in self._replies:
                if not isinstance(item, Reply | str):
                    raise TypeError(f"script items must be Reply or str, got {item!r}")
        self._used = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, ``http://127.0.0.1:<port>/v1``; pass it as ``api_base``."""
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer.url is only known after start()")
        port = self._httpd.server_address[1]
        host = f"[{self._host}]" if self._family == socket.AF_INET6 else self._host
        return f"http://{host}:{port}/v1"

    @property
    def remaining(self) -> int | None:
        """Replies left in a list script; None for a callable script."""
        with self._lock:
            return None if self._replies is None else len(self._replies) - self._used

    def start(self) -> FakeOpenAIServer:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._httpd is not None or self._stopping.is_set():
            raise RuntimeError("a FakeOpenAIServer can be started once")
        httpd = _HTTPServer((self._host, 0), _Handler, family=self._family, fake=self)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeOpenAIServer:{httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port. Idempotent; a delayed answer in
        flight is dropped (its connection closed) rather than waited for."""
        self._stopping.set()
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None or not thread.is_alive():
            if httpd is not None:
                httpd.server_close()
            return
        httpd.shutdown()
        httpd.server_close()
        thread.join()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> FakeOpenAIServer:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # shutdown() waits for the serving loop's next poll; keep the event loop free.
        await asyncio.to_thread(self.stop)

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        # One request at a time through the script, so list order and a
        # stateful callable's state follow the order requests arrived in.
        with self._lock:
            self.requests.append(body)
            if self._respond is not None:
                try:
                    reply = self._respond(body["messages"])
                except Exception as exc:
                    return Reply(
                        status=500, error_message=f"FakeOpenAIServer: script raised {exc!r}"
                    )
                if not isinstance(reply, Reply | str):
                    return Reply(
                        status=500,
                        error_message=f"FakeOpenAIServer: script returned {reply!r}, "
                        "not a Reply or str",
                    )
            else:
                assert self._replies is not None
                if self._used >= len(self._replies):
                    return Reply(
                        status=500,
                        error_message="FakeOpenAIServer: script exhausted after "
                        f"{len(self._replies)} replies",
                    )
                reply = self._replies[self._used]
                self._used += 1
        return Reply(content=reply) if isinstance(reply, str) else reply


def _loopback(host: str) -> tuple[str, socket.AddressFamily]:
    if host == "localhost":
        return "127.0.0.1", socket.AF_INET
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"FakeOpenAIServer binds to loopback only; {host!r} is not a loopback "
            "address (use 127.0.0.1, ::1 or localhost)"
        )
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return str(address), family


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping on Reply.delay must not hold up exit
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        family: socket.AddressFamily,
        fake: FakeOpenAIServer,
    ) -> None:
        self.address_family = family
        self.fake = fake
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, stop()) is routine here, not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no keep-alive connection
    # outlives stop() and streams end by closing.
    protocol_version = "HTTP/1.0"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self._path() in _MODELS_PATHS:
            model = {"id": self.server.fake.model, "object": "model", "created": 0}
            self._send_json(200, {"object": "list", "data": [{**model, "owned_by": "legion"}]})
        else:
            self._not_found()

    def do_POST(self) -> None:
        if self._path() not in _CHAT_PATHS:
            self._not_found()
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send_error(411, "FakeOpenAIServer: a request body needs a Content-Length")
            return
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self._send_error(400, f"We could not parse the JSON body of your request: {exc}")
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._send_error(400, "The request body must be a JSON object with a 'messages' list")
            return
        fake = self.server.fake
        if body.get("stream") is True and not fake.streaming:
            with fake._lock:
                fake.requests.append(body)
            self._send_error(400, _NO_STREAMING)
            return
        reply = fake._next_reply(body)
        if reply.delay and fake._stopping.wait(reply.delay):
            self.close_connection = True  # stopped while waiting: drop the answer
            return
        if reply.raw_body is not None:
            self._send(reply.status, reply.raw_body, "application/json", reply.retry_after)
        elif reply.status != 200:
            self._send_error(reply.status, reply.error_message, reply.retry_after)
        elif body.get("stream") is True:
            self._send_stream(body, reply)
        else:
            self._send_json(200, _completion(body, reply, fake), reply.retry_after)

    def do_PUT(self) -> None:
        self._not_found()

    do_PATCH = do_DELETE = do_HEAD = do_PUT

    def _path(self) -> str:
        return urlsplit(self.path).path.rstrip("/") or "/"

    def _not_found(self) -> None:
        self._send_error(404, f"FakeOpenAIServer: no route for {self.command} {self._path()}")

    def _send_error(self, status: int, message: str, retry_after: float | None = None) -> None:
        if status == 429:
            kind = "rate_limit_error"
        elif status >= 500:
            kind = "server_error"
        else:
            kind = "invalid_request_error"
        error = {
            "message": message or HTTPStatus(status).phrase,
            "type": kind,
            "param": None,
            "code": _ERROR_CODES.get(status),
        }
        self._send_json(status, {"error": error}, retry_after)

    def _send_json(self, status: int, payload: Any, retry_after: float | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", retry_after)

    def _send(
        self, status: int, body: bytes, content_type: str, retry_after: float | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", format(retry_after, "g"))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_stream(self, body: dict[str, Any], reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        fake = self.server.fake
        for chunk in _chunks(body, reply, fake):
            if reply.chunk_delay and _has_content(chunk) and fake._stopping.wait(reply.chunk_delay):
                self.close_connection = True  # stopped while streaming: cut the stream
                return
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _completion(body: dict[str, Any], reply: Reply, fake: FakeOpenAIServer) -> dict[str, Any]:
    message = {"role": "assistant", "content": reply.content}
    return {
        **_envelope(body, fake, "chat.completion"),
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _usage(body, reply),
    }


def _chunks(body: dict[str, Any], reply: Reply, fake: FakeOpenAIServer) -> Iterator[dict[str, Any]]:
    envelope = _envelope(body, fake, "chat.completion.chunk")

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {**envelope, "choices": [choice]}

    yield chunk({"role": "assistant", "content": ""})
    text = reply.content
    size = max(1, -(-len(text) // _STREAM_PIECES))
    for start in range(0, len(text), size):
        yield chunk({"content": text[start : start + size]})
    yield chunk({}, "stop")
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        yield {**envelope, "choices": [], "usage": _usage(body, reply)}


def _has_content(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def _envelope(body: dict[str, Any], fake: FakeOpenAIServer, kind: str) -> dict[str, Any]:
    model = body.get("model")
    return {
        "id": f"chatcmpl-fake-{next(fake._ids)}",
        "object": kind,
        "created": int(time.time()),
        "model": model if isinstance(model, str) and model else fake.model,
    }


def _usage(body: dict[str, Any], reply: Reply) -> dict[str, int]:
    prompt = reply.prompt_tokens
    if prompt is None:
        prompt = max(1, len(_message_text(body["messages"])) // 4)
    completion = reply.completion_tokens
    if completion is None:
        completion = max(1, len(reply.content) // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _message_text(messages: list[Any]) -> str:
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
    return "".join(parts)
