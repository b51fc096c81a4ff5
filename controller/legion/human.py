"""Human in the loop: sandbox code asks a person and waits for the answer.

List :class:`Human` in an agent's tools; its code can then call
``Human.ask("Ship the order to the new address?")``, which blocks until the
question is answered, and returns the answer. No answer within the timeout
(``tool_config = {"Human": {"timeout": 600}}``; 300 s by default) raises a
``TimeoutError`` the code can catch.

A question becomes a :class:`HumanRequest`. It is published as the telemetry
event ``human.request`` (data: ``ref``, ``agent``, ``question``, ``meta``) and,
when one is set, handed to the handler of the caller's context:

- embedded, with a function that answers: ``with legion.human.handler(fn):``
  around the run (``fn`` receives the request and returns the answer, or an
  awaitable of it), or ``legion.start(..., on_human=fn)``;
- from anywhere in the process, later: ``legion.human.respond(ref, answer)``
  (a dashboard, a chat front end...);
- remotely: the controller's ``Events`` stream carries the request and its
  ``RespondHuman`` call answers it.

Approvals use the same machinery. A tool function marked with
:func:`requires_approval` (or named in ``tool_config``'s ``approval``) is held
on the host before each call: an :class:`ApprovalRequest` is published as the
telemetry event ``tool.approval`` (data: ``ref``, ``agent``, ``tool``,
``function``, ``args``, ``kwargs``, ``approvers``, ``timeout``) and the
function runs, once, with those arguments only after an approval arrives:

- embedded: ``with legion.human.approval_handler(fn):`` around the run
  (``fn`` receives the request and returns True, False or an
  :class:`ApprovalDecision`, or an awaitable of it);
- from anywhere in the process: ``legion.human.respond_approval(ref, approved=True)``;
- remotely: the controller's ``RespondApproval`` call, or the dashboard's
  humans page.

When the approval names ``approvers``, only a decision by one of those
principals counts (another raises :class:`legion.PermissionDenied`, and the
call stays held); with none, the principal whose run made the call decides.
An approver written ``role:NAME`` is any principal holding the role NAME:
pass the decider's ``roles`` to :func:`respond_approval` (under ``legion
serve``, the roles are the principal's vault's ``roles``, see :func:`roles_of`).
A refusal raises ``ApprovalRefused`` in the sandbox code and a timeout
``ApprovalTimeout`` (both ``ToolError``); the model reads why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import telemetry
from ._ctx import bound
from ._log import get_logger
from .errors import HumanRequestNotFound, PermissionDenied, UsageError
from .sandbox.tools import own_timeout
from .tool import Approval, Tool, may_decide, requires_approval, who_decides

__all__ = [
    "Approval",
    "ApprovalDecision",
    "ApprovalRequest",
    "Human",
    "HumanRequest",
    "approval_handler",
    "approval_of",
    "handler",
    "pending",
    "pending_approvals",
    "requires_approval",
    "respond",
    "respond_approval",
    "roles_of",
    "run_of",
]

log = get_logger("legion.human")

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class HumanRequest:
    """One question from sandbox code to a person."""

    ref: str
    """Pass it to :func:`respond` to answer."""
    question: str
    agent: str | None
    run_id: str | None
    parent_run_id: str | None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ApprovalRequest:
    """One tool call held until a person approves it."""

    ref: str
    """Pass it to :func:`respond_approval` to decide."""
    tool: str
    function: str
    """Empty when the tool is a plain function."""
    args: tuple[Any, ...]
    """The arguments the function runs with when approved, as the code sent them."""
    kwargs: Mapping[str, Any]
    approvers: tuple[str, ...]
    """The principals whose decision counts, by name or as ``role:NAME``;
    empty: the run's own principal."""
    timeout: float
    agent: str | None
    run_id: str | None
    parent_run_id: str | None


@dataclass(frozen=True)
class ApprovalDecision:
    """A person's decision on an :class:`ApprovalRequest`."""

    approved: bool
    reason: str = ""
    """Shown to the code (and the model) with a refusal."""
    principal: str | None = None
    """Who decided; it must be one of the request's ``approvers`` when it names some."""
    roles: tuple[str, ...] = ()
    """The roles ``principal`` holds (for an approver written ``role:NAME``)."""


