"""Approvals, embedded: a tool function marked as needing a person's approval
is held on the host; it runs once, with the arguments shown, when approved,
and never when refused, decided by the wrong principal, or left undecided."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import legion
from legion.human import ApprovalDecision, ApprovalRequest, requires_approval
from legion.testing import ScriptedModel, action

from ..reliability.support import wait_until

REFUNDS: list[tuple[str, float]] = []
"""What the host really did: each refund that ran."""


class Payments(legion.Tool):
    """Money out of the shop's account."""

    @requires_approval
    def refund(self, order: str, amount: float) -> str:
        REFUNDS.append((order, amount))
        return f"refunded {amount:g} on {order}"

    def balance(self) -> float:
        return 100.0


class Cashier(legion.Agent):
    """Refunds orders."""

    tools = [Payments]
    config = {"max_iterations": 2, "max_retries": 2}


class AliceApproves(legion.Agent):
    """Refunds orders; alice approves each, within a short time."""

    tools = [Payments]
    tool_config = {"Payments": {"approval": {"refund": {"approver": "alice", "timeout": 60}}}}


class FinanceApproves(legion.Agent):
    """Refunds orders; anyone in finance approves each."""

    tools = [Payments]
    tool_config = {"Payments": {"approval": {"refund": {"approver": "role:finance"}}}}


class Hasty(legion.Agent):
    """Nobody waits long for its refunds."""

    tools = [Payments]
    tool_config = {"Payments": {"approval": {"refund": {"timeout": 0.3}}}}


REFUND = action("eval_and_complete", 'Payments.refund("o-17", amount=25)')
CATCH = action(
    "eval_and_complete",
    'try:\n    r = Payments.refund("o-17", 25)\n'
    "except ToolError as exc:\n    r = [type(exc).__name__, str(exc)]\nr",
)


@pytest.fixture(autouse=True)
def _fresh_ledger() -> None:
    REFUNDS.clear()


def _recorded(events: list[legion.telemetry.Event]) -> Any:
    return legion.telemetry.subscribe(events.append)


@pytest.mark.docker
async def test_an_approved_call_runs_once_with_the_arguments_shown(
    runtime: legion.SandboxRuntime,
) -> None:
    asked: list[ApprovalRequest] = []

    def approve(request: ApprovalRequest) -> bool:
        asked.append(request)
        assert REFUNDS == []  # held: nothing ran before the decision
        return True

    events: list[legion.telemetry.Event] = []
    unsubscribe = _recorded(events)
    try:
        with legion.human.approval_handler(approve):
            result = await legion.run(
                Cashier, "refund", model=ScriptedModel([REFUND]), runtime=runtime
            )
    finally:
        unsubscribe()
    assert result.output == "refunded 25 on o-17"
    assert REFUNDS == [("o-17", 25.0)]
    (request,) = asked
    assert (request.tool, request.function) == ("Payments", "refund")
    assert request.args == ("o-17",) and dict(request.kwargs) == {"amount": 25}
    assert request.run_id == result.run_id and request.agent == "Cashier"
    names = [e.name for e in events if e.name.startswith("tool.approval")]
    assert names == ["tool.approval", "tool.approval.decision"]
    published = next(e for e in events if e.name == "tool.approval")
    assert published.run_id == result.run_id
    assert published.data["args"] == ["o-17"] and published.data["kwargs"] == {"amount": 25}
    assert published.data["approvers"] == [] and published.data["ref"] == request.ref
    assert legion.human.pending_approvals() == []


@pytest.mark.docker
async def test_a_refused_call_never_runs_and_the_code_sees_why(
    runtime: legion.SandboxRuntime,
) -> None:
    def refuse(request: ApprovalRequest) -> ApprovalDecision:
        return ApprovalDecision(False, "over the refund limit", principal="sam")

    with legion.human.approval_handler(refuse):
        result = await legion.run(Cashier, "refund", model=ScriptedModel([CATCH]), runtime=runtime)
    assert REFUNDS == []
    kind, message = result.output
    assert kind == "ApprovalRefused"
    assert message == (
        "Payments.refund was refused by sam: over the refund limit; the call did not run"
    )


