"""Long-lived agents: a conversation of turns with one agent.

    handle = await legion.start(Assistant, vault={"user_id": 42})
    first = await handle.call("Load the orders of last week")
    second = await handle.call("Which of them are late?")   # remembers the first turn
    turn = handle.cast("Email the customers of late orders")  # returns at once
    result = await handle.result_of(turn)
    await handle.stop()

Turns of one agent run one at a time, in the order they were sent; other
agents run concurrently. A turn that fails (its run raised) fails alone: its
caller gets the error, the history stays as it was before the turn, and the
next turn runs normally.

With ``binding_scope="conversation"`` the sandbox's variables also survive
between turns: the container is kept while the agent is busy and for
``idle_timeout`` seconds after; then the bindings are snapshotted (inside the
sandbox, to an opaque blob) and the container removed, and the next turn
restores them into a fresh one. The model is told which variables could not
be kept. With a durable store (:class:`legion.store.SQLiteStore`) the history
and the snapshot are saved after every turn, so ``legion.start(Agent,
conversation_id=...)`` resumes the conversation after a restart.

:func:`pool` puts several instances of one agent behind one handle; each
call goes to the least busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import human, telemetry
from ._driver import RunDriver, budget_of, current_budget, new_sandbox, prepare
from ._log import get_logger
from ._results import RunResult
from .agent import Agent, AgentDefinition, definition_of, resolve_tools
from .config import AgentConfig
from .errors import ConversationError, SandboxError, UsageError
from .models import Model
from .sandbox import Sandbox, SandboxRuntime
from .store import ConversationRecord, ConversationStore, MemoryStore

__all__ = ["AgentHandle", "AgentPool", "pool", "start"]

log = get_logger("legion.live")

_KEEP_RESULTS = 1000
"""Finished turns whose results :meth:`AgentHandle.result_of` still returns."""


@dataclass
class _Turn:
    id: str
    message: str
    result: asyncio.Future[RunResult]
    context: contextvars.Context = field(repr=False)
    """The caller's context when the turn was sent: the turn runs in it (so
    its telemetry, human handler and models are the caller's)."""
    task: asyncio.Task[RunResult] | None = field(default=None, repr=False)
    files: Mapping[str, bytes | str] | None = field(default=None, repr=False)


