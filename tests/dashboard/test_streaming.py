"""Streaming replies in a real browser: the trace of a run, opened while the
model's reply still streams in, shows the reply growing (pushed by the
``llm.delta`` events, never reloaded) until the model call is done, and then
the whole reply. Its own `legion serve --dashboard`, whose fake model sends
each reply in four pieces a second apart."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import legion
from legion.testing import FakeOpenAIServer, action
from tests.server.test_streaming import streamed_slowly

from .conftest import (
    DASHBOARD_LINE,
    Served,
    Tokens,
    server_env,
    start_server,
    stop_cleanly,
    write_token_file,
)
from .test_dashboard import browse

pytestmark = pytest.mark.docker

RESULT = {"streamed": "into the trace, piece by piece", "pieces": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def slow_dashboard(
    docker_ready: None, tokens: Tokens, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    where = tmp_path_factory.mktemp("streaming-dashboard")
    with FakeOpenAIServer(streamed_slowly(1.0)) as model:
        server = start_server(
            [
                *("--listen", "127.0.0.1:0", "--dashboard", "127.0.0.1:0"),
                *("--tokens", str(write_token_file(where, tokens)), "--grace-seconds", "2"),
            ],
            server_env(model),
            where,
        )
        try:
            (url,) = [m.group(1) for line in server.stdout if (m := DASHBOARD_LINE.search(line))]
            yield Served(server, tokens, url)
        finally:
            stop_cleanly(server)


async def test_the_trace_shows_the_reply_growing(
    node: str, chromium: Path, slow_dashboard: Served
) -> None:
    async def start_run() -> legion.RunResult:
        async with legion.Client(slow_dashboard.address, token=slow_dashboard.tokens.alice) as c:
            return await c.run("Echo", f"#json {json.dumps(RESULT)}")

    summary, result = await browse(node, slow_dashboard, "streaming", start_run)
    assert result.output == RESULT
    assert summary["run_id"] == result.run_id
    reply = action("return", result=RESULT)
    assert summary["final"] == reply
    # Shown growing: more than one partial reply, each a prefix of the next.
    shown = [text for text in summary["replies"] if text]
    partial = [text for text in shown if text != reply]
    assert len(partial) >= 2, shown
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(shown)), shown
