"""Approvals through the controller: a real `legion serve` holds a tool call
until a principal decides with RespondApproval. Only the run's principal (or,
when the tool names them, its approvers, by name or by a role in their
vault) may decide; the tool runs on the server's host, and its ledger file
shows whether it ran."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import legion
from legion.client import RemoteEvent
from legion.human import requires_approval
from legion.testing import FakeOpenAIServer

from .conftest import (
    ServerProcess,
    Tokens,
    server_env,
    start_server,
    stop_cleanly,
    write_token_file,
)
from .support import next_event

pytestmark = pytest.mark.docker

LEDGER_ENV = "LEGION_TEST_APPROVALS_LEDGER"


class Payments(legion.Tool):
    """Money out of the shop's account."""

    @requires_approval
    def refund(self, order: str, amount: float) -> str:
        # Runs in the server process: one line per refund that really ran.
        with Path(os.environ[LEDGER_ENV]).open("a") as ledger:
            ledger.write(json.dumps([order, amount]) + "\n")
        return f"refunded {amount:g} on {order}"


class Cashier(legion.Agent):
    """Refunds orders; the principal who runs it approves."""

    tools = [Payments]


class AliceApproves(legion.Agent):
    """Refunds orders; only alice approves."""

    tools = [Payments]
    tool_config = {"Payments": {"approval": {"refund": {"approver": "alice"}}}}


class FinanceApproves(legion.Agent):
    """Refunds orders; anyone in finance approves."""

    tools = [Payments]
    tool_config = {"Payments": {"approval": {"refund": {"approver": "role:finance"}}}}


class Hasty(legion.Agent):
    """Nobody waits long for its refunds."""

    tools = [Payments]
    tool_config = {"Payments": {"approval": {"refund": {"timeout": 0.5}}}}


AGENTS = {
    "Cashier": Cashier,
    "AliceApproves": AliceApproves,
    "FinanceApproves": FinanceApproves,
    "Hasty": Hasty,
}

ROLES = {"dana": ["finance", "ops"], "erin": ["support"], "fred": ["finance"]}
"""Principals of the token table beside alice, bob and carol, with the roles in their vault."""
ROLE_TOKENS = {name: f"tok-{name}-{secrets.token_urlsafe(16)}" for name in ROLES}

REFUND = (
    "#code try:\n    r = Payments.refund('o-17', amount=25)\n"
    "except ToolError as exc:\n    r = [type(exc).__name__, str(exc)]\nr"
)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ledger") / "refunds.jsonl"