HumanHandler = Callable[[HumanRequest], Any]
"""Receives a request; returns the answer (or an awaitable of it)."""
ApprovalHandler = Callable[[ApprovalRequest], Any]
"""Receives an approval request; returns True, False or an
:class:`ApprovalDecision` (or an awaitable of one)."""

MAX_APPROVAL_ARGS = 64 * 1024
"""Arguments larger than this (as JSON) are refused without asking: an
approver must see everything the function would run with."""

_handler: ContextVar[HumanHandler | None] = ContextVar("legion_human_handler", default=None)
_approval_handler: ContextVar[ApprovalHandler | None] = ContextVar(
    "legion_approval_handler", default=None
)
asking_agent: ContextVar[str | None] = ContextVar("legion_human_agent", default=None)
"""The agent whose code asks (set by the run driver)."""


@dataclass
class _Pending:
    request: HumanRequest | ApprovalRequest
    answer: asyncio.Future[Any]


_pending: dict[str, _Pending] = {}


def handler(fn: HumanHandler | None) -> contextlib.AbstractContextManager[HumanHandler | None]:
    """Answer the human requests of runs started in this block with ``fn``:
    ``with legion.human.handler(answer): await legion.run(...)``."""
    if fn is not None and not callable(fn):
        raise UsageError(f"a human handler must be callable, not {type(fn).__name__}")
    return bound(_handler, fn)


def approval_handler(
    fn: ApprovalHandler | None,
) -> contextlib.AbstractContextManager[ApprovalHandler | None]:
    """Decide the approval requests of runs started in this block with ``fn``:
    ``with legion.human.approval_handler(lambda request: request.args[1] < 100): ...``."""
    if fn is not None and not callable(fn):
        raise UsageError(f"an approval handler must be callable, not {type(fn).__name__}")
    return bound(_approval_handler, fn)


def pending() -> list[HumanRequest]:
    """The questions waiting for an answer, oldest first."""
    return [p.request for p in list(_pending.values()) if isinstance(p.request, HumanRequest)]


def pending_approvals() -> list[ApprovalRequest]:
    """The tool calls waiting for an approval, oldest first."""
    return [p.request for p in list(_pending.values()) if isinstance(p.request, ApprovalRequest)]


def run_of(ref: str) -> str | None:
    """The run that asked the question (or the approval) ``ref``; None when
    not waiting."""
    waiting = _pending.get(ref)
    return waiting.request.run_id if waiting else None


def approval_of(ref: str) -> ApprovalRequest | None:
    """The approval request ``ref`` while it waits; None otherwise."""
    waiting = _pending.get(ref)
    return waiting.request if waiting and isinstance(waiting.request, ApprovalRequest) else None


def _not_waiting(what: str, ref: str) -> HumanRequestNotFound:
    return HumanRequestNotFound(
        f"no {what} {ref!r} is waiting for an answer (it was answered, timed out, or never asked)"
    )


def respond(ref: str, answer: Any) -> None:
    """Answer the question ``ref``. Safe from any thread.

    Raises :class:`legion.HumanRequestNotFound` when no question with that
    ref is waiting (never asked, already answered, or timed out).
    """
    if approval_of(ref) is not None:
        raise UsageError(
            f"{ref!r} is an approval request: decide it with respond_approval(ref, approved=...)"
        )
    _deliver(ref, "human request", answer)


