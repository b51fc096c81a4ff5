"""What the dashboard shows one principal, built from its event stream.

:class:`LiveState` takes the events of ``Events`` (only the principal's: the
server filters them) and keeps runs with their parents and children, status,
iterations, tokens and cost, each run's trace, the human requests waiting,
and the chats started from the dashboard. Every change comes back as
:class:`Patch` objects: the items of one page list to add or update, and the
keys to remove, which the viewer pushes to the open pages that show that list.
Pages are rendered from the same items (:func:`legion.dashboard.templates.render_item`).

Everything kept is bounded (runs, trace entries, chat messages, text
lengths): the events are the principal's, but their text came from models and
sandboxes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .. import telemetry
from ..client import RemoteEvent, SandboxInfo

__all__ = ["ChatView", "HumanView", "Item", "LiveState", "Patch", "RunView"]

MAX_RUNS = 300
"""Runs kept per principal; the oldest finished ones (with their sub-agents) go first."""
MAX_TRACE = 500
"""Trace entries kept per run; later ones are counted, not kept."""
MAX_CHATS = 32
MAX_MESSAGES = 200
"""Messages kept per chat; the oldest go first."""
TEXT = telemetry.EXCERPT_CHARS
"""Characters of one text field shown."""
SHORT = 160
"""Characters of a task shown in the tree."""


# --- what pages show -------------------------------------------------------------------------


@dataclass
class Item:
    """One element of a page list: an item template's fields (text), its
    status (a ``data-status`` attribute), its links (paths on this server),
    and the key of the item it nests under (sub-agents in the tree)."""

    template: str
    key: str
    fields: dict[str, str] = field(default_factory=dict)
    status: str = ""
    links: dict[str, str] = field(default_factory=dict)
    parent: str = ""
    images: dict[str, list[str]] = field(default_factory=dict)
    """Pictures by slot: ``data:image/png;base64,`` URLs (a step's figures)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "key": self.key,
            "fields": self.fields,
            "status": self.status,
            "links": self.links,
            "parent": self.parent,
            "images": self.images,
        }


@dataclass
class Patch:
    """A change to the page list ``list_name`` of ``topic``. ``full``: the
    items are the whole list (a page drops the items it has that are not in it)."""

    topic: str
    list_name: str
    items: list[Item] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    full: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "list": self.list_name,
            "items": [item.to_json() for item in self.items],
            "remove": self.remove,
            "full": self.full,
        }


# --- formatting ------------------------------------------------------------------------------


PNG_URL = "data:image/png;base64,"
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def png_urls(artifacts: Any) -> list[str]:
    """The PNGs a ``sandbox.eval`` event carries, as ``data:`` URLs; anything
    that is not plain base64 of a PNG is left out (it came from a sandbox)."""
    urls = []
    for artifact in artifacts if isinstance(artifacts, list) else []:
        if not isinstance(artifact, Mapping) or artifact.get("mime_type") != "image/png":
            continue
        encoded = artifact.get("data_base64")
        # "iVBORw0KGgo" is the PNG signature in base64.
        if (
            isinstance(encoded, str)
            and encoded.startswith("iVBORw0KGgo")
            and _BASE64.fullmatch(encoded)
        ):
            urls.append(PNG_URL + encoded)
    return urls[:8]


APPROVAL_TEXT = 128 * 1024
"""An approval's arguments are shown whole (the controller asks about at most 64 KiB)."""


def text(value: Any, limit: int = TEXT) -> str:
    """Any event value as text a page shows (JSON for data), cut to ``limit``."""
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            value = repr(value)
    return telemetry.excerpt(value, limit)