@pytest.mark.docker
async def test_the_model_reads_the_refusal(runtime: legion.SandboxRuntime) -> None:
    model = ScriptedModel([REFUND, action("return", result="gave up")])
    with legion.human.approval_handler(lambda request: False):
        result = await legion.run(Cashier, "refund", model=model, runtime=runtime)
    assert result.output == "gave up" and REFUNDS == []
    told = model.requests[1][-1]["content"]
    assert "ApprovalRefused" in told and "Payments.refund was refused" in told


async def held_refund(
    agent: type[legion.Agent], runtime: legion.SandboxRuntime
) -> tuple[asyncio.Task[legion.RunResult], ApprovalRequest]:
    """A run of ``agent`` refunding once, and its refund's approval request, held."""
    running = asyncio.create_task(
        legion.run(agent, "refund", model=ScriptedModel([REFUND]), runtime=runtime)
    )
    await wait_until(lambda: bool(legion.human.pending_approvals()), 30, "the approval")
    (request,) = legion.human.pending_approvals()
    return running, request


@pytest.mark.docker
async def test_only_the_named_approver_decides(runtime: legion.SandboxRuntime) -> None:
    # A handler that names no principal cannot decide for alice either.
    with legion.human.approval_handler(lambda request: True):
        running, request = await held_refund(AliceApproves, runtime)
        try:
            assert request.approvers == ("alice",)
            with pytest.raises(legion.PermissionDenied, match="for alice to decide"):
                legion.human.respond_approval(request.ref, approved=True, principal="bob")
            with pytest.raises(legion.PermissionDenied):
                legion.human.respond_approval(request.ref, approved=False)
            await asyncio.sleep(0.2)
            assert REFUNDS == [] and legion.human.pending_approvals() == [request]
            legion.human.respond_approval(request.ref, approved=True, principal="alice")
            result = await running
        finally:
            running.cancel()
    assert result.output == "refunded 25 on o-17"
    assert REFUNDS == [("o-17", 25.0)]
    with pytest.raises(legion.HumanRequestNotFound, match="approval request"):
        legion.human.respond_approval(request.ref, approved=True, principal="alice")


@pytest.mark.docker
async def test_a_role_approver_is_anyone_holding_the_role(runtime: legion.SandboxRuntime) -> None:
    running, request = await held_refund(FinanceApproves, runtime)
    try:
        assert request.approvers == ("role:finance",)
        refused = "for a principal with the role finance to decide, not principal 'bob'"
        with pytest.raises(legion.PermissionDenied, match=refused):
            legion.human.respond_approval(request.ref, approved=True, principal="bob")
        with pytest.raises(legion.PermissionDenied):
            legion.human.respond_approval(
                request.ref, approved=True, principal="bob", roles=["support", "Finance"]
            )
        with pytest.raises(legion.PermissionDenied):  # a principal named like the role is not it
            legion.human.respond_approval(request.ref, approved=True, principal="finance")
        with pytest.raises(legion.UsageError, match="list of role names"):
            legion.human.respond_approval(request.ref, approved=True, roles="finance")
        await asyncio.sleep(0.2)
        assert REFUNDS == [] and legion.human.pending_approvals() == [request]
        legion.human.respond_approval(
            request.ref, approved=True, principal="dana", roles=["support", "finance"]
        )
        result = await running
    finally:
        running.cancel()
    assert result.output == "refunded 25 on o-17"
    assert REFUNDS == [("o-17", 25.0)]


@pytest.mark.docker
async def test_a_handler_decides_for_a_role_by_naming_its_roles(
    runtime: legion.SandboxRuntime,
) -> None:
    @requires_approval(approver=["alice", "role:ops"], timeout=30)
    def deploy(service: str) -> str:
        return f"deployed {service}"

    seen: list[ApprovalRequest] = []

    def as_dana(request: ApprovalRequest) -> ApprovalDecision:
        seen.append(request)
        return ApprovalDecision(False, "freeze", principal="dana", roles=("ops",))

    with legion.human.approval_handler(as_dana):
        async with legion.Sandbox(tools=[deploy], runtime=runtime) as box:
            result = await box.run(
                'try:\n    r = deploy("web")\nexcept ToolError as exc:\n    r = str(exc)\nr'
            )
    assert result.error is None, result.error
    assert result.value == "deploy was refused by dana: freeze; the call did not run"
    assert [r.approvers for r in seen] == [("alice", "role:ops")]


