"""The controller service: ``controller.proto`` served on grpc.aio.

Every call is served as the principal :class:`~legion.server.auth.AuthInterceptor`
found for it. A run started here belongs to its caller, and so do the runs it
starts (sub-agents): the run's task carries a context variable naming it, and
every telemetry event emitted in that context (on the loop, or on a tool's
thread) is routed to the run's own stream and to its owner's ``Events``
streams, never to anyone else's, but for approval requests: those also go
to the streams of the approvers they name, and, for an approver written
``role:NAME``, to every open stream whose principal holds that role (its
vault's ``roles``; principals cannot be listed, so nobody is told who they
are). The caller's vault values (from the authenticator, never from the
request) are bound around the run.

Streams buffer a bounded number of events; a client too slow to read them
loses the overflow (logged), the server never grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import grpc.aio

from .. import human, telemetry
from .. import live as live_agents
from .. import vault as _vault
from .._api_codec import (
    AgentInfo,
    SandboxInfo,
    agent_message,
    answer_of,
    config_of,
    error_message,
    event_message,
    files_of,
    result_message,
    sandbox_message,
)
from .._budget import PrincipalBudget, day_of
from .._ctx import bound
from .._driver import current_budget, image_packages
from .._log import get_logger
from .._proto import controller_pb2 as pb
from .._proto import controller_pb2_grpc as pb_grpc
from .._results import RunResult
from .._run_files import check_input
from ..agent import Agent, definition_of
from ..agent import run as run_agent
from ..config import (
    BUDGET_KEYS,
    AgentConfig,
    MiB,
    SandboxLimits,
    check_config_keys,
    resolve_agent_config,
)
from ..errors import (
    ConversationError,
    HumanRequestNotFound,
    LegionError,
    RunError,
    SandboxError,
    UsageError,
)
from ..prompt import build_system_prompt
from ..sandbox import SandboxRuntime
from ..store import ConversationStore, MemoryStore, UsageStore
from ..tool import may_decide, who_decides
from .auth import Principal, current_principal

__all__ = ["CLIENT_CONFIG_KEYS", "SERVICE_NAME", "ControllerService"]

log = get_logger("legion.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Controller"].full_name

CLIENT_CONFIG_KEYS = frozenset(
    {
        "temperature",
        "max_iterations",
        "max_retries",
        "sandbox_timeout",
        "binding_scope",
        "max_message_length",
        "model_timeout",
        "model_retries",
        "model_retry_backoff",
        *BUDGET_KEYS,
    }
)
"""AgentConfig keys a request's ``config_json`` may set. The others (model,
api_base, api_key, sandbox_limits) are the server's: a client that could set
``api_base`` would receive the server's model API key. A budget
(``max_tokens``...) may only be lowered below the server's."""

EVENT_BUFFER = 1000
"""Events one stream holds for a client that reads slowly; more are dropped."""


# --- which run is whose -------------------------------------------------------


@dataclass(eq=False)
class _Served:
    """A run this server started for a principal (with its sub-agents' runs)."""

    principal: Principal
    service: object
    """The ControllerService that started it (a process may hold several)."""
    conversation_id: str = ""
    run_id: str = ""
    """The first run seen in its context: the run itself."""
    run_ids: set[str] = field(default_factory=set)
    updates: asyncio.Queue[pb.Event | None] = field(default_factory=asyncio.Queue)
    """Its stream's events; None once the run's task is done."""
    streamed: bool = True
    """False for work nobody streams (a cast turn): its events go to Events only."""
    dropped: int = 0


_serving: ContextVar[_Served | None] = ContextVar("legion_served_run", default=None)

_TURN_ENDS = (telemetry.TURN_RESULT, telemetry.TURN_ERROR)
"""The events that end a turn."""

_APPROVAL_EVENTS = frozenset(
    {telemetry.TOOL_APPROVAL, telemetry.TOOL_APPROVAL_DECISION, telemetry.TOOL_APPROVAL_TIMEOUT}
)

