"""Budgets without a sandbox: config and environment, the accounting of
:mod:`legion._budget`, and runs whose model alone spends the budget."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from pathlib import Path

import pytest

import legion
from legion._api_codec import error_message, run_error
from legion._budget import Budget, PrincipalBudget, day_of, next_reset
from legion.config import resolve_agent_config
from legion.models import ModelReply
from legion.server.auth import Principal, TokenTable
from legion.server.service import _only_lower
from legion.store import MemoryStore, SQLiteStore
from legion.testing import action


class PricedModel:
    """Replies from a script; every reply costs the same tokens and dollars."""

    def __init__(self, replies: Sequence[str], *, tokens: int = 30, cost: float | None = 0.25):
        self.name = "priced"
        self.replies = list(replies)
        self.tokens = tokens
        self.cost = cost
        self.requests = 0

    async def complete(self, messages: Sequence[dict[str, str]]) -> ModelReply:
        text = self.replies[min(self.requests, len(self.replies) - 1)]
        self.requests += 1
        usage = legion.Usage(self.tokens - 5, 5, self.tokens, self.cost, 1)
        return ModelReply(text, usage, self.name)


class Talker(legion.Agent):
    """Talks."""

    config = {"max_retries": 50}


BABBLE = "no action here"


# --- config -------------------------------------------------------------------------------


def test_budget_keys_come_from_the_environment() -> None:
    config = resolve_agent_config(
        {},
        {},
        environ={
            "LEGION_MAX_TOKENS": "1000",
            "LEGION_MAX_COST_USD": "0.5",
            "LEGION_MAX_TOOL_CALLS": "20",
            "LEGION_MAX_SANDBOX_SECONDS": "none",
        },
    )
    assert (config.max_tokens, config.max_cost_usd, config.max_tool_calls) == (1000, 0.5, 20)
    assert config.max_sandbox_seconds is None
    assert resolve_agent_config({"max_tokens": 5}, {}, environ={}).max_tokens == 5


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_tokens", -1), ("max_tokens", 1.5), ("max_tool_calls", True), ("max_cost_usd", "1")],
)
def test_bad_budgets_are_usage_errors(key: str, value: object) -> None:
    with pytest.raises(legion.UsageError, match=key):
        legion.AgentConfig(**{key: value})  # type: ignore[arg-type]


def test_bad_budget_in_the_environment_says_which_variable() -> None:
    with pytest.raises(legion.UsageError, match="LEGION_MAX_TOKENS"):
        resolve_agent_config({}, {}, environ={"LEGION_MAX_TOKENS": "lots"})


# --- accounting ---------------------------------------------------------------------------


def test_a_charge_counts_here_and_above_and_trips_the_budget_it_overspends() -> None:
    root = Budget({"max_tokens": 100}, scope="run of Editor")
    child = root.child({"max_tokens": 1000}, scope="run of Researcher")
    woken: list[str] = []
    stop = child.listen(lambda: woken.append("tripped"))
    assert child.charge(legion.Usage(total_tokens=60, requests=1)) is None
    exceeded = child.charge(legion.Usage(total_tokens=60, requests=1))
    assert exceeded is not None
    assert (exceeded.limit, exceeded.allowed, exceeded.used) == ("max_tokens", 100, 120)
    assert exceeded.scope == "run of Editor"
    assert child.own.total_tokens == 120 and root.own.total_tokens == 0
    assert root.counted.total_tokens == 120
    assert woken == ["tripped"]
    assert root.before_request() is exceeded  # it stays spent
    stop()


def test_no_request_is_sent_when_no_token_is_left() -> None:
    budget = Budget({"max_tokens": 10}, scope="run")
    assert budget.charge(legion.Usage(total_tokens=10)) is None  # exactly at it: not over
    refused = budget.before_request()
    assert refused is not None and refused.limit == "max_tokens"


def test_tool_calls_are_counted_until_the_one_past_the_limit() -> None:
    root = Budget({"max_tool_calls": 2}, scope="run of A")
    child = root.child(scope="run of B")
    assert child.take_tool_call() is None
    assert root.take_tool_call() is None
    refused = child.take_tool_call()
    assert refused is not None and refused.limit == "max_tool_calls"
    assert (refused.allowed, refused.used) == (2, 3)
    assert root.counted.tool_calls == 2 and child.own.tool_calls == 1


def test_sandbox_seconds_count_running_steps() -> None:
    budget = Budget({"max_sandbox_seconds": 0.05}, scope="run")
    step = budget.step_started()
    left = budget.seconds_left()
    assert left is not None and 0 < left <= 0.05
    while budget.exceeded_now() is None:
        pass
    seconds = budget.step_ended(step)
    assert seconds >= 0.05
    assert budget.own.sandbox_seconds == pytest.approx(seconds)
    assert budget.exceeded_now() is not None


def test_a_principal_budget_is_per_utc_day_and_says_when_it_resets() -> None:
    now = [datetime.datetime(2030, 5, 1, 22, 30, tzinfo=datetime.UTC).timestamp()]
    alice = PrincipalBudget("alice", {"max_tokens_per_day": 100}, clock=lambda: now[0])
    run = alice.child({"max_tokens": 1000}, scope="run of Echo")
    exceeded = run.charge(legion.Usage(total_tokens=150))
    assert exceeded is not None and exceeded.limit == "max_tokens_per_day"
    assert "2030-05-02T00:00:00Z" in exceeded.describe()
    assert "in 1 h 30 min" in exceeded.describe()
    assert alice.check_start(256) is not None
    assert alice.unsaved() == {"2030-05-01": legion.Usage(total_tokens=150)}
    now[0] += 3600 * 2  # the next day
    assert alice.check_start(256) is None
    assert alice.tripped() is None
    assert alice.before_request() is None
    assert day_of(now[0]) == "2030-05-02"
    assert next_reset(now[0]).day == 3


def test_a_principal_budget_holds_sandboxes_and_their_memory() -> None:
    alice = PrincipalBudget("alice", {"max_sandboxes": 2, "max_sandbox_memory_mb": 600})
    run = alice.child(scope="run")
    assert run.acquire_sandbox(256) is None
    assert run.acquire_sandbox(256) is None
    refused = run.acquire_sandbox(256)
    assert refused is not None and refused.limit == "max_sandboxes"
    run.release_sandbox(256)
    refused = run.acquire_sandbox(512)
    assert refused is not None and refused.limit == "max_sandbox_memory_mb"
    assert (refused.allowed, refused.used) == (600, 768)
    assert run.acquire_sandbox(256) is None
    assert (alice.sandboxes, alice.memory_mb) == (2, 512)
    assert alice.tripped() is None  # room for sandboxes never stops other runs


# --- runs the model alone spends ------------------------------------------------------------


async def test_a_run_stops_over_max_tokens_with_exact_usage() -> None:
    model = PricedModel([BABBLE], tokens=30)
    with pytest.raises(legion.UsageLimitExceeded) as caught:
        await legion.run(Talker, "talk", model=model, max_tokens=100)
    exc = caught.value
    assert model.requests == 4  # 30, 60, 90, then 120 > 100
    assert exc.usage.total_tokens == 120 and exc.usage.requests == 4
    assert exc.usage.cost_usd == pytest.approx(1.0)
    assert (exc.limit, exc.allowed, exc.used) == ("max_tokens", 100, 120)
    assert exc.scope == "run of Talker"
    assert exc.counted.total_tokens == 120
    assert exc.run_id and exc.messages[0]["role"] == "system"
    assert "max_tokens=100" in str(exc)
    assert isinstance(exc, legion.RunError)


async def test_a_run_stops_over_max_cost_usd() -> None:
    model = PricedModel([BABBLE], cost=0.25)
    with pytest.raises(legion.UsageLimitExceeded) as caught:
        await legion.run(Talker, "talk", model=model, max_cost_usd=0.6)
    assert model.requests == 3
    assert caught.value.limit == "max_cost_usd"
    assert caught.value.usage.cost_usd == pytest.approx(0.75)


async def test_a_run_within_its_budget_answers() -> None:
    model = PricedModel([action("return", result="fine")], tokens=30)
    result = await legion.run(Talker, "talk", model=model, max_tokens=30, max_cost_usd=1)
    assert result.output == "fine" and result.usage.total_tokens == 30


async def test_a_conversation_budget_covers_every_turn() -> None:
    model = PricedModel([action("return", result="ok")], tokens=40)
    handle = await legion.start(Talker, model=model, max_tokens=100)
    try:
        assert (await handle.call("one")).usage.total_tokens == 40
        assert (await handle.call("two")).usage.total_tokens == 40
        with pytest.raises(legion.UsageLimitExceeded) as caught:
            await handle.call("three")  # 120 > 100 over the conversation
        assert caught.value.scope == "conversation"
        assert caught.value.counted.total_tokens == 120
        with pytest.raises(legion.UsageLimitExceeded):
            await handle.call("four")  # spent: refused before the model is asked
        assert model.requests == 3
    finally:
        await handle.stop()


# --- the server's side: token table, store, client overrides ----------------------------------


def test_the_token_file_takes_budgets(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(
        '["tok-a"]\nname = "alice"\nmax_tokens_per_day = 1000\nmax_cost_usd_per_day = 2.5\n'
        'max_sandboxes = 2\nmax_sandbox_memory_mb = 512\n\n["tok-b"]\nname = "bob"\n'
    )
    table = TokenTable.from_file(path)
    alice = asyncio.run(table.authenticate("tok-a"))
    bob = asyncio.run(table.authenticate("tok-b"))
    assert alice is not None and bob is not None
    assert alice.budgets == {
        "max_tokens_per_day": 1000,
        "max_cost_usd_per_day": 2.5,
        "max_sandboxes": 2,
        "max_sandbox_memory_mb": 512,
    }
    assert set(bob.budgets.values()) == {None}
    path.write_text('["tok-a"]\nname = "alice"\nmax_sandboxes = -1\n')
    with pytest.raises(legion.UsageError, match="max_sandboxes"):
        TokenTable.from_file(path)
    path.write_text('["tok-a"]\nname = "alice"\nmax_tokens_a_day = 5\n')
    with pytest.raises(legion.UsageError, match="max_tokens_a_day"):
        TokenTable.from_file(path)
    # Principals made elsewhere (a JWT authenticator) take the same keywords.
    assert Principal("carol", max_tokens_per_day=10).budgets["max_tokens_per_day"] == 10


async def test_usage_per_principal_and_day_survives_reopening_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SQLiteStore(path)
    spent = legion.Usage(90, 10, 100, 0.5, 2, 3, 1.25)
    await store.save_usage("alice", "2030-05-01", spent)
    store.close()
    again = SQLiteStore(path)
    try:
        assert await again.load_usage("alice", "2030-05-01") == spent
        assert await again.load_usage("alice", "2030-05-02") == legion.Usage()
        assert await again.load_usage("bob", "2030-05-01") == legion.Usage()
    finally:
        again.close()
    memory = MemoryStore()
    await memory.save_usage("alice", "2030-05-01", spent)
    assert await memory.load_usage("alice", "2030-05-01") == spent


def test_a_client_may_only_lower_the_servers_budget() -> None:
    server = legion.AgentConfig(max_tokens=1000)
    _only_lower({"max_tokens": 10}, server)
    _only_lower({"max_cost_usd": 10}, server)  # the server sets none: any
    with pytest.raises(legion.UsageError, match="only lower"):
        _only_lower({"max_tokens": 5000}, server)
    with pytest.raises(legion.UsageError, match="only lower"):
        _only_lower({"max_tokens": None}, server)


def test_usage_limit_exceeded_keeps_its_type_over_the_wire() -> None:
    sent = legion.UsageLimitExceeded(
        "Echo: the run of Echo's budget max_tokens=1 is spent (30 counted)",
        run_id="r1",
        usage=legion.Usage(25, 5, 30, None, 1, tool_calls=2, sandbox_seconds=0.75),
        iterations=0,
        limit="max_tokens",
        allowed=1,
        used=30,
        scope="run of Echo",
        counted=legion.Usage(50, 10, 60, 0.125, 2, tool_calls=3, sandbox_seconds=1.5),
    )
    got = run_error(error_message(sent, "r1"))
    assert isinstance(got, legion.UsageLimitExceeded)
    assert str(got) == str(sent) and got.run_id == "r1"
    assert got.usage == sent.usage and got.counted == sent.counted
    assert (got.limit, got.allowed, got.used, got.scope) == ("max_tokens", 1, 30, "run of Echo")
    assert isinstance(got.allowed, int) and isinstance(got.used, int)


def test_usage_limit_exceeded_without_figures_over_the_wire() -> None:
    # A refused tool call's error names no counted usage; seconds and dollars stay floats.
    sent = legion.UsageLimitExceeded("x", limit="max_sandbox_seconds", allowed=2.0, used=2.5)
    got = run_error(error_message(sent, "r2"))
    assert isinstance(got, legion.UsageLimitExceeded) and got.run_id == "r2"
    assert (got.limit, got.allowed, got.used, got.scope) == ("max_sandbox_seconds", 2.0, 2.5, "")
    assert isinstance(got.allowed, float) and got.counted is None
    bare = run_error(error_message(legion.UsageLimitExceeded("y"), "r3"))
    assert isinstance(bare, legion.UsageLimitExceeded)
    assert (bare.limit, bare.allowed, bare.used, bare.counted) == ("", None, None, None)
    other = run_error(error_message(legion.MaxIterationsReached("z", usage=legion.Usage()), "r4"))
    assert not hasattr(other, "limit")  # other run errors gain no budget fields
