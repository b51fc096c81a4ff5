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
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import telemetry
from ._ctx import bound
from ._log import get_logger
from .errors import HumanRequestNotFound, UsageError
from .sandbox.tools import own_timeout
from .tool import Tool

__all__ = ["Human", "HumanRequest", "handler", "pending", "respond", "run_of"]

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


HumanHandler = Callable[[HumanRequest], Any]
"""Receives a request; returns the answer (or an awaitable of it)."""

_handler: ContextVar[HumanHandler | None] = ContextVar("legion_human_handler", default=None)
asking_agent: ContextVar[str | None] = ContextVar("legion_human_agent", default=None)
"""The agent whose code asks (set by the run driver)."""


@dataclass
class _Pending:
    request: HumanRequest
    answer: asyncio.Future[Any]


_pending: dict[str, _Pending] = {}


def handler(fn: HumanHandler | None) -> contextlib.AbstractContextManager[HumanHandler | None]:
    """Answer the human requests of runs started in this block with ``fn``:
    ``with legion.human.handler(answer): await legion.run(...)``."""
    if fn is not None and not callable(fn):
        raise UsageError(f"a human handler must be callable, not {type(fn).__name__}")
    return bound(_handler, fn)


def pending() -> list[HumanRequest]:
    """The questions waiting for an answer, oldest first."""
    return [p.request for p in _pending.values()]


def run_of(ref: str) -> str | None:
    """The run that asked the question ``ref`` (None when not waiting)."""
    waiting = _pending.get(ref)
    return waiting.request.run_id if waiting else None


def respond(ref: str, answer: Any) -> None:
    """Answer the question ``ref``. Safe from any thread.

    Raises :class:`legion.HumanRequestNotFound` when no question with that
    ref is waiting (never asked, already answered, or timed out).
    """
    waiting = _pending.pop(ref, None)
    if waiting is None:
        raise HumanRequestNotFound(
            f"no human request {ref!r} is waiting for an answer (it was answered, "
            "timed out, or never asked)"
        )
    future = waiting.answer
    future.get_loop().call_soon_threadsafe(_settle, future, answer)


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
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        _pending[request.ref] = _Pending(request, answer)
        answering = _handler.get()
        task = asyncio.create_task(_ask_handler(answering, request)) if answering else None
        try:
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
        finally:
            _pending.pop(request.ref, None)
            if task is not None and not task.done():
                task.cancel()


async def _ask_handler(answering: HumanHandler, request: HumanRequest) -> None:
    try:
        value = answering(request)
        if inspect.isawaitable(value):
            value = await value
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The question stays open for respond(); the handler's failure is logged.
        log.warning("human_handler_failed", ref=request.ref, error=repr(exc))
        return
    with contextlib.suppress(HumanRequestNotFound):
        respond(request.ref, value)
