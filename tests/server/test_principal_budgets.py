"""Per-principal budgets of `legion serve`, set in the token table: tokens and
cost per day, sandboxes at once and their memory. A principal over one gets
RESOURCE_EXHAUSTED naming it (and when it resets) while the others' runs go
on, and what a principal spent today still counts after a restart on the
same --store."""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

import legion
from legion.testing import FakeOpenAIServer

from .conftest import ServerProcess, server_env, start_server, stop_cleanly
from .support import next_event

pytestmark = pytest.mark.docker

NAMES = ("alice", "bob", "dave", "erin", "frank")


@dataclass(frozen=True)
class Budgeted:
    tokens: dict[str, str]
    token_file: Path
    store: Path
    env: dict[str, str]
    where: Path

    def start(self) -> ServerProcess:
        return start_server(
            [
                "--listen",
                "127.0.0.1:0",
                "--tokens",
                str(self.token_file),
                "--store",
                str(self.store),
                "--grace-seconds",
                "2",
            ],
            self.env,
            self.where,
        )


@pytest.fixture(scope="module")
def budgeted(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory
) -> Budgeted:
    """alice: 1 token a day; bob: no budget; dave: one sandbox at a time;
    erin: 100 MiB of sandbox memory (less than one sandbox); frank: a
    millionth of a cent a day. The model is priced (litellm knows gpt-4o-mini)."""
    where = tmp_path_factory.mktemp("budgets")
    tokens = {name: f"tok-{name}-{secrets.token_urlsafe(12)}" for name in NAMES}
    extra = {
        "alice": "max_tokens_per_day = 1",
        "bob": "",
        "dave": "max_sandboxes = 1",
        "erin": "max_sandbox_memory_mb = 100",
        "frank": "max_cost_usd_per_day = 0.00000001",
    }
    token_file = where / "tokens.toml"
    token_file.write_text(
        "\n".join(
            f'["{tokens[name]}"]\nname = "{name}"\nvault = {{ user = "{name}" }}\n{extra[name]}\n'
            for name in NAMES
        )
    )
    env = server_env(fake_model, LEGION_MODEL="openai/gpt-4o-mini")
    return Budgeted(tokens, token_file, where / "state.db", env, where)


def client(server: ServerProcess, budgeted: Budgeted, name: str) -> legion.Client:
    return legion.Client(server.address, token=budgeted.tokens[name])


async def test_a_principal_over_its_daily_tokens_is_refused_and_stays_so_after_a_restart(
    budgeted: Budgeted,
) -> None:
    server = budgeted.start()
    try:
        async with (
            client(server, budgeted, "alice") as alice,
            client(server, budgeted, "bob") as bob,
        ):
            # Her first run spends more than her day's budget: it stops there.
            with pytest.raises(legion.UsageLimitExceeded) as caught:
                await alice.run("Echo", "#json 1")
            spent = caught.value.usage.total_tokens
            assert spent > 1 and caught.value.usage.requests == 1
            assert "max_tokens_per_day=1" in str(caught.value)
            assert f"({spent:,} counted)" in str(caught.value)
            assert "principal alice" in str(caught.value)
            # Now she is refused before anything runs, and told when it resets.
            with pytest.raises(legion.ResourceExhausted) as refused:
                await alice.run("Echo", "#json 2")
            message = str(refused.value)
            assert "max_tokens_per_day=1" in message and f"{spent:,} counted" in message
            assert re.search(r"resets at \d{4}-\d\d-\d\dT00:00:00Z", message), message
            with pytest.raises(legion.ResourceExhausted, match="max_tokens_per_day"):
                await alice.start("Echo")
            # bob's runs go on.
            assert (await bob.run("Echo", "#json 3")).output == 3
    finally:
        stop_cleanly(server)

    server = budgeted.start()  # the same --store: her day is still spent
    try:
        async with (
            client(server, budgeted, "alice") as alice,
            client(server, budgeted, "bob") as bob,
        ):
            with pytest.raises(legion.ResourceExhausted) as refused:
                await alice.run("Echo", "#json 4")
            assert f"{spent:,} counted" in str(refused.value)
            assert (await bob.run("Echo", "#json 5")).output == 5
    finally:
        stop_cleanly(server)


async def test_a_principal_over_its_daily_cost_is_refused(budgeted: Budgeted) -> None:
    server = budgeted.start()
    try:
        async with (
            client(server, budgeted, "frank") as frank,
            client(server, budgeted, "bob") as bob,
        ):
            with pytest.raises(legion.UsageLimitExceeded, match="max_cost_usd_per_day") as caught:
                await frank.run("Echo", "#json 1")
            assert caught.value.usage.cost_usd is not None and caught.value.usage.cost_usd > 0
            with pytest.raises(legion.ResourceExhausted, match="max_cost_usd_per_day"):
                await frank.run("Echo", "#json 2")
            assert (await bob.run("Echo", "#json 3")).output == 3
            # A client may set a run's own budget (lower than the server's, if it has one).
            with pytest.raises(legion.UsageLimitExceeded, match="run of Echo") as caught:
                await bob.run("Echo", "#json 4", max_tokens=1)
            assert "max_tokens=1 " in str(caught.value)
    finally:
        stop_cleanly(server)


async def test_sandboxes_at_once_and_their_memory(budgeted: Budgeted) -> None:
    server = budgeted.start()
    try:
        async with (
            client(server, budgeted, "dave") as dave,
            client(server, budgeted, "erin") as erin,
            client(server, budgeted, "bob") as bob,
        ):
            # erin's allowance is smaller than one sandbox: refused before it starts.
            with pytest.raises(legion.ResourceExhausted) as refused:
                await erin.run("Coder", "#code 1 + 1")
            assert "max_sandbox_memory_mb=100" in str(refused.value)
            assert "256 counted" in str(refused.value)

            # dave's one sandbox is held by a run waiting for a person.
            async with dave.events(name_prefixes=["human."]) as events:
                first = asyncio.create_task(dave.run("Coder", "#code Human.ask('go on?')"))
                asked = await next_event(events, lambda e: e.name == "human.request")
                assert len(server.containers()) == 1
                with pytest.raises(legion.ResourceExhausted) as refused:
                    await dave.run("Coder", "#code 2 + 2")
                assert "max_sandboxes=1" in str(refused.value)
                assert (await bob.run("Coder", "#code 3 + 3")).output == 6  # bob goes on
                await dave.respond_human(asked.data["ref"], "yes")
                assert (await first).output == "yes"
            # the sandbox is given back when the run ends
            assert (await dave.run("Coder", "#code 4 + 4")).output == 8
    finally:
        stop_cleanly(server)
