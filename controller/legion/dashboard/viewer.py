"""One principal's live view: a :class:`legion.Client` with that principal's
token, its ``Events`` stream feeding a :class:`~legion.dashboard.state.LiveState`,
and the pages listening for the state's patches (server-sent events).

Every action (answering a human, calling a long-lived agent, listing
sandboxes) is a call of that client: the controller checks the token and the
ownership of runs and conversations exactly as it does for any gRPC client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .. import telemetry
from .._log import get_logger
from ..client import Client, EventStream
from ..errors import LegionError
from .state import LiveState, Patch

__all__ = ["Listener", "Viewer"]

log = get_logger("legion.dashboard")

LISTENER_BUFFER = 2000
"""Patches one page may fall behind by; past that its stream ends and the
browser reconnects, receiving the whole of its lists again."""
SANDBOX_READ_GAP = 1.0
"""Seconds between two readings of the sandboxes, at the most often."""
SANDBOX_EVENTS = frozenset(
    {
        telemetry.RUN_START,
        telemetry.RUN_STOP,
        telemetry.RUN_EXCEPTION,
        telemetry.SANDBOX_EVAL_START,
        telemetry.SANDBOX_EVAL_STOP,
        telemetry.SANDBOX_EVAL_EXCEPTION,
        telemetry.ITERATION_START,
        telemetry.ITERATION_STOP,
        telemetry.ITERATION_EXCEPTION,
        telemetry.TOOL_CALL_STOP,
        telemetry.HUMAN_REQUEST,
        telemetry.HUMAN_RESPONSE,
        telemetry.HUMAN_TIMEOUT,
    }
)
"""Events after which the sandboxes are read again (when a page shows them)."""


@dataclass(eq=False)
class Listener:
    """One open page: the topics it shows and the patches waiting for it.
    None in the queue ends its stream."""

    topics: frozenset[str]
    queue: asyncio.Queue[Patch | None] = field(default_factory=asyncio.Queue)
    ended: bool = False

    def offer(self, patch: Patch | None) -> None:
        if self.ended:
            return
        if patch is None or self.queue.qsize() >= LISTENER_BUFFER:
            self.ended = True  # too far behind: it reconnects and starts afresh
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(patch)


class Viewer:
    """The live view of one principal (see the module docstring)."""

    def __init__(self, client: Client, principal: str) -> None:
        self.client = client
        self.principal = principal
        self.state = LiveState(principal)
        self.listeners: set[Listener] = set()
        self.connected = False
        self._stream: EventStream | None = None
        self._pump: asyncio.Task[None] | None = None
        self._turns: set[asyncio.Task[None]] = set()
        self._sandboxes_wanted = asyncio.Event()
        self._sandbox_reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Subscribe to the principal's events; returns once the server has.
        Raises the client's errors (e.g. ResourceExhausted: too many streams)."""
        stream = self.client.events()
        await stream.open()
        self._stream = stream
        self.connected = True
        self._pump = asyncio.create_task(self._read(stream), name="legion-dashboard-events")

    async def _read(self, stream: EventStream) -> None:
        try:
            async for event in stream:
                self.publish(self.state.apply(event))
                if event.name in SANDBOX_EVENTS:
                    self.want_sandboxes()
        except LegionError as exc:
            log.info("dashboard_events_ended", principal=self.principal, reason=str(exc))
        finally:
            self.connected = False
            for listener in list(self.listeners):
                listener.offer(None)

    async def close(self) -> None:
        """End the pages' streams, cancel what runs, close the client."""
        if self._stream is not None:
            self._stream.close()
        tasks = [t for t in (self._pump, self._sandbox_reader, *self._turns) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in list(self.listeners):
            listener.offer(None)
        await self.client.close()

    # pages -----------------------------------------------------------------------------

    def publish(self, patches: Iterable[Patch]) -> None:
        """Send patches to the pages that show their topics."""
        patches = list(patches)
        for listener in list(self.listeners):
            for patch in patches:
                if patch.topic in listener.topics:
                    listener.offer(patch)

    def listen(self, topics: Iterable[str]) -> Listener:
        """A page opened: it gets the whole of its topics first, then changes."""
        listener = Listener(frozenset(topics))
        for topic in listener.topics:
            for patch in self.state.snapshot(topic):
                listener.offer(patch)
        self.listeners.add(listener)
        if "sandboxes" in listener.topics:
            self.want_sandboxes()
        return listener

    def unlisten(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    # sandboxes ---------------------------------------------------------------------------

    def want_sandboxes(self) -> None:
        """Read the sandboxes again soon, if a page shows them."""
        if not any("sandboxes" in listener.topics for listener in self.listeners):
            return
        self._sandboxes_wanted.set()
        if self._sandbox_reader is None or self._sandbox_reader.done():
            self._sandbox_reader = asyncio.create_task(self._read_sandboxes())

    async def read_sandboxes(self) -> None:
        """Read the principal's sandboxes now (ListSandboxes) and publish them."""
        try:
            found = await self.client.list_sandboxes()
        except LegionError as exc:
            log.info("dashboard_sandboxes_unread", principal=self.principal, reason=str(exc))
            return
        self.publish(self.state.set_sandboxes(found, time.monotonic()))

    async def _read_sandboxes(self) -> None:
        # Woken by events, not a timer: nothing is read while nothing happens.
        while any("sandboxes" in listener.topics for listener in self.listeners):
            await self._sandboxes_wanted.wait()
            self._sandboxes_wanted.clear()
            await self.read_sandboxes()
            await asyncio.sleep(SANDBOX_READ_GAP)

    # chat ------------------------------------------------------------------------------

    async def start_chat(self, agent: str) -> str:
        """Start a long-lived agent (StartAgent); its conversation id."""
        conversation_id = await self.client.start(agent)
        self.publish(self.state.add_chat(conversation_id, agent))
        return conversation_id

    def send(self, conversation_id: str, message: str) -> None:
        """One turn (Call) in the background; its answer replaces "working"."""
        chat = self.state.chats[conversation_id]
        _, said = self.state.say(conversation_id, "you", message, "you")
        key, waiting = self.state.say(conversation_id, chat.agent, "working…", "busy")
        self.publish([*said, *waiting])
        task = asyncio.create_task(self._turn(conversation_id, key, message))
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)

    async def _turn(self, conversation_id: str, key: str, message: str) -> None:
        agent = self.state.chats[conversation_id].agent
        try:
            result = await self.client.call(conversation_id, message)
        except LegionError as exc:
            reply, who, status = f"{type(exc).__name__}: {exc}", "error", "error"
        else:
            output = result.output
            reply = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
            who, status = agent, "agent"
        self.publish(self.state.reword(conversation_id, key, who, reply, status))

    async def stop_chat(self, conversation_id: str) -> None:
        """Stop the long-lived agent (StopAgent)."""
        await self.client.stop(conversation_id)
        _, said = self.state.say(conversation_id, "system", "the agent was stopped", "system")
        self.publish(said)

    async def answer(self, ref: str, answer: str) -> None:
        """Answer a human request (RespondHuman) with text."""
        await self.client.respond_human(ref, answer)
        self.publish(self.state.human_answered(ref))

    async def decide(self, ref: str, *, approved: bool, reason: str) -> None:
        """Approve or refuse a held tool call (RespondApproval)."""
        await self.client.respond_approval(ref, approved=approved, reason=reason)
        self.publish(self.state.human_answered(ref, "approved" if approved else "refused"))