async def start(
    agent: type[Agent],
    *,
    vault: Mapping[str, Any] | None = None,
    model: Model | str | None = None,
    runtime: SandboxRuntime | None = None,
    conversation_id: str | None = None,
    store: ConversationStore | None = None,
    on_human: human.HumanHandler | None = None,
    meta: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> AgentHandle:
    """Start a long-lived ``agent`` (or resume the stored conversation
    ``conversation_id``; an id that is not stored starts a new conversation
    under that id).

    ``overrides`` are :class:`legion.AgentConfig` keys for every turn;
    ``on_human`` answers the agent's :class:`legion.Human` questions;
    ``store`` keeps the conversation (default: in memory); ``meta`` is stored
    with a new conversation.
    """
    definition = definition_of(agent)
    config, llm = prepare(definition, model, overrides)
    store = store if store is not None else MemoryStore()
    record = await store.load(conversation_id) if conversation_id else None
    if record is not None and record.agent != definition.name:
        raise ConversationError(
            f"conversation {conversation_id!r} belongs to agent {record.agent}, "
            f"not {definition.name}"
        )
    if record is None:
        record = ConversationRecord(
            id=conversation_id or uuid.uuid4().hex, agent=definition.name, meta=dict(meta or {})
        )
        await store.save(record)
    handle = AgentHandle(
        definition,
        config,
        llm,
        record=record,
        store=store,
        vault=vault,
        runtime=runtime,
        on_human=on_human,
    )
    telemetry.emit(
        telemetry.CONVERSATION_START,
        conversation_id=record.id,
        agent=definition.name,
        turns=record.turns,
    )
    return handle


class AgentHandle:
    """One long-lived agent. Made by :func:`start`."""

    def __init__(
        self,
        definition: AgentDefinition,
        config: AgentConfig,
        llm: Model,
        *,
        record: ConversationRecord,
        store: ConversationStore,
        vault: Mapping[str, Any] | None,
        runtime: SandboxRuntime | None,
        on_human: human.HumanHandler | None,
    ) -> None:
        self.definition = definition
        self.config = config
        self._llm = llm
        self._record = record
        self._store = store
        self._vault = dict(vault) if vault else None
        self._runtime = runtime
        self._on_human = on_human
        self._queue: asyncio.Queue[_Turn | None] = asyncio.Queue()
        self._turns: OrderedDict[str, _Turn] = OrderedDict()
        self._busy = 0
        self._stopped = False
        self._sandbox: Sandbox | None = None
        self._sandbox_lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._reclaiming: asyncio.Task[None] | None = None
        self._budget = budget_of(config, scope="conversation", parent=current_budget.get())
        """The config's budgets (max_tokens...) cover every turn together."""
        self._worker = asyncio.create_task(self._work(), name=f"legion-agent-{record.id}")

    # what callers see ---------------------------------------------------------

    @property
    def id(self) -> str:
        """The conversation id (pass it to :func:`start` to resume)."""
        return self._record.id

    @property
    def agent(self) -> str:
        return self.definition.name

    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation so far: system prompt first, then every finished turn."""
        return [dict(m) for m in self._record.messages]

    @property
    def turns(self) -> int:
        """Finished turns."""
        return self._record.turns

    @property
    def busy(self) -> int:
        """Turns queued or running."""
        return self._busy

    @property
    def container_id(self) -> str | None:
        """The container kept for ``conversation`` scope, if one is up."""
        return self._sandbox.container_id if self._sandbox is not None else None

    def cast(self, message: str, *, files: Mapping[str, bytes | str] | None = None) -> str:
        """Queue a turn; returns its id at once. ``files`` go into the work
        directory before the turn's first step, as with :func:`legion.run`. Its result comes from
        :meth:`result_of` and as a ``turn.result`` (or ``turn.error``) event.
        The turn runs in a copy of the caller's context (like a task), so
        ``legion.human.handler`` or ``use_models`` around the call apply."""
        if self._stopped:
            raise ConversationError(f"{self.agent} ({self.id}) is stopped; start it again")
        if not isinstance(message, str) or not message.strip():
            raise UsageError("a turn's message must be a non-empty string")
        turn = _Turn(
            uuid.uuid4().hex,
            message,
            asyncio.get_running_loop().create_future(),
            contextvars.copy_context(),
            files=files,
        )
        # Nobody may ever await a cast's result: keep an unretrieved error quiet.
        turn.result.add_done_callback(_retrieve)
        self._turns[turn.id] = turn
        while len(self._turns) > _KEEP_RESULTS:
            oldest = next(iter(self._turns.values()))
            if not oldest.result.done():
                break
            self._turns.popitem(last=False)
        self._busy += 1
        self._queue.put_nowait(turn)
        return turn.id

    async def call(
        self, message: str, *, files: Mapping[str, bytes | str] | None = None
    ) -> RunResult:
        """Run a turn after those already queued; return its result.
        Cancelling the call cancels the turn."""
        turn_id = self.cast(message, files=files)
        try:
            return await self.result_of(turn_id)
        except asyncio.CancelledError:
            self._cancel(self._turns[turn_id])
            raise

    async def result_of(self, turn_id: str) -> RunResult:
        """The result of a turn sent with :meth:`cast` (waits for it)."""
        turn = self._turns.get(turn_id)
        if turn is None:
            raise UsageError(f"no turn {turn_id!r} in conversation {self.id} (or it is too old)")
        return await asyncio.shield(turn.result)

    def respond(self, ref: str, answer: Any) -> None:
        """Answer a question this agent's code asked (see :mod:`legion.human`)."""
        human.respond(ref, answer)

    async def reclaim(self) -> None:
        """Snapshot the bindings and remove the container now, as the idle
        timeout does (``conversation`` scope only; otherwise nothing to do)."""
        async with self._sandbox_lock:
            await self._put_away()

    async def stop(self, *, cancel: bool = False) -> None:
        """Stop taking turns. Queued turns still run, unless ``cancel`` (then
        they fail with :class:`legion.ConversationError`, and a running one is
        cancelled). The conversation stays in the store: resume it with
        :func:`start`."""
        if not self._stopped:
            self._stopped = True
            if cancel:
                for turn in list(self._turns.values()):
                    self._cancel(turn)
            self._queue.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._worker)
        telemetry.emit(telemetry.CONVERSATION_STOP, conversation_id=self.id, agent=self.agent)

    async def __aenter__(self) -> AgentHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(cancel=exc[0] is not None)

    # the worker ---------------------------------------------------------------

    def _cancel(self, turn: _Turn) -> None:
        if turn.task is not None:
            turn.task.cancel()
        elif not turn.result.done():
            turn.result.set_exception(
                ConversationError(f"turn {turn.id} was cancelled before it ran")
            )

    async def _work(self) -> None:
        try:
            while (turn := await self._queue.get()) is not None:
                try:
                    if turn.result.done():  # cancelled while queued
                        continue
                    turn.task = asyncio.create_task(self._take(turn), context=turn.context)
                    try:
                        outcome = await asyncio.shield(turn.task)
                    except asyncio.CancelledError:
                        if not turn.task.cancelled():
                            raise  # the worker itself is being cancelled
                        _settle(turn, exc=ConversationError(f"turn {turn.id} was cancelled"))
                    except Exception as exc:
                        _settle(turn, exc=exc)
                    else:
                        _settle(turn, value=outcome)
                finally:
                    self._busy -= 1
                    if self._busy == 0 and not self._stopped:
                        self._arm_idle_timer()
        finally:
            self._stopped = True
            self._disarm_idle_timer()
            while not self._queue.empty():
                left = self._queue.get_nowait()
                if left is not None:
                    self._cancel(left)
            async with self._sandbox_lock:
                await self._put_away()

    async def _take(self, turn: _Turn) -> RunResult:
        self._disarm_idle_timer()
        if self._reclaiming is not None:
            await asyncio.shield(self._reclaiming)
        keeps_bindings = self.config.binding_scope == "conversation"
        note = ""
        await resolve_tools(self.definition, self._vault)
        if keeps_bindings and self._sandbox is None and self._record.snapshot:
            note = await self._restore()
        driver = RunDriver(
            self.definition,
            self.config,
            turn.message + note,
            llm=self._llm,
            vault=self._vault,
            runtime=self._runtime,
            history=self._record.messages,
            borrow=self._borrow if keeps_bindings else None,
            files=turn.files,
            budget=self._budget.child(scope=f"turn of {self.agent}"),
        )
        with (
            telemetry.run_context(driver.run_id, None),
            human.handler(self._on_human) if self._on_human else contextlib.nullcontext(),
        ):
            data = {"conversation_id": self.id, "turn_id": turn.id, "agent": self.agent}
            telemetry.emit(telemetry.TURN_START, **data)
            try:
                result = await driver.drive()
            except Exception as exc:
                telemetry.emit(telemetry.TURN_ERROR, **data, error=f"{type(exc).__name__}: {exc}")
                raise
            self._record = replace(
                self._record, messages=tuple(result.messages), turns=self._record.turns + 1
            )
            if keeps_bindings and self._store.durable:
                await self._snapshot_into_record()
            await self._store.save(self._record)
            telemetry.emit(telemetry.TURN_RESULT, **data, output=result.output)
            return result

    # conversation-scope bindings ----------------------------------------------

    async def _borrow(self) -> Sandbox:
        async with self._sandbox_lock:
            if self._sandbox is None:
                self._sandbox = await new_sandbox(
                    self.definition, self.config, self._vault, self._runtime
                )
            return self._sandbox

    async def _restore(self) -> str:
        """Bring the snapshot back into a fresh container; what to tell the model."""
        blob = self._record.snapshot
        assert blob is not None
        sandbox = await self._borrow()
        lost = dict(self._record.skipped)
        try:
            restored = await sandbox.restore(blob)
            lost.update(restored.failed)
        except SandboxError as exc:
            log.warning("restore_failed", conversation_id=self.id, error=str(exc))
            return (
                "\n\n[Note: your variables from earlier turns could not be restored "
                f"({exc}); compute again what you need.]"
            )
        telemetry.emit(
            telemetry.CONVERSATION_RESTORE,
            conversation_id=self.id,
            names=list(restored.names),
            lost=sorted(lost),
        )
        if not lost:
            return ""
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(lost.items()))
        return (
            "\n\n[Note: your variables were kept from earlier turns, except these, "
            f"which could not be kept: {listed}.]"
        )

    async def _snapshot_into_record(self) -> None:
        if self._sandbox is None or self._sandbox.container_id is None:
            return  # no container (a cancelled or crashed turn lost it): nothing to keep
        try:
            # The work directory too: a conversation's files outlive its container.
            snap = await self._sandbox.snapshot(include_files=True)
        except SandboxError as exc:
            log.warning("snapshot_failed", conversation_id=self.id, error=str(exc))
            return
        self._record = replace(self._record, snapshot=snap.blob, skipped=dict(snap.skipped))

    async def _put_away(self) -> None:
        """Snapshot (if not saved already) and remove the kept container.
        Called with the sandbox lock held."""
        sandbox = self._sandbox
        if sandbox is None:
            return
        try:
            if not self._store.durable:  # a durable store got it after the last turn
                await self._snapshot_into_record()
                await self._store.save(self._record)
        finally:
            self._sandbox = None
            await sandbox.close()
        telemetry.emit(telemetry.CONVERSATION_RECLAIM, conversation_id=self.id)

    def _arm_idle_timer(self) -> None:
        if self._sandbox is None:
            return
        self._disarm_idle_timer()
        self._idle = asyncio.get_running_loop().call_later(self.config.idle_timeout, self._on_idle)

    def _disarm_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _on_idle(self) -> None:
        self._idle = None
        if self._busy == 0 and self._reclaiming is None:
            self._reclaiming = asyncio.create_task(self._reclaim_when_idle())

    async def _reclaim_when_idle(self) -> None:
        try:
            await self.reclaim()
        except Exception as exc:
            log.warning("reclaim_failed", conversation_id=self.id, error=repr(exc))
        finally:
            self._reclaiming = None


