"""Usage and budgets through a real `legion serve`: a run's tool calls and
sandbox seconds reach the client, and a run stopped by a budget raises
``legion.UsageLimitExceeded`` there with the budget it spent, whose it was
and what was counted, as an embedded run would."""

from __future__ import annotations

import pytest

import legion

from .conftest import Served

pytestmark = pytest.mark.docker

TICKS = "#code for _ in range(10):\n    Profile.user()\n'never'"


async def test_a_runs_tool_calls_and_sandbox_seconds_reach_the_client(
    bob: legion.Client,
) -> None:
    result = await bob.run("Coder", "#code [Profile.user(), Profile.user()]")
    assert result.output == ["bob", "bob"]
    assert result.usage.tool_calls == 2
    assert 0 < result.usage.sandbox_seconds < 60
    assert result.usage.requests == 1


async def test_a_run_over_max_tool_calls_raises_usage_limit_exceeded_with_its_figures(
    bob: legion.Client,
) -> None:
    with pytest.raises(legion.UsageLimitExceeded) as caught:
        await bob.run("Coder", TICKS, max_tool_calls=3)
    exc = caught.value
    assert "max_tool_calls=3 is spent" in str(exc)
    assert (exc.limit, exc.allowed, exc.used, exc.scope) == ("max_tool_calls", 3, 4, "run of Coder")
    assert exc.usage.tool_calls == 3 and exc.usage.requests == 1
    assert exc.usage.sandbox_seconds > 0 and exc.run_id
    assert isinstance(exc.counted, legion.Usage) and exc.counted.tool_calls == 3
    assert exc.messages and exc.messages[0]["role"] == "system"


def test_the_sync_client_raises_it_too(served: Served) -> None:
    with (
        legion.SyncClient(served.address, token=served.tokens.alice) as client,
        pytest.raises(legion.UsageLimitExceeded) as caught,
    ):
        client.run("Coder", TICKS, max_tool_calls=1)
    assert (caught.value.limit, caught.value.allowed, caught.value.used) == ("max_tool_calls", 1, 2)
    assert caught.value.usage.tool_calls == 1 and caught.value.counted.tool_calls == 1