MAX_REASON = 4000
"""Characters of an approval's reason kept (the code and the model read it)."""


def _approvers_of(event: telemetry.Event) -> frozenset[str]:
    """Who an approval event also goes to (besides the run's own principal):
    the approvers it names (principals, or ``role:NAME``), who may not own the run."""
    if event.name not in _APPROVAL_EVENTS:
        return frozenset()
    named = event.data.get("approvers")
    return (
        frozenset(a for a in named if isinstance(a, str))
        if isinstance(named, list)
        else frozenset()
    )


@dataclass(eq=False)
class _Conversation:
    """A long-lived agent this server started, and whose it is."""

    principal: str
    agent: str
    """The agent's name in this server's registry."""
    handle: live_agents.AgentHandle


@dataclass(eq=False)
class _Subscriber:
    """One Events stream."""

    principal: str
    run_ids: set[str]
    """Empty: every run of the principal. Grows with the runs they start."""
    conversation_id: str
    prefixes: tuple[str, ...]
    roles: frozenset[str] = frozenset()
    """The principal's roles when it subscribed: approvals for them come here too."""
    queue: asyncio.Queue[pb.Event | None] = field(default_factory=asyncio.Queue)
    dropped: int = 0

    def wants(self, event: pb.Event) -> bool:
        if self.run_ids and event.run_id not in self.run_ids:
            if event.parent_run_id not in self.run_ids:
                return False
            self.run_ids.add(event.run_id)
        if self.conversation_id and event.conversation_id != self.conversation_id:
            return False
        return not self.prefixes or event.name.startswith(self.prefixes)


def _offer(queue: asyncio.Queue[pb.Event | None], event: pb.Event, owner: Any, what: str) -> None:
    if queue.qsize() < EVENT_BUFFER:
        queue.put_nowait(event)
        return
    owner.dropped += 1
    if owner.dropped == 1 or owner.dropped % 1000 == 0:
        log.warning("events_dropped", stream=what, dropped=owner.dropped, buffer=EVENT_BUFFER)


# --- what clients see of agents and sandboxes ------------------------------------------


def _describe(
    name: str, agent: type[Agent], run_config: Mapping[str, Any], runtime: SandboxRuntime | None
) -> AgentInfo:
    definition = definition_of(agent)
    tools: list[str] = []
    for tool in definition.tools:
        if tool.definition.is_function:
            tools.append(tool.name)
        else:
            tools.extend(f"{tool.name}.{fn}" for fn in tool.definition.functions)
    image, listed = "", []
    try:
        config = resolve_agent_config(definition.config, dict(run_config), where=f"{name}.config")
        image = config.image or (runtime.image if runtime is not None else "")
        packages = image_packages(config, runtime)  # the runtime's image, unless it has one
        listed = [f"{p.name} {p.version}" for p in packages]
        prompt = build_system_prompt(definition, config, packages=packages)
    except LegionError as exc:
        prompt = f"(cannot build the prompt: {exc})"
    return AgentInfo(
        name,
        definition.doc,
        tools,
        definition.output_json_schema,
        prompt,
        image=image,
        packages=listed,
    )


def _only_lower(overrides: Mapping[str, Any], server: AgentConfig) -> None:
    """UsageError for a client's budget above the server's own (or lifting it)."""
    for key in BUDGET_KEYS:
        ours = getattr(server, key)
        if key in overrides and ours is not None:
            theirs = overrides[key]
            if theirs is None or (isinstance(theirs, (int, float)) and theirs > ours):
                raise UsageError(
                    f"config key {key}={theirs!r} is above the server's {ours!r}; a client "
                    "may only lower a budget"
                )


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


# --- the servicer -------------------------------------------------------------------