@pytest.fixture(scope="module")
def approvals_server(
    docker_ready: None,
    fake_model: FakeOpenAIServer,
    tokens: Tokens,
    ledger: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """`legion serve --dashboard` offering AGENTS, its tools writing to ``ledger``
    (the dashboard's approval test shares it)."""
    where = tmp_path_factory.mktemp("approvals")
    token_file = write_token_file(where, tokens)
    with token_file.open("a") as table:
        for name, roles in ROLES.items():
            table.write(
                f'\n["{ROLE_TOKENS[name]}"]\nname = "{name}"\n'
                f'vault = {{ user = "{name}", roles = {json.dumps(roles)} }}\n'
            )
    server = start_server(
        [
            *("--agents", f"{__name__}:AGENTS"),
            *("--listen", "127.0.0.1:0", "--dashboard", "127.0.0.1:0"),
            *("--tokens", str(token_file), "--grace-seconds", "2"),
        ],
        server_env(fake_model, **{LEDGER_ENV: str(ledger)}),
        where,
    )
    try:
        yield server
    finally:
        stop_cleanly(server)


@pytest.fixture(scope="module")
def address(approvals_server: ServerProcess) -> str:
    return approvals_server.address


@pytest.fixture
async def alice(address: str, tokens: Tokens) -> AsyncIterator[legion.Client]:
    async with legion.Client(address, token=tokens.alice) as client:
        yield client


@pytest.fixture
async def bob(address: str, tokens: Tokens) -> AsyncIterator[legion.Client]:
    async with legion.Client(address, token=tokens.bob) as client:
        yield client


def refunds(ledger: Path) -> list[list[object]]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def is_approval(event: RemoteEvent) -> bool:
    return event.name == legion.telemetry.TOOL_APPROVAL


async def test_the_runs_principal_approves_and_the_call_runs_once_as_shown(
    alice: legion.Client, bob: legion.Client, ledger: Path
) -> None:
    before = refunds(ledger)
    async with bob.events(name_prefixes=["tool.approval"]) as events:
        running = asyncio.create_task(bob.run("Cashier", REFUND))
        held = await next_event(events, is_approval)
        assert held.data["tool"] == "Payments" and held.data["function"] == "refund"
        assert held.data["args"] == ["o-17"] and held.data["kwargs"] == {"amount": 25}
        assert held.data["approvers"] == [] and held.data["agent"] == "Cashier"
        ref = held.data["ref"]

        with pytest.raises(legion.PermissionDenied, match="another principal"):
            await alice.respond_approval(ref, approved=True)
        with pytest.raises(legion.UsageError, match="approval request"):
            await bob.respond_human(ref, "yes")  # questions and approvals do not mix
        assert refunds(ledger) == before  # held: it has not run

        await bob.respond_approval(ref, approved=True)
        result = await asyncio.wait_for(running, 60)
        decided = await next_event(events, lambda e: e.name == "tool.approval.decision")
    assert result.output == "refunded 25 on o-17" and held.run_id == result.run_id
    assert refunds(ledger) == [*before, ["o-17", 25]]
    assert decided.data["approved"] is True and decided.data["principal"] == "bob"
    with pytest.raises(legion.NotFound, match="no approval request"):
        await bob.respond_approval(ref, approved=True)


async def test_only_the_named_approver_decides_and_a_refusal_never_runs(
    alice: legion.Client, bob: legion.Client, ledger: Path
) -> None:
    before = refunds(ledger)
    # alice is not running anything: the request reaches her stream as the approver.
    async with alice.events(name_prefixes=["tool.approval"]) as alices:
        running = asyncio.create_task(bob.run("AliceApproves", REFUND))
        held = await next_event(alices, is_approval)
        assert held.data["approvers"] == ["alice"]
        ref = held.data["ref"]
        with pytest.raises(legion.PermissionDenied, match="for alice to decide, not bob"):
            await bob.respond_approval(ref, approved=True)
        await asyncio.sleep(0.2)
        assert refunds(ledger) == before
        await alice.respond_approval(ref, approved=False, reason="refunds over 20 need a ticket")
        result = await asyncio.wait_for(running, 60)
    assert result.output == [
        "ApprovalRefused",
        "Payments.refund was refused by alice: refunds over 20 need a ticket; the call did not run",
    ]
    assert refunds(ledger) == before


async def test_a_holder_of_the_role_approves_and_others_are_refused(
    address: str, bob: legion.Client, ledger: Path
) -> None:
    before = refunds(ledger)
    async with (
        legion.Client(address, token=ROLE_TOKENS["dana"]) as dana,
        legion.Client(address, token=ROLE_TOKENS["erin"]) as erin,
        legion.Client(address, token=ROLE_TOKENS["fred"]) as fred,
        dana.events(name_prefixes=["tool.approval"]) as danas,
        fred.events(name_prefixes=["tool.approval"]) as freds,
        erin.events(name_prefixes=["tool.approval"]) as erins,
    ):
        # bob runs it; dana and fred hold the role, so the request reaches their streams.
        running = asyncio.create_task(bob.run("FinanceApproves", REFUND))
        held = await next_event(danas, is_approval)
        assert held.data["approvers"] == ["role:finance"]
        ref = held.data["ref"]
        assert (await next_event(freds, is_approval)).data["ref"] == ref
        refused = "for a principal with the role finance to decide, not"
        with pytest.raises(legion.PermissionDenied, match=f"{refused} erin"):
            await erin.respond_approval(ref, approved=True)
        with pytest.raises(legion.PermissionDenied, match=f"{refused} bob"):
            await bob.respond_approval(ref, approved=True)  # the run's own principal too
        await asyncio.sleep(0.2)
        assert refunds(ledger) == before
        await dana.respond_approval(ref, approved=True)
        result = await asyncio.wait_for(running, 60)
        decided = await next_event(danas, lambda e: e.name == "tool.approval.decision")
        assert (await next_event(freds, lambda e: e.name == "tool.approval.decision")) == decided
        with pytest.raises(legion.NotFound, match="no approval request"):
            await fred.respond_approval(ref, approved=False)  # decided already
        # erin, without the role, saw none of it.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(erins)), 0.5)
    assert result.output == "refunded 25 on o-17"
    assert refunds(ledger) == [*before, ["o-17", 25]]
    assert decided.data["approved"] is True and decided.data["principal"] == "dana"


async def test_no_decision_is_a_clear_timeout_and_bad_input_is_refused(
    bob: legion.Client, ledger: Path
) -> None:
    before = refunds(ledger)
    result = await bob.run("Hasty", REFUND)
    assert result.output == [
        "ApprovalTimeout",
        "Payments.refund needs a person's approval and nobody decided within 0.5 s; "
        "the call did not run",
    ]
    assert refunds(ledger) == before
    with pytest.raises(legion.UsageError, match="ref is empty"):
        await bob.respond_approval("", approved=True)
    with pytest.raises(legion.NotFound, match="no approval request"):
        await bob.respond_approval("0" * 32, approved=False)
    with pytest.raises(legion.UsageError, match="True or False"):
        await bob.respond_approval("0" * 32, approved="yes")  # type: ignore[arg-type]
    # Still serving.
    assert (await bob.run("Cashier", "#json 1")).output == 1