def respond_approval(
    ref: str,
    *,
    approved: bool,
    reason: str = "",
    principal: str | None = None,
    roles: Iterable[str] = (),
) -> None:
    """Approve (or refuse) the held tool call ``ref``, as ``principal``, who
    holds ``roles``. Safe from any thread.

    Raises :class:`legion.HumanRequestNotFound` when no approval with that ref
    is waiting, and :class:`legion.PermissionDenied` when the request names
    its approvers and ``principal`` is not one of them, nor holds a role they
    name as ``role:NAME`` (the call stays held).
    """
    if not isinstance(approved, bool):
        raise UsageError(f"approved must be True or False, not {approved!r}")
    if not isinstance(reason, str):
        raise UsageError(f"reason must be a string, not {type(reason).__name__}")
    if isinstance(roles, str) or not isinstance(roles, Iterable):
        raise UsageError(f"roles must be a list of role names, not {roles!r}")
    roles = tuple(roles)
    if not all(isinstance(role, str) for role in roles):
        raise UsageError(f"roles must be a list of role names, not {roles!r}")
    request = approval_of(ref)
    if request is None:
        raise _not_waiting("approval request", ref)
    if request.approvers and not may_decide(request.approvers, principal, roles):
        who = f"principal {principal!r}" if principal else "a decision that names no principal"
        raise PermissionDenied(
            f"approval {ref!r} of {_label(request.tool, request.function)} is for "
            f"{who_decides(request.approvers)} to decide, not {who}",
            code="PERMISSION_DENIED",
        )
    _deliver(ref, "approval request", ApprovalDecision(approved, reason, principal, roles))


def roles_of(vault: Mapping[str, Any]) -> frozenset[str]:
    """The roles a principal holds: its vault's ``roles``, a list of names (a
    single string is one role; anything else, none). ``legion serve`` fills
    it from a token table entry's ``vault = { roles = ["finance"] }`` or, with
    JWTs, from the claim mapped to the vault key ``roles``."""
    held = vault.get("roles")
    if isinstance(held, str):
        return frozenset({held})
    if isinstance(held, (list, tuple, set, frozenset)):
        return frozenset(r for r in held if isinstance(r, str) and r)
    return frozenset()


def _deliver(ref: str, what: str, value: Any) -> None:
    """Settle the waiting request ``ref`` with ``value``, from any thread."""
    waiting = _pending.pop(ref, None)
    if waiting is None:
        raise _not_waiting(what, ref)
    future = waiting.answer
    future.get_loop().call_soon_threadsafe(_settle, future, value)


@contextlib.contextmanager
def _waiting(
    request: HumanRequest | ApprovalRequest,
    answering: Callable[[Any], Any] | None,
    deliver: Callable[[Any], None],
) -> Iterator[asyncio.Future[Any]]:
    """Register ``request`` as waiting (and hand it to the handler, if any);
    yields the future its answer settles. Unregistered on the way out."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    _pending[request.ref] = _Pending(request, answer)
    task = asyncio.create_task(_ask_handler(answering, request, deliver)) if answering else None
    try:
        yield answer
    finally:
        _pending.pop(request.ref, None)
        if task is not None and not task.done():
            task.cancel()


def _settle(future: asyncio.Future[Any], answer: Any) -> None:
    if not future.done():
        future.set_result(answer)


class Human(Tool):
    """Ask a person a question and wait for the answer."""

    description = '''
class Human:
    """A person who answers questions while your code waits."""

    def ask(question: str, meta: dict | None = None) -> Any:
        """Ask `question` and return the person's answer (often a string).
        `meta` is shown with the question (e.g. {"options": ["yes", "no"]}).
        Raises TimeoutError when nobody answers in time: catch it and decide
        what to do without the answer."""
'''

    @own_timeout
    async def ask(self, question: str, meta: dict[str, Any] | None = None) -> Any:
        """Ask ``question``; returns the answer."""
        if not question.strip():
            raise ValueError("the question is empty")
        timeout = float(self.config.get("timeout", DEFAULT_TIMEOUT))
        run_id, parent = telemetry.current_run()
        request = HumanRequest(
            ref=uuid.uuid4().hex,
            question=question,
            agent=asking_agent.get(),
            run_id=run_id,
            parent_run_id=parent,
            meta=MappingProxyType(dict(meta or {})),
        )
        deliver = functools.partial(respond, request.ref)
        with _waiting(request, _handler.get(), deliver) as answer:
            telemetry.emit(
                telemetry.HUMAN_REQUEST,
                ref=request.ref,
                agent=request.agent,
                question=question,
                meta=dict(request.meta),
            )
            try:
                value = await asyncio.wait_for(asyncio.shield(answer), timeout)
            except TimeoutError:
                telemetry.emit(telemetry.HUMAN_TIMEOUT, ref=request.ref, timeout=timeout)
                raise TimeoutError(f"nobody answered the question within {timeout:g} s") from None
            telemetry.emit(telemetry.HUMAN_RESPONSE, ref=request.ref)
            return value


async def _ask_handler(
    answering: Callable[[Any], Any],
    request: HumanRequest | ApprovalRequest,
    deliver: Callable[[Any], None],
) -> None:
    try:
        value = answering(request)
        if inspect.isawaitable(value):
            value = await value
        deliver(value)
    except asyncio.CancelledError:
        raise
    except HumanRequestNotFound:
        return  # answered (or timed out) meanwhile
    except Exception as exc:
        # The request stays open for respond(); the handler's failure is logged.
        log.warning("human_handler_failed", ref=request.ref, error=repr(exc))


def _decide(ref: str, value: Any) -> None:
    """An approval handler's return value, as a decision on ``ref``."""
    if isinstance(value, bool):
        value = ApprovalDecision(value)
    if not isinstance(value, ApprovalDecision):
        raise UsageError(
            f"an approval handler returns True, False or an ApprovalDecision, not {value!r}"
        )
    respond_approval(
        ref,
        approved=value.approved,
        reason=value.reason,
        principal=value.principal,
        roles=value.roles,
    )


