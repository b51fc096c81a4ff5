"""Streamed replies through `legion serve` (a real subprocess): a run's
``llm.delta`` events reach ``Client.run(on_event=...)`` while the model's
reply is still coming, in order, before the request's ``llm.request.stop``,
adding up to its reply; `legion run` (remote, and embedded) shows the reply
growing on one line of stderr. The model is a FakeOpenAIServer of this test that sends each
reply in four pieces, a fixed delay apart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import legion
from legion import telemetry
from legion.testing import FakeOpenAIServer, Reply, action

from .conftest import (
    ServerProcess,
    Tokens,
    legion_cli,
    script,
    server_env,
    start_server,
    stop_cleanly,
    write_token_file,
)

pytestmark = pytest.mark.docker

PIECE_DELAY = 0.2


def streamed_slowly(chunk_delay: float) -> Callable[[list[dict[str, Any]]], Reply]:
    """The shared fake model's answers (tests/server/conftest.py), each reply's
    pieces ``chunk_delay`` seconds apart."""

    def answer(messages: list[dict[str, Any]]) -> Reply:
        reply = script(messages)
        content = reply if isinstance(reply, str) else reply.content
        return Reply(content=content, chunk_delay=chunk_delay)

    return answer


@pytest.fixture(scope="module")
def slow_model() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(streamed_slowly(PIECE_DELAY)) as server:
        yield server


@pytest.fixture(scope="module")
def streaming_server(
    docker_ready: None,
    slow_model: FakeOpenAIServer,
    tokens: Tokens,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    where = tmp_path_factory.mktemp("streaming")
    server = start_server(
        ["--listen", "127.0.0.1:0", "--tokens", str(write_token_file(where, tokens))],
        server_env(slow_model),
        where,
    )
    try:
        yield server
    finally:
        stop_cleanly(server)


async def test_deltas_reach_client_run_as_the_reply_streams(
    streaming_server: ServerProcess, tokens: Tokens
) -> None:
    arrived: list[tuple[float, telemetry.Event]] = []

    def on_event(event: telemetry.Event) -> None:
        arrived.append((time.monotonic(), event))

    async with legion.Client(streaming_server.address, token=tokens.alice) as client:
        result = await client.run("Echo", '#json {"streamed": [1, 2, 3]}', on_event=on_event)
    assert result.output == {"streamed": [1, 2, 3]}
    events = [event for _, event in arrived]
    names = [e.name for e in events]
    start, stop = names.index(telemetry.LLM_REQUEST_START), names.index(telemetry.LLM_REQUEST_STOP)
    deltas = [e for e in events if e.name == telemetry.LLM_DELTA]
    assert deltas and names[start + 1 : stop] == [telemetry.LLM_DELTA] * len(deltas)
    reply = action("return", result={"streamed": [1, 2, 3]})
    assert "".join(e.data["text"] for e in deltas) == reply == events[stop].data["reply"]
    assert {e.run_id for e in deltas} == {result.run_id}
    assert {e.data["attempt"] for e in deltas} == {1}
    # While the reply streamed: the first delta came a piece or more before the
    # stop (a first request may read its first pieces together: litellm warms up).
    first_delta = next(when for when, e in arrived if e.name == telemetry.LLM_DELTA)
    stopped = next(when for when, e in arrived if e.name == telemetry.LLM_REQUEST_STOP)
    assert stopped - first_delta >= PIECE_DELAY * 0.75, stopped - first_delta


@pytest.mark.parametrize("where", ["remote", "embedded"])
def test_legion_run_shows_the_reply_growing_on_stderr(
    streaming_server: ServerProcess, slow_model: FakeOpenAIServer, tokens: Tokens, where: str
) -> None:
    env = server_env(slow_model, LEGION_SERVER_TOKEN=tokens.alice)
    if where == "remote":
        args = ["Echo", "#json 7", "--remote", streaming_server.address]
    else:
        args = ["tests.server.agents:Echo", "#json 7"]
    done = legion_cli("run", *args, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "7"
    lines = done.stderr.splitlines()
    asked = next(i for i, line in enumerate(lines) if line.startswith("  asking the model"))
    assert lines[asked + 1] == f"    > {action('return', result=7)}"
    assert lines[asked + 2].startswith("  the model answered in ")