class ControllerService(pb_grpc.ControllerServicer):
    """The Controller servicer. Add it to a grpc.aio server behind an
    :class:`~legion.server.auth.AuthInterceptor`, call :meth:`start` on the
    server's loop, and :meth:`aclose` when done (``legion serve`` does all that).

    ``agents`` maps the names clients use to agent classes. ``runtime`` runs
    every sandbox (None: legion's default runtime). ``run_config`` holds
    AgentConfig keys applied to every run, over the agents' own config; a
    request's ``config_json`` goes over those, for :data:`CLIENT_CONFIG_KEYS`
    only. ``max_concurrent_runs`` is the per-principal limit for principals
    that do not set their own; ``max_conversations`` the number of long-lived
    agents one principal may have running. ``store`` keeps the long-lived
    agents' conversations (``legion serve`` uses SQLite; default: memory).
    ``images`` maps agent names to the image (environment) their runs use,
    over their own config and ``run_config``; others use their config's, or
    the runtime's.

    Each principal's budgets (``max_tokens_per_day``...) are enforced across
    its runs: a run, turn or agent start that finds one spent is refused
    RESOURCE_EXHAUSTED, naming it and when it resets, and a run that spends
    it stops with ``UsageLimitExceeded``. What each principal spent per UTC
    day is saved in ``store`` (when it is a :class:`~legion.store.UsageStore`,
    as both shipped stores are) after each run and at shutdown.
    """

    def __init__(
        self,
        agents: Mapping[str, type[Agent]],
        *,
        runtime: SandboxRuntime | None = None,
        run_config: Mapping[str, Any] | None = None,
        max_concurrent_runs: int = 4,
        max_event_streams: int = 16,
        max_conversations: int = 32,
        store: ConversationStore | None = None,
        images: Mapping[str, str] | None = None,
    ) -> None:
        self.agents = dict(agents)
        self.runtime = runtime
        self.run_config = dict(run_config or {})
        check_config_keys(self.run_config, "the server's run_config")
        self.images = dict(images or {})
        unknown = sorted(set(self.images) - set(self.agents))
        if unknown:
            raise UsageError(
                f"images name agent(s) {unknown} that this server does not offer; "
                f"it offers: {', '.join(sorted(self.agents))}"
            )
        self._infos = [
            agent_message(_describe(name, agent, self._config_of(name), runtime))
            for name, agent in sorted(self.agents.items())
        ]
        if min(max_concurrent_runs, max_event_streams, max_conversations) < 1:
            raise UsageError(
                "max_concurrent_runs, max_event_streams and max_conversations must be at least 1"
            )
        self.max_conversations = max_conversations
        self.store: ConversationStore = store if store is not None else MemoryStore()
        self._conversations: dict[str, _Conversation] = {}
        self._usage_store: UsageStore = (
            self.store if isinstance(self.store, UsageStore) else MemoryStore()
        )
        self._budgets: dict[str, PrincipalBudget] = {}
        self.max_concurrent_runs = max_concurrent_runs
        self.max_event_streams = max_event_streams
        self._active: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[RunResult]] = set()
        self._owners: dict[str, _Served] = {}
        self._subscribers: set[_Subscriber] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._unsubscribe: Callable[[], None] | None = None

    def _config_of(self, name: str) -> dict[str, Any]:
        """The server's AgentConfig keys for runs of the agent it calls ``name``."""
        image = self.images.get(name)
        return {**self.run_config, "image": image} if image else dict(self.run_config)

    # lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start routing telemetry to the streams (on the loop that serves)."""
        if self._unsubscribe is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._unsubscribe = telemetry.subscribe(self._on_event)

    @property
    def runs_in_flight(self) -> int:
        return len(self._tasks)

    def begin_shutdown(self) -> None:
        """Refuse new runs and end every Events stream (UNAVAILABLE)."""
        self._stopping = True
        for subscriber in self._subscribers:
            subscriber.queue.put_nowait(None)

    async def drain(self, grace: float) -> None:
        """Let runs in flight finish for up to ``grace`` seconds, then cancel
        the rest (their streams end UNAVAILABLE) and wait until they are gone."""
        self.begin_shutdown()
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self._tasks:
            log.info("runs_cancelled", count=len(self._tasks), reason="the server is shutting down")
        for task in self._tasks:
            task.cancel()
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        # Long-lived agents: queued turns are cancelled; what finished is in the store.
        conversations, self._conversations = list(self._conversations.values()), {}
        await asyncio.gather(
            *(c.handle.stop(cancel=True) for c in conversations), return_exceptions=True
        )

    async def aclose(self) -> None:
        await self.drain(0)
        for name in list(self._budgets):
            await self._save_usage(name)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # routing events ---------------------------------------------------------------

    def _on_event(self, event: telemetry.Event) -> None:
        served = _serving.get()
        if served is None or served.service is not self:
            served = self._owners.get(event.run_id or "") or self._owners.get(
                event.parent_run_id or ""
            )
            if served is None:
                return
        message = event_message(event, served.conversation_id)
        approvers = _approvers_of(event)
        if threading.get_ident() == self._loop_thread:
            self._dispatch(served, message, approvers)
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._dispatch, served, message, approvers)

    def _dispatch(
        self, served: _Served, event: pb.Event, approvers: frozenset[str] = frozenset()
    ) -> None:
        if event.run_id and event.run_id not in served.run_ids:
            served.run_ids.add(event.run_id)
            self._owners[event.run_id] = served
            served.run_id = served.run_id or event.run_id
        if served.streamed:
            _offer(served.updates, event, served, f"run {served.run_id}")
        elif event.name in _TURN_ENDS and event.run_id == served.run_id:
            for run_id in served.run_ids:  # a cast turn is over: nobody asks about it again
                self._owners.pop(run_id, None)
        for subscriber in self._subscribers:
            reader = subscriber.principal
            if (
                reader == served.principal.name
                or (approvers and may_decide(approvers, reader, subscriber.roles))
            ) and subscriber.wants(event):
                _offer(subscriber.queue, event, subscriber, f"events of {subscriber.principal}")

    # shared checks ----------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = current_principal()
        if principal is None:
            await _abort(
                context, grpc.StatusCode.UNAUTHENTICATED, "the server checks no credentials"
            )
        return principal

    async def _open(self, context: grpc.aio.ServicerContext) -> None:
        if self._stopping:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    async def _agent(self, name: str, context: grpc.aio.ServicerContext) -> type[Agent]:
        agent = self.agents.get(name)
        if agent is None:
            offered = ", ".join(sorted(self.agents)) or "none"
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no agent named {name[:200]!r} here; this server offers: {offered}",
            )
        return agent

    async def _overrides(
        self,
        agent: type[Agent],
        config_json: str,
        context: grpc.aio.ServicerContext,
        *,
        long_lived: bool = False,
    ) -> dict[str, Any]:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        name = definition_of(agent).name
        try:
            overrides = config_of(config_json)
            check_config_keys(overrides, "config_json")
            reserved = sorted(set(overrides) - CLIENT_CONFIG_KEYS)
            if reserved:
                raise UsageError(
                    f"config key {reserved[0]!r} is the server's to set, not a client's; "
                    f"config_json may set: {', '.join(sorted(CLIENT_CONFIG_KEYS))}"
                )
            config = resolve_agent_config(
                definition_of(agent).config,
                {**self.run_config, **overrides},
                where=f"{name}.config",
            )
            _only_lower(
                overrides, resolve_agent_config(definition_of(agent).config, self.run_config)
            )
        except (UsageError, TypeError) as exc:
            await _abort(context, invalid, str(exc))
        if config.binding_scope == "conversation" and not long_lived:
            await _abort(
                context,
                invalid,
                "binding_scope 'conversation' is for long-lived agents; a run uses "
                "'turn' (default) or 'iteration'",
            )
        return dict(overrides)

    async def _reserve(self, principal: Principal, context: grpc.aio.ServicerContext) -> None:
        limit = principal.max_concurrent_runs or self.max_concurrent_runs
        if self._active[principal.name] >= limit:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{principal.name} already has {self._active[principal.name]} runs in flight, "
                f"the most allowed (max_concurrent_runs={limit}); wait for one to finish",
            )

    # budgets ---------------------------------------------------------------------------

    async def _budget(self, principal: Principal) -> PrincipalBudget:
        """The principal's budget node (its day's usage loaded from the store)."""
        node = self._budgets.get(principal.name)
        if node is None:
            today = day_of(time.time())
            spent = await self._usage_store.load_usage(principal.name, today)
            node = self._budgets.setdefault(
                principal.name, PrincipalBudget(principal.name, days={today: spent})
            )
        node.configure(principal.budgets)  # the authenticator's figures, as of this call
        return node

    async def _within_budget(
        self,
        principal: Principal,
        context: grpc.aio.ServicerContext,
        *,
        sandbox: AgentConfig | None = None,
    ) -> PrincipalBudget:
        """RESOURCE_EXHAUSTED when a daily budget of the principal is spent,
        or (given the run's config) its sandbox would not fit."""
        node = await self._budget(principal)
        memory = None
        if sandbox is not None:
            limits = sandbox.sandbox_limits or (
                self.runtime.limits if self.runtime is not None else SandboxLimits()
            )
            memory = limits.memory_mb
        exceeded = node.check_start(memory)
        if exceeded is not None:
            log.info("budget_refused", principal=principal.name, budget=exceeded.limit)
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{principal.name}: {exceeded.describe()}",
            )
        return node

    async def _save_usage(self, name: str) -> None:
        node = self._budgets.get(name)
        if node is None:
            return
        days = node.unsaved()
        try:
            for day, usage in days.items():
                await self._usage_store.save_usage(name, day, usage)
        except Exception as exc:  # a full disk must not fail the run that ended
            log.error("usage_not_saved", principal=name, error=repr(exc))
            return
        node.saved(days)

    # one run as a stream of updates ------------------------------------------------

    def _launch(
        self, served: _Served, work: Callable[[], Awaitable[RunResult]]
    ) -> asyncio.Task[RunResult]:
        context = contextvars.copy_context()
        context.run(_serving.set, served)
        context.run(_vault._overlay, served.principal.vault)
        budget = self._budgets.get(served.principal.name)
        if budget is not None:  # the principal's budgets are above every run it starts
            context.run(current_budget.set, budget)

        async def runner() -> RunResult:
            try:
                return await work()
            finally:
                await self._save_usage(served.principal.name)

        task = asyncio.create_task(runner(), context=context)
        name = served.principal.name
        self._active[name] += 1
        self._tasks.add(task)

        def finished(task: asyncio.Task[RunResult]) -> None:
            self._active[name] -= 1
            if not self._active[name]:
                del self._active[name]
            self._tasks.discard(task)
            for run_id in served.run_ids:
                self._owners.pop(run_id, None)
            served.updates.put_nowait(None)

        task.add_done_callback(finished)
        return task

    async def _stream_run(
        self,
        context: grpc.aio.ServicerContext,
        principal: Principal,
        work: Callable[[], Awaitable[RunResult]],
        *,
        conversation_id: str = "",
    ) -> AsyncIterator[pb.RunUpdate]:
        """Run ``work`` (an agent run or a turn) as ``principal``; yield its
        events as they happen, then exactly one RunResult or RunError. If the
        client goes away, the run is cancelled (which removes its sandbox)."""
        served = _Served(principal, self, conversation_id=conversation_id)
        task = self._launch(served, work)
        try:
            while (event := await served.updates.get()) is not None:
                yield pb.RunUpdate(event=event)
            yield await self._outcome(task, served, context)
        finally:
            if not task.done():
                log.info("run_cancelled", run_id=served.run_id, reason="the client went away")
                task.cancel()
                await asyncio.wait({task})

    async def _outcome(
        self, task: asyncio.Task[RunResult], served: _Served, context: grpc.aio.ServicerContext
    ) -> pb.RunUpdate:
        who = served.principal.name
        if task.cancelled():
            log.info("run_finished", principal=who, run_id=served.run_id, outcome="cancelled")
            if self._stopping:
                await _abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    "the server is shutting down; the run was cancelled",
                )
            await _abort(context, grpc.StatusCode.CANCELLED, "the run was cancelled")
        exc = task.exception()
        if exc is None:
            log.info("run_finished", principal=who, run_id=served.run_id, outcome="result")
            return pb.RunUpdate(result=result_message(task.result()))
        if not isinstance(exc, (RunError, SandboxError, UsageError)):
            log.error(
                "run_failed", principal=who, run_id=served.run_id, error=repr(exc), exc_info=exc
            )
        else:
            log.info(
                "run_finished", principal=who, run_id=served.run_id, outcome=type(exc).__name__
            )
        return pb.RunUpdate(error=error_message(exc, served.run_id))

    # the RPCs -----------------------------------------------------------------------

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        principal = await self._caller(context)
        return pb.ListAgentsResponse(agents=self._infos, principal=principal.name)

    async def Run(
        self, request: pb.RunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunUpdate]:
        principal = await self._caller(context)
        await self._open(context)
        agent = await self._agent(request.agent, context)
        task = request.task
        if not task.strip():
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "task must be a non-empty string"
            )
        overrides = await self._overrides(agent, request.config_json, context)
        options = {**self._config_of(request.agent), **overrides}
        files = await self._files(request.files, context)
        await self._reserve(principal, context)
        config = resolve_agent_config(
            definition_of(agent).config, options, where=f"{request.agent}.config"
        )
        await self._within_budget(principal, context, sandbox=config)
        log.info("run_requested", principal=principal.name, agent=request.agent)

        def work() -> Awaitable[RunResult]:
            return run_agent(
                agent, task, vault=principal.vault, runtime=self.runtime, files=files, **options
            )

        async for update in self._stream_run(context, principal, work):
            yield update

    async def StartAgent(
        self, request: pb.StartAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartAgentResponse:
        principal = await self._caller(context)
        await self._open(context)
        agent = await self._agent(request.agent, context)
        overrides = await self._overrides(agent, request.config_json, context, long_lived=True)
        cid = request.conversation_id
        live = self._conversations.get(cid) if cid else None
        if live is not None:
            await self._check_owner(live.principal, principal, f"conversation {cid}", context)
            await self._same_agent(cid, live.agent, request.agent, context)
            return pb.StartAgentResponse(conversation_id=cid, turns=live.handle.turns)
        if cid:
            record = await self.store.load(cid)
            if record is None:
                await _abort(
                    context,
                    grpc.StatusCode.NOT_FOUND,
                    f"no conversation {cid[:100]!r} is stored here; leave conversation_id "
                    "empty to start a new one",
                )
            owner = str(record.meta.get("principal", ""))
            await self._check_owner(owner, principal, f"conversation {cid}", context)
            await self._same_agent(cid, str(record.meta.get("agent")), request.agent, context)
            if not request.config_json.strip():  # resume with the settings it had
                overrides = dict(record.meta.get("config") or {})
        mine = sum(c.principal == principal.name for c in self._conversations.values())
        if mine >= self.max_conversations:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{principal.name} already has {mine} long-lived agents running, the most "
                f"allowed (max_conversations={self.max_conversations}); stop one first",
            )
        node = await self._within_budget(principal, context)
        try:
            with bound(current_budget, node):  # its turns spend the principal's day
                handle = await live_agents.start(
                    agent,
                    vault=principal.vault,
                    runtime=self.runtime,
                    store=self.store,
                    conversation_id=cid or None,
                    meta={"principal": principal.name, "agent": request.agent, "config": overrides},
                    **{**self._config_of(request.agent), **overrides},
                )
        except (UsageError, ConversationError) as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._conversations[handle.id] = _Conversation(principal.name, request.agent, handle)
        log.info(
            "agent_started", principal=principal.name, agent=request.agent, conversation=handle.id
        )
        return pb.StartAgentResponse(conversation_id=handle.id, turns=handle.turns)

    async def _conversation(
        self, principal: Principal, cid: str, context: grpc.aio.ServicerContext
    ) -> live_agents.AgentHandle:
        live = self._conversations.get(cid)
        if live is None:
            stored = await self.store.load(cid) if cid else None
            hint = (
                "it is stored: resume it with StartAgent(conversation_id=...)"
                if stored is not None
                else "start one with StartAgent"
            )
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no long-lived agent is running for conversation {cid[:100]!r}; {hint}",
            )
        await self._check_owner(live.principal, principal, f"conversation {cid}", context)
        return live.handle

    async def _same_agent(
        self, cid: str, agent: str, asked: str, context: grpc.aio.ServicerContext
    ) -> None:
        if agent != asked:
            await _abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"conversation {cid} is with agent {agent!r}, not {asked!r}",
            )

    async def _check_owner(
        self, owner: str, principal: Principal, what: str, context: grpc.aio.ServicerContext
    ) -> None:
        if owner != principal.name:
            await _abort(
                context, grpc.StatusCode.PERMISSION_DENIED, f"{what} belongs to another principal"
            )

    async def _message(self, message: str, context: grpc.aio.ServicerContext) -> None:
        if not message.strip():
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "message must be a non-empty string"
            )

    async def _files(
        self, given: Iterable[pb.FileData], context: grpc.aio.ServicerContext
    ) -> dict[str, bytes]:
        """A request's files, checked as a run checks them (INVALID_ARGUMENT)."""
        try:
            return check_input(files_of(given))
        except UsageError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunUpdate]:
        principal = await self._caller(context)
        await self._open(context)
        await self._message(request.message, context)
        files = await self._files(request.files, context)
        handle = await self._conversation(principal, request.conversation_id, context)
        await self._reserve(principal, context)
        await self._within_budget(principal, context)

        def work() -> Awaitable[RunResult]:
            # The turn runs in the call's context.
            return handle.call(request.message, files=files)

        async for update in self._stream_run(context, principal, work, conversation_id=handle.id):
            yield update

    async def Cast(
        self, request: pb.CastRequest, context: grpc.aio.ServicerContext
    ) -> pb.CastResponse:
        principal = await self._caller(context)
        await self._open(context)
        await self._message(request.message, context)
        files = await self._files(request.files, context)
        handle = await self._conversation(principal, request.conversation_id, context)
        await self._within_budget(principal, context)
        served = _Served(principal, self, conversation_id=handle.id, streamed=False)
        turn_context = contextvars.copy_context()
        turn_context.run(_serving.set, served)
        try:
            turn_id = turn_context.run(functools.partial(handle.cast, request.message, files=files))
        except ConversationError as exc:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.CastResponse(turn_id=turn_id)

    async def StopAgent(
        self, request: pb.StopAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopAgentResponse:
        principal = await self._caller(context)
        handle = await self._conversation(principal, request.conversation_id, context)
        self._conversations.pop(handle.id, None)
        await handle.stop(cancel=True)
        log.info("agent_stopped", principal=principal.name, conversation=handle.id)
        return pb.StopAgentResponse()

    async def Events(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Event]:
        principal = await self._caller(context)
        await self._open(context)
        for run_id in request.run_ids:
            owner = self._owners.get(run_id)
            if owner is not None and owner.principal.name != principal.name:
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"run {run_id} belongs to another principal",
                )
        streams = sum(s.principal == principal.name for s in self._subscribers)
        if streams >= self.max_event_streams:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{principal.name} already has {streams} Events streams open, the most allowed; "
                "close one first",
            )
        subscriber = _Subscriber(
            principal.name,
            set(request.run_ids),
            request.conversation_id,
            tuple(request.name_prefixes),
            human.roles_of(principal.vault),
        )
        self._subscribers.add(subscriber)
        try:
            # Headers tell the client that the subscription is live.
            await context.send_initial_metadata(())
            while (event := await subscriber.queue.get()) is not None:
                yield event
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        finally:
            self._subscribers.discard(subscriber)

    async def RespondHuman(
        self, request: pb.RespondHumanRequest, context: grpc.aio.ServicerContext
    ) -> pb.RespondHumanResponse:
        principal = await self._caller(context)
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not request.ref:
            await _abort(context, invalid, "ref is empty: give the ref of a human.request event")
        try:
            answer = answer_of(request.answer_json)
        except UsageError as exc:
            await _abort(context, invalid, str(exc))
        run_id = human.run_of(request.ref)
        if run_id is None:
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no human request {request.ref[:100]!r} is waiting for an answer",
            )
        owner = self._owners.get(run_id)
        if owner is None or owner.principal.name != principal.name:
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"human request {request.ref!r} belongs to another principal's run",
            )
        try:
            human.respond(request.ref, answer)
        except HumanRequestNotFound as exc:  # answered or timed out meanwhile
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except UsageError as exc:  # an approval request: RespondApproval decides those
            await _abort(context, invalid, str(exc))
        return pb.RespondHumanResponse()

    async def RespondApproval(
        self, request: pb.RespondApprovalRequest, context: grpc.aio.ServicerContext
    ) -> pb.RespondApprovalResponse:
        principal = await self._caller(context)
        ref = request.ref
        if not ref:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "ref is empty: give the ref of a tool.approval event",
            )
        held = human.approval_of(ref)
        owner = self._owners.get(held.run_id or "") if held is not None else None
        if held is None or owner is None:  # another server's runs are not ours to decide
            await _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no approval request {ref[:100]!r} is waiting for a decision",
            )
        roles = human.roles_of(principal.vault)
        if held.approvers and not may_decide(held.approvers, principal.name, roles):
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"approval {ref!r} is for {who_decides(held.approvers)} to decide, "
                f"not {principal.name}",
            )
        if not held.approvers and owner.principal.name != principal.name:
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"approval {ref!r} belongs to another principal's run",
            )
        try:
            human.respond_approval(
                ref,
                approved=request.approved,
                reason=request.reason[:MAX_REASON],
                principal=principal.name,
                roles=roles,
            )
        except HumanRequestNotFound as exc:  # decided or timed out meanwhile
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        log.info("approval_decided", principal=principal.name, ref=ref, approved=request.approved)
        return pb.RespondApprovalResponse()

    async def ListSandboxes(
        self, request: pb.ListSandboxesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSandboxesResponse:
        principal = await self._caller(context)
        if self.runtime is None:
            return pb.ListSandboxesResponse()
        try:
            live = await self.runtime.sandboxes()
        except SandboxError as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, f"cannot list sandboxes: {exc}")
        mine = []
        for info in live:
            owner = self._owners.get(info.run_id or "")
            if owner is None or owner.principal.name != principal.name:
                continue
            limits = info.limits
            mine.append(
                sandbox_message(
                    SandboxInfo(
                        info.container_id,
                        info.run_id or "",
                        info.agent or "",
                        info.age_seconds,
                        info.memory_bytes or 0,
                        memory_limit_bytes=limits.memory_mb * MiB if limits else 0,
                        cpus=limits.cpus if limits else 0.0,
                        pids=limits.pids if limits else 0,
                        cpu_seconds=info.cpu_seconds or 0.0,
                        peak_memory_bytes=info.peak_memory_bytes or 0,
                    )
                )
            )
        return pb.ListSandboxesResponse(sandboxes=mine)