def _settle(
    turn: _Turn, *, value: RunResult | None = None, exc: BaseException | None = None
) -> None:
    if turn.result.done():
        return
    if exc is not None:
        turn.result.set_exception(exc)
    else:
        assert value is not None
        turn.result.set_result(value)


def _retrieve(future: asyncio.Future[RunResult]) -> None:
    if not future.cancelled():
        future.exception()


class AgentPool:
    """Several long-lived instances of one agent; each turn goes to the least
    busy one. Made by :func:`pool`. Instances do not share history."""

    def __init__(self, members: list[AgentHandle]) -> None:
        self.members = members
        self._where: dict[str, AgentHandle] = {}

    def _least_busy(self) -> AgentHandle:
        return min(self.members, key=lambda m: m.busy)

    def cast(self, message: str, *, files: Mapping[str, bytes | str] | None = None) -> str:
        member = self._least_busy()
        turn_id = member.cast(message, files=files)
        self._where[turn_id] = member
        return turn_id

    async def call(
        self, message: str, *, files: Mapping[str, bytes | str] | None = None
    ) -> RunResult:
        return await self._least_busy().call(message, files=files)

    async def result_of(self, turn_id: str) -> RunResult:
        member = self._where.get(turn_id)
        if member is None:
            raise UsageError(f"no turn {turn_id!r} was cast to this pool")
        return await member.result_of(turn_id)

    async def stop(self, *, cancel: bool = False) -> None:
        await asyncio.gather(*(m.stop(cancel=cancel) for m in self.members))


async def pool(agent: type[Agent], size: int, **start_kwargs: Any) -> AgentPool:
    """Start ``size`` instances of ``agent`` (each with :func:`start` and
    ``start_kwargs``) behind one :class:`AgentPool`."""
    if not isinstance(size, int) or size < 1:
        raise UsageError(f"a pool needs a size of at least 1, got {size!r}")
    if "conversation_id" in start_kwargs:
        raise UsageError("a pool's members each have their own conversation; drop conversation_id")
    members = [await start(agent, **start_kwargs) for _ in range(size)]
    return AgentPool(members)