@pytest.mark.docker
async def test_no_decision_times_out_as_a_clear_error(runtime: legion.SandboxRuntime) -> None:
    events: list[legion.telemetry.Event] = []
    unsubscribe = _recorded(events)
    try:
        result = await legion.run(Hasty, "refund", model=ScriptedModel([CATCH]), runtime=runtime)
    finally:
        unsubscribe()
    assert REFUNDS == []
    assert result.output == [
        "ApprovalTimeout",
        "Payments.refund needs a person's approval and nobody decided within 0.3 s; "
        "the call did not run",
    ]
    assert "tool.approval.timeout" in [e.name for e in events]
    assert legion.human.pending_approvals() == []


@pytest.mark.docker
async def test_a_plain_function_held_in_a_sandbox_is_answered_by_respond(
    runtime: legion.SandboxRuntime,
) -> None:
    ran: list[str] = []

    @requires_approval(approver=["ops", "alice"], timeout=30)
    def deploy(service: str) -> str:
        ran.append(service)
        return "deployed"

    loop = asyncio.get_running_loop()

    def on_event(event: legion.telemetry.Event) -> None:
        if event.name == "tool.approval":
            ref = event.data["ref"]
            loop.call_later(
                0.05, lambda: legion.human.respond_approval(ref, approved=True, principal="ops")
            )

    unsubscribe = legion.telemetry.subscribe(on_event)
    try:
        async with legion.Sandbox(tools=[deploy, Payments], runtime=runtime) as box:
            result = await box.run('[deploy("web"), Payments.balance()]')
    finally:
        unsubscribe()
    assert result.error is None, result.error
    assert result.value == ["deployed", 100.0] and ran == ["web"]


def test_respond_refuses_an_approval_and_answers_are_checked() -> None:
    with pytest.raises(legion.HumanRequestNotFound):
        legion.human.respond_approval("nope", approved=True)
    with pytest.raises(legion.UsageError, match="True or False"):
        legion.human.respond_approval("nope", approved="yes")  # type: ignore[arg-type]
    with pytest.raises(legion.UsageError, match="callable"):
        legion.human.approval_handler("yes")  # type: ignore[arg-type]


def test_bad_approval_options_fail_at_definition() -> None:
    def agent(config: dict[str, Any]) -> type[legion.Agent]:
        class Bad(legion.Agent):  # checked when the class is defined
            """Misconfigured."""

            tools = [Payments]
            tool_config = {"Payments": {"approval": config}}

        return Bad

    with pytest.raises(legion.UsageError, match="not one of its functions"):
        agent({"refnd": True})
    with pytest.raises(legion.UsageError, match="positive number"):
        agent({"refund": {"timeout": -1}})
    with pytest.raises(legion.UsageError, match="unknown approval option"):
        agent({"refund": {"approvers": "alice"}})
    with pytest.raises(legion.UsageError, match="principal's name"):
        requires_approval(approver=[""])
    with pytest.raises(legion.UsageError, match="role:NAME"):
        requires_approval(approver="role: ")
    with pytest.raises(legion.UsageError, match="role:NAME"):
        agent({"refund": {"approver": ["alice", "role:"]}})


def test_roles_come_from_the_vaults_roles() -> None:
    assert legion.human.roles_of({"roles": ["finance", "ops", 3, ""]}) == {"finance", "ops"}
    assert legion.human.roles_of({"roles": "finance"}) == {"finance"}
    assert legion.human.roles_of({"roles": {"finance": True}}) == frozenset()
    assert legion.human.roles_of({"user": "alice"}) == frozenset()