def _label(tool: str, function: str) -> str:
    return f"{tool}.{function}" if function else tool


async def hold_for_approval(
    approval: Approval, *, tool: str, function: str, args: list[Any], kwargs: dict[str, Any]
) -> tuple[str, str] | None:
    """Hold a tool call until it is approved: None then; else the error type
    and message the sandbox code gets (the function never runs)."""
    label = _label(tool, function)
    try:
        size = len(json.dumps([args, kwargs]))
    except (TypeError, ValueError):  # arguments come parsed from JSON; never expected
        size = MAX_APPROVAL_ARGS + 1
    if size > MAX_APPROVAL_ARGS:
        return (
            "ApprovalRefused",
            f"{label} needs a person's approval, and its arguments ({size} bytes as JSON) "
            f"are more than an approver can be shown ({MAX_APPROVAL_ARGS}); pass less",
        )
    run_id, parent = telemetry.current_run()
    request = ApprovalRequest(
        ref=uuid.uuid4().hex,
        tool=tool,
        function=function,
        args=tuple(args),
        kwargs=MappingProxyType(dict(kwargs)),
        approvers=approval.approvers,
        timeout=approval.timeout,
        agent=asking_agent.get(),
        run_id=run_id,
        parent_run_id=parent,
    )
    who = {"ref": request.ref, "approvers": list(request.approvers)}
    deliver = functools.partial(_decide, request.ref)
    with _waiting(request, _approval_handler.get(), deliver) as decision:
        telemetry.emit(
            telemetry.TOOL_APPROVAL,
            **who,
            agent=request.agent,
            tool=tool,
            function=function,
            args=list(args),
            kwargs=dict(kwargs),
            timeout=approval.timeout,
        )
        try:
            decided: ApprovalDecision = await asyncio.wait_for(
                asyncio.shield(decision), approval.timeout
            )
        except TimeoutError:
            telemetry.emit(telemetry.TOOL_APPROVAL_TIMEOUT, **who, timeout=approval.timeout)
            return (
                "ApprovalTimeout",
                f"{label} needs a person's approval and nobody decided within "
                f"{approval.timeout:g} s; the call did not run",
            )
    telemetry.emit(
        telemetry.TOOL_APPROVAL_DECISION,
        **who,
        approved=decided.approved,
        reason=decided.reason,
        principal=decided.principal,
    )
    if decided.approved:
        return None
    by = f" by {decided.principal}" if decided.principal else ""
    why = f": {decided.reason}" if decided.reason.strip() else ""
    return ("ApprovalRefused", f"{label} was refused{by}{why}; the call did not run")