def clock(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def took(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return ""
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def size(count: int | None) -> str:
    if not count:
        return "-"
    if count < 1024 * 1024:
        return f"{count / 1024:.0f} KiB"
    return f"{count / (1024 * 1024):.1f} MiB"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def trace_path(run_id: str) -> str:
    return f"/runs/{quote(run_id, safe='')}"


def chat_path(conversation_id: str) -> str:
    return f"/chat?c={quote(conversation_id, safe='')}"


# --- the model ---------------------------------------------------------------------------------


@dataclass
class RunView:
    """One run (or a long-lived agent's turn) as the dashboard saw it."""

    run_id: str
    parent: str
    agent: str = "?"
    task: str = ""
    started: float | None = None
    ended: float | None = None
    conversation_id: str = ""
    status: str = "running"
    """running, finished, failed or cancelled."""
    iterations: int = 0
    requests: int = 0
    tokens: int = 0
    cost: float | None = None
    output: str = ""
    error: str = ""
    children: list[str] = field(default_factory=list)
    trace: dict[str, Item] = field(default_factory=dict)
    dropped: int = 0
    """Trace entries not kept (over MAX_TRACE)."""
    seq: int = 0
    open_llm: str = ""
    llm_attempt: Any = None
    """The attempt of the open model request whose reply is streaming in."""
    open_eval: str = ""
    eval_ok: bool = False
    tools: dict[str, str] = field(default_factory=dict)
    """Open tool calls: call id -> trace key."""
    sub_entries: dict[str, str] = field(default_factory=dict)
    """Child run id -> its trace key here."""
    asked: dict[str, str] = field(default_factory=dict)
    """Human request ref -> its trace key here."""
    shown_row: Item | None = None
    shown_summary: Item | None = None
    """The items last published, so unchanged ones are not sent again."""


@dataclass
class HumanView:
    """A question waiting for an answer, or a tool call waiting for approval."""

    ref: str
    run_id: str
    agent: str
    question: str
    """For an approval: the call, ``Tool.function``."""
    meta: str
    """For an approval: its arguments, as JSON."""
    asked: float
    approvers: str | None = None
    """Set for an approval: who may decide (empty: the run's principal)."""


@dataclass
class ChatView:
    """A long-lived agent started from the chat page, and what was said."""

    conversation_id: str
    agent: str
    messages: dict[str, Item] = field(default_factory=dict)
    seq: int = 0


class LiveState:
    """The live model of one principal (see the module's docstring)."""

    def __init__(self, principal: str) -> None:
        self.principal = principal
        self.runs: dict[str, RunView] = {}
        self.humans: dict[str, HumanView] = {}
        self.chats: dict[str, ChatView] = {}
        self.sandboxes: list[SandboxInfo] = []
        self.sandboxes_at: float | None = None
        self._cpu: dict[str, tuple[float, float]] = {}
        """Container -> (cpu seconds, monotonic time) at the previous reading."""
        self._peak: dict[str, int] = {}
        """Container -> the most memory seen, where the engine gives no peak."""
        self._cpu_now: dict[str, str] = {}
        """Container -> its share of a core between the last two readings."""

    # items -------------------------------------------------------------------------------

    def run_item(self, run: RunView) -> Item:
        parent = run.parent if run.parent in self.runs else ""
        return Item(
            "run",
            run.run_id,
            {
                "state": run.status,
                "agent": run.agent,
                "task": text(run.task, SHORT),
                "iterations": str(run.iterations),
                "tokens": str(run.tokens),
                "cost": f"${run.cost:.4f}" if run.cost is not None else "cost unknown",
                "started": clock(run.started),
                "principal": self.principal,
                "short": run.run_id[:8],
            },
            status=run.status,
            links={"trace": trace_path(run.run_id)},
            parent=parent,
        )

    def summary_item(self, run: RunView) -> Item:
        parent = self.runs.get(run.parent)
        took_ = took(run.ended - run.started) if run.ended and run.started else ""
        return Item(
            "summary",
            run.run_id,
            {
                "agent": run.agent,
                "state": run.status,
                "run": run.run_id,
                "principal": self.principal,
                "started": clock(run.started),
                "took": took_,
                "iterations": str(run.iterations),
                "requests": str(run.requests),
                "tokens": str(run.tokens),
                "cost": f"${run.cost:.4f}" if run.cost is not None else "unknown",
                "parent": f"{parent.agent} ({run.parent[:8]})" if parent else run.parent[:8],
                "conversation": run.conversation_id,
                "task": run.task,
                "output": run.output,
                "error": run.error,
            },
            status=run.status,
            links={"parent": trace_path(run.parent)} if run.parent else {},
        )

    def human_item(self, human: HumanView) -> Item:
        if human.approvers is not None:
            return Item(
                "approval",
                human.ref,
                {
                    "agent": human.agent,
                    "call": human.question,
                    "args": human.meta,
                    "approvers": human.approvers or "the run's principal",
                    "asked": clock(human.asked),
                    "short": human.run_id[:8],
                    "ref": human.ref,
                },
                status="waiting",
                links={"trace": trace_path(human.run_id)},
            )
        return Item(
            "human",
            human.ref,
            {
                "agent": human.agent,
                "question": human.question,
                "meta": human.meta,
                "asked": clock(human.asked),
                "short": human.run_id[:8],
                "ref": human.ref,
            },
            status="waiting",
            links={"trace": trace_path(human.run_id)},
        )

    def count_item(self) -> Item:
        waiting = "waiting" if self.humans else "none"
        return Item("count", "humans", {"count": str(len(self.humans))}, status=waiting)

    def tree(self) -> list[tuple[RunView, list[Any]]]:
        """The runs as a forest, newest first at the top, sub-agents in order."""

        def node(run: RunView) -> tuple[RunView, list[Any]]:
            return run, [node(self.runs[c]) for c in run.children if c in self.runs]

        tops = [r for r in self.runs.values() if r.parent not in self.runs]
        return [node(run) for run in reversed(tops)]

    # snapshots ---------------------------------------------------------------------------

    def snapshot(self, topic: str) -> list[Patch]:
        """The whole of ``topic``'s lists, for a page that (re)connects."""
        if topic == "runs":  # parents before their children
            return [Patch(topic, "runs", [self.run_item(r) for r in self.runs.values()], full=True)]
        if topic.startswith("run:"):
            found = self.runs.get(topic.removeprefix("run:"))
            if found is None:
                return []
            return [
                Patch(topic, "summary", [self.summary_item(found)], full=True),
                Patch(topic, "trace", list(found.trace.values()), full=True),
            ]
        if topic == "humans":
            humans = [self.human_item(h) for h in self.humans.values()]
            return [Patch(topic, "humans", humans, full=True)]
        if topic == "nav":
            return [Patch(topic, "nav", [self.count_item()], full=True)]
        if topic == "sandboxes":
            return self.sandbox_patches()
        if topic == "chats":
            chats = [self.chat_item(c) for c in self.chats.values()]
            return [Patch(topic, "chats", chats, full=True)]
        if topic.startswith("chat:"):
            chat = self.chats.get(topic.removeprefix("chat:"))
            if chat is None:
                return []
            return [Patch(topic, "messages", list(chat.messages.values()), full=True)]
        return []

    # events ------------------------------------------------------------------------------

    def apply(self, event: RemoteEvent) -> list[Patch]:
        """Take one event; the patches it makes."""
        if not event.run_id:
            return []
        handler = _HANDLERS.get(event.name)
        if handler is None:
            return []
        run = self._run(event)
        patches = handler(self, run, event.data)
        patches.extend(self._run_patches(run))
        return patches

    def _run(self, event: RemoteEvent) -> RunView:
        assert event.run_id is not None
        run = self.runs.get(event.run_id)
        if run is None:
            # First seen here: its start, or a run already going at sign-in.
            run = RunView(event.run_id, event.parent_run_id or "", started=event.time)
            run.conversation_id = event.conversation_id
            self.runs[run.run_id] = run
            parent = self.runs.get(run.parent)
            if parent is not None:
                parent.children.append(run.run_id)
            self._evict()
        return run

    def _evict(self) -> None:
        while len(self.runs) > MAX_RUNS:
            done = next(
                (r for r in self.runs.values() if r.status != "running" and not r.parent), None
            )
            if done is None:
                return
            for run_id in self._family(done):
                self.runs.pop(run_id, None)

    def _family(self, run: RunView) -> list[str]:
        found = [run.run_id]
        for child in run.children:
            if child in self.runs:
                found.extend(self._family(self.runs[child]))
        return found

    def _run_patches(self, run: RunView) -> list[Patch]:
        patches = []
        row, summary = self.run_item(run), self.summary_item(run)
        if row != run.shown_row:  # most events change neither
            run.shown_row = row
            patches.append(Patch("runs", "runs", [row]))
        if summary != run.shown_summary:
            run.shown_summary = summary
            patches.append(Patch(f"run:{run.run_id}", "summary", [summary]))
        parent = self.runs.get(run.parent)
        if parent is not None and run.run_id in parent.sub_entries:
            entry = parent.trace.get(parent.sub_entries[run.run_id])
            if entry is not None:
                entry.fields.update(agent=run.agent, state=run.status, task=text(run.task))
                entry.status = run.status
                patches.append(Patch(f"run:{parent.run_id}", "trace", [entry]))
        return patches

    def _entry(self, run: RunView, template: str, fields: dict[str, str], status: str) -> Item:
        run.seq += 1
        item = Item(template, f"e{run.seq}", fields, status=status)
        if len(run.trace) < MAX_TRACE:
            run.trace[item.key] = item
        else:
            run.dropped += 1
        return item

    def _trace(self, run: RunView, *items: Item) -> list[Patch]:
        kept = [item for item in items if item.key in run.trace]
        return [Patch(f"run:{run.run_id}", "trace", kept)] if kept else []

    def _humans_changed(
        self, added: Iterable[HumanView] = (), gone: Iterable[str] = ()
    ) -> list[Patch]:
        return [
            Patch("humans", "humans", [self.human_item(h) for h in added], list(gone)),
            Patch("nav", "nav", [self.count_item()]),
        ]

    # one method per event name -------------------------------------------------------------

    def _run_start(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        run.agent = text(data.get("agent"), 200) or "?"
        run.task = text(data.get("task"))
        parent = self.runs.get(run.parent)
        if parent is None or run.run_id in parent.sub_entries:
            return []
        entry = self._entry(parent, "sub", {"agent": run.agent, "state": run.status}, run.status)
        entry.links["trace"] = trace_path(run.run_id)
        parent.sub_entries[run.run_id] = entry.key
        return self._trace(parent, entry)

    def _run_end(self, run: RunView, data: Mapping[str, Any], status: str) -> list[Patch]:
        run.status = status
        run.ended = time.time()
        if isinstance(data.get("duration"), (int, float)) and run.started is not None:
            run.ended = run.started + float(data["duration"])
        waiting = [ref for ref, h in self.humans.items() if h.run_id == run.run_id]
        for ref in waiting:
            del self.humans[ref]
        return self._humans_changed(gone=waiting) if waiting else []

    def _run_stop(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        run.iterations = _int(data.get("iterations")) or run.iterations
        usage = data.get("usage")
        if isinstance(usage, Mapping):
            run.tokens = _int(usage.get("total_tokens")) or run.tokens
            run.requests = _int(usage.get("requests")) or run.requests
            cost = usage.get("cost_usd")
            run.cost = float(cost) if isinstance(cost, (int, float)) else run.cost
        run.output = text(data.get("output"))
        return self._run_end(run, data, "finished")

    def _run_exception(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        run.error = text(data.get("error"))
        cancelled = run.error.startswith("CancelledError")
        return self._run_end(run, data, "cancelled" if cancelled else "failed")

    def _llm_start(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        title = f"model call {run.requests + 1}"
        fields = {"title": title, "model": text(data.get("model"), 200)}
        fields["prompt"] = text(data.get("prompt"))
        entry = self._entry(run, "llm", fields, "waiting")
        run.open_llm, run.llm_attempt = entry.key, None
        return self._trace(run, entry)

    def _llm_delta(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        """The reply as it streams in; a retried request's starts over, and
        the stop event's excerpt replaces it when the request ends."""
        entry = run.trace.get(run.open_llm)
        if entry is None:
            return []
        shown = entry.fields.get("reply", "")
        if data.get("attempt") != run.llm_attempt:
            run.llm_attempt, shown = data.get("attempt"), ""
        elif len(shown) >= TEXT:  # cut already: the stop event has the excerpt
            return []
        entry.fields["reply"] = text(shown + text(data.get("text")))
        return self._trace(run, entry)

    def _llm_end(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        entry = run.trace.get(run.open_llm)
        run.open_llm = ""
        usage = data.get("usage")
        tokens = _int(usage.get("total_tokens")) if isinstance(usage, Mapping) else 0
        run.requests += 1
        run.tokens += tokens
        if isinstance(usage, Mapping) and isinstance(usage.get("cost_usd"), (int, float)):
            run.cost = (run.cost or 0.0) + float(usage["cost_usd"])
        if entry is None:
            return []
        entry.fields.update(
            reply=text(data.get("reply")),
            error=text(data.get("error")),
            tokens=f"{tokens} tokens",
            took=took(data.get("duration")),
        )
        entry.status = "error" if data.get("error") else "done"
        return self._trace(run, entry)

    def _eval_start(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        title = f"code, step {run.iterations + 1}"
        entry = self._entry(
            run, "eval", {"title": title, "code": text(data.get("code"))}, "running"
        )
        entry.fields["state"] = "running"
        run.open_eval = entry.key
        return self._trace(run, entry)

    def _eval_stop(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        entry = run.trace.get(run.open_eval)
        run.open_eval = ""
        run.eval_ok = bool(data.get("success"))
        if entry is None:
            return []
        state = "timed out" if data.get("timed_out") else "ok" if run.eval_ok else "error"
        entry.fields.update(
            state=state,
            took=took(data.get("duration")),
            stdout=text(data.get("stdout")),
            stderr=text(data.get("stderr")),
            value=text(data.get("value")),
            error=text(data.get("error")),
        )
        figures = png_urls(data.get("artifacts"))
        if figures:
            entry.images["figures"] = figures
        entry.status = "ok" if run.eval_ok else "error"
        return self._trace(run, entry)

    def _eval_output(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        """Output of the running code, appended as it comes; the stop event's
        excerpt replaces it when the step ends."""
        entry = run.trace.get(run.open_eval)
        stream = data.get("stream")
        if entry is None or stream not in ("stdout", "stderr"):
            return []
        shown = entry.fields.get(stream, "")
        if len(shown) >= TEXT:  # cut already: the rest shows when the step ends
            return []
        entry.fields[stream] = text(shown + text(data.get("text")))
        return self._trace(run, entry)

    def _iteration_stop(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        if not data.get("complete") and run.eval_ok:
            run.iterations += 1
        return []

    def _tool_start(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        tool, function = text(data.get("tool"), 200), text(data.get("function"), 200)
        args, kwargs = text(data.get("args")), text(data.get("kwargs"))
        shown = args if kwargs in ("", "{}") else f"{args} {kwargs}"
        fields = {"title": f"{tool}.{function}" if function else tool, "args": shown}
        fields["state"] = "running"
        entry = self._entry(run, "tool", fields, "running")
        run.tools[text(data.get("call_id"), 200) or entry.key] = entry.key
        return self._trace(run, entry)

    def _tool_end(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        call = text(data.get("call_id"), 200)
        key = run.tools.pop(call, "") if call else ""
        if not key and run.tools:  # no call id (an older server): the oldest open call
            key = run.tools.pop(next(iter(run.tools)))
        entry = run.trace.get(key)
        if entry is None:
            return []
        error = text(data.get("error"))
        entry.fields.update(
            state="error" if error else "ok",
            took=took(data.get("duration")),
            result=text(data.get("result")),
            error=error,
        )
        entry.status = "error" if error else "ok"
        return self._trace(run, entry)

    def _human_request(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        ref = text(data.get("ref"), 200)
        if not ref:
            return []
        meta = data.get("meta")
        human = HumanView(
            ref=ref,
            run_id=run.run_id,
            agent=text(data.get("agent"), 200) or run.agent,
            question=text(data.get("question")),
            meta=text(meta) if meta else "",
            asked=time.time(),
        )
        self.humans[ref] = human
        fields = {"question": human.question, "meta": human.meta, "state": "waiting"}
        entry = self._entry(run, "asked", fields, "waiting")
        run.asked[ref] = entry.key
        return [*self._trace(run, entry), *self._humans_changed(added=[human])]

    def _approval_request(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        ref = text(data.get("ref"), 200)
        if not ref:
            return []
        tool, function = text(data.get("tool"), 200), text(data.get("function"), 200)
        call = f"{tool}.{function}" if function else tool
        approvers = data.get("approvers")
        human = HumanView(
            ref=ref,
            run_id=run.run_id,
            agent=text(data.get("agent"), 200) or run.agent,
            question=call,
            # All of it: an approver must see everything the call would run with.
            meta=text({"args": data.get("args"), "kwargs": data.get("kwargs")}, APPROVAL_TEXT),
            asked=time.time(),
            approvers=", ".join(map(str, approvers)) if isinstance(approvers, list) else "",
        )
        self.humans[ref] = human
        fields = {"question": f"approve {call}?", "meta": human.meta, "state": "waiting"}
        entry = self._entry(run, "asked", fields, "waiting")
        run.asked[ref] = entry.key
        return [*self._trace(run, entry), *self._humans_changed(added=[human])]

    def _approval_done(self, run: RunView, data: Mapping[str, Any]) -> list[Patch]:
        state = "approved" if data.get("approved") is True else "refused"
        who = text(data.get("principal"), 200)
        return self._human_done(run, data, f"{state} by {who}" if who else state)

    def _human_done(self, run: RunView, data: Mapping[str, Any], state: str) -> list[Patch]:
        ref = text(data.get("ref"), 200)
        patches = []
        entry = run.trace.get(run.asked.pop(ref, ""))
        if entry is not None:
            entry.fields["state"] = state
            entry.status = state
            patches.extend(self._trace(run, entry))
        if self.humans.pop(ref, None) is not None:
            patches.extend(self._humans_changed(gone=[ref]))
        return patches

    def human_answered(self, ref: str, state: str = "answered") -> list[Patch]:
        """The dashboard answered (or decided) ``ref``: it is no longer waiting."""
        human = self.humans.get(ref)
        if human is None:
            return []
        run = self.runs.get(human.run_id)
        if run is None:
            del self.humans[ref]
            return self._humans_changed(gone=[ref])
        return self._human_done(run, {"ref": ref}, state)

    # chats ---------------------------------------------------------------------------------

    def chat_item(self, chat: ChatView) -> Item:
        return Item(
            "chat",
            chat.conversation_id,
            {"agent": chat.agent, "short": chat.conversation_id[:8]},
            links={"chat": chat_path(chat.conversation_id)},
        )

    def add_chat(self, conversation_id: str, agent: str) -> list[Patch]:
        gone = []
        while len(self.chats) >= MAX_CHATS:
            gone.append(self.chats.pop(next(iter(self.chats))).conversation_id)
        chat = self.chats[conversation_id] = ChatView(conversation_id, agent)
        return [Patch("chats", "chats", [self.chat_item(chat)], gone)]

    def say(
        self, conversation_id: str, who: str, said: str, status: str
    ) -> tuple[str, list[Patch]]:
        """Add a message to a chat; its key, and the patches."""
        chat = self.chats.get(conversation_id)
        if chat is None:
            return "", []
        chat.seq += 1
        item = Item("message", f"m{chat.seq}", {"who": who, "text": text(said)}, status=status)
        chat.messages[item.key] = item
        gone = []
        while len(chat.messages) > MAX_MESSAGES:
            gone.append(chat.messages.pop(next(iter(chat.messages))).key)
        return item.key, [Patch(f"chat:{conversation_id}", "messages", [item], gone)]

    def reword(
        self, conversation_id: str, key: str, who: str, said: str, status: str
    ) -> list[Patch]:
        """Change a chat message (the agent's answer in place of "working")."""
        chat = self.chats.get(conversation_id)
        item = chat.messages.get(key) if chat is not None else None
        if item is None:
            return []
        item.fields.update(who=who, text=text(said))
        item.status = status
        return [Patch(f"chat:{conversation_id}", "messages", [item])]

    # sandboxes -----------------------------------------------------------------------------

    def set_sandboxes(self, found: list[SandboxInfo], now: float) -> list[Patch]:
        """A new reading of the principal's sandboxes (``now``: monotonic seconds)."""
        self.sandboxes = found
        self.sandboxes_at = time.time()
        previous, self._cpu, self._cpu_now = self._cpu, {}, {}
        for sandbox in found:
            self._cpu[sandbox.container_id] = (sandbox.cpu_seconds, now)
            before = previous.get(sandbox.container_id)
            if before is not None and now > before[1] and sandbox.cpu_seconds >= before[0]:
                share = (sandbox.cpu_seconds - before[0]) / (now - before[1])
                self._cpu_now[sandbox.container_id] = f"{share * 100:.0f}%"
            peak = max(self._peak.get(sandbox.container_id, 0), sandbox.memory_bytes)
            self._peak[sandbox.container_id] = peak
        live = {s.container_id for s in found}
        self._peak = {k: v for k, v in self._peak.items() if k in live}
        return self.sandbox_patches()

    def sandbox_item(self, sandbox: SandboxInfo) -> Item:
        peak = sandbox.peak_memory_bytes or self._peak.get(sandbox.container_id, 0)
        run = self.runs.get(sandbox.run_id)
        return Item(
            "sandbox",
            sandbox.container_id,
            {
                "container": sandbox.container_id[:12],
                "run": sandbox.run_id[:8] or "(warm)",
                "agent": sandbox.agent or (run.agent if run else ""),
                "age": took(sandbox.age_seconds),
                "memory": size(sandbox.memory_bytes),
                "peak": size(peak),
                "memory_limit": size(sandbox.memory_limit_bytes),
                "cpu_now": self._cpu_now.get(sandbox.container_id, "-"),
                "cpu": f"{sandbox.cpu_seconds:.2f} s",
                "cpus": f"{sandbox.cpus:g}",
                "pids": str(sandbox.pids),
            },
            status="in-use" if sandbox.run_id else "warm",
            links={"trace": trace_path(sandbox.run_id)} if sandbox.run_id else {},
        )

    def sandbox_patches(self) -> list[Patch]:
        items = [self.sandbox_item(s) for s in self.sandboxes]
        stamp = Item("count", "stamp", {"count": clock(self.sandboxes_at) or "not read yet"})
        return [
            Patch("sandboxes", "sandboxes", items, full=True),
            Patch("sandboxes", "stamp", [stamp], full=True),
        ]


_Handler = Callable[[LiveState, RunView, Mapping[str, Any]], list[Patch]]

_HANDLERS: dict[str, _Handler] = {
    telemetry.RUN_START: LiveState._run_start,
    telemetry.RUN_STOP: LiveState._run_stop,
    telemetry.RUN_EXCEPTION: LiveState._run_exception,
    telemetry.LLM_REQUEST_START: LiveState._llm_start,
    telemetry.LLM_REQUEST_STOP: LiveState._llm_end,
    telemetry.LLM_REQUEST_EXCEPTION: LiveState._llm_end,
    telemetry.LLM_DELTA: LiveState._llm_delta,
    telemetry.SANDBOX_EVAL_START: LiveState._eval_start,
    telemetry.SANDBOX_EVAL_STOP: LiveState._eval_stop,
    telemetry.SANDBOX_EVAL_EXCEPTION: LiveState._eval_stop,
    telemetry.SANDBOX_OUTPUT: LiveState._eval_output,
    telemetry.ITERATION_STOP: LiveState._iteration_stop,
    telemetry.TOOL_CALL_START: LiveState._tool_start,
    telemetry.TOOL_CALL_STOP: LiveState._tool_end,
    telemetry.TOOL_CALL_EXCEPTION: LiveState._tool_end,
    telemetry.HUMAN_REQUEST: LiveState._human_request,
    telemetry.HUMAN_RESPONSE: lambda state, run, data: state._human_done(run, data, "answered"),
    telemetry.HUMAN_TIMEOUT: lambda state, run, data: state._human_done(run, data, "timed out"),
    telemetry.TOOL_APPROVAL: LiveState._approval_request,
    telemetry.TOOL_APPROVAL_DECISION: LiveState._approval_done,
    telemetry.TOOL_APPROVAL_TIMEOUT: lambda state, run, data: state._human_done(
        run, data, "timed out"
    ),
}
