"""The dashboard's pages, rendered from a session's live state."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..client import AgentInfo
from . import templates as t
from .state import Item, LiveState, RunView
from .templates import EMPTY, Safe

__all__ = ["agents", "chat", "humans", "sandboxes", "trace", "tree"]


def _item(item: Item, *, children: Safe = EMPTY, context: Mapping[str, str] | None = None) -> Safe:
    return t.render_item(
        item.template,
        item.key,
        fields=item.fields,
        status=item.status,
        links=item.links,
        children=children,
        context=context,
        images=item.images,
    )


def tree(state: LiveState) -> tuple[Safe, Safe]:
    """The agent tree: content and item templates."""

    def node(run: RunView, children: list[Any]) -> Safe:
        return _item(state.run_item(run), children=t.join(node(*c) for c in children))

    items = t.join(node(run, children) for run, children in state.tree())
    return t.render(t.TREE, principal=state.principal, items=items), t.item_templates(["run"])


def trace(state: LiveState, run: RunView) -> tuple[Safe, Safe]:
    """One run's summary and trace."""
    items = t.join(_item(entry) for entry in run.trace.values())
    if run.dropped:
        items = Safe(items + t.render(t.DROPPED, count=run.dropped))
    content = t.render(t.TRACE, summary=_item(state.summary_item(run)), items=items)
    names = ["summary", "llm", "eval", "tool", "asked", "sub"]
    return content, t.item_templates(names)


def humans(state: LiveState, csrf: str) -> tuple[Safe, Safe]:
    """The questions waiting, each with its answer form, and the tool calls
    held for approval, each with its approve / refuse form."""
    context = {"csrf": csrf}
    items = t.join(_item(state.human_item(h), context=context) for h in state.humans.values())
    return t.render(t.HUMANS, items=items), t.item_templates(["human", "approval"], context)


def sandboxes(state: LiveState) -> tuple[Safe, Safe]:
    """The principal's live sandboxes, as last read."""
    items = t.join(_item(state.sandbox_item(s)) for s in state.sandboxes)
    stamp = state.sandbox_patches()[1].items[0]
    content = t.render(t.SANDBOXES, items=items, stamp=_item(stamp))
    return content, t.item_templates(["sandbox", "count"])


def agents(infos: list[AgentInfo]) -> Safe:
    """Every agent with its description, tools and system prompt."""
    parts = []
    for index, info in enumerate(infos):
        schema = "text" if info.output_schema is None else json.dumps(info.output_schema)
        parts.append(
            t.render(
                t.AGENT,
                anchor=index,
                name=info.name,
                description=info.description,
                tools=", ".join(info.tools) or "none",
                schema=schema,
                image=info.image or "the server's default",
                packages=", ".join(info.packages) or "the standard library only",
                open=" open" if len(infos) == 1 else "",
                prompt=info.system_prompt or "(the server sent no system prompt)",
            )
        )
    return t.render(t.AGENTS, items=t.join(parts))


def chat(
    state: LiveState, csrf: str, agent_names: list[str], conversation_id: str
) -> tuple[Safe, Safe]:
    """The chat box: this session's conversations, and the chosen one."""
    chats = t.join(_item(state.chat_item(c)) for c in state.chats.values())
    options = t.join(t.render(t.OPTION, value=name) for name in agent_names)
    chosen = state.chats.get(conversation_id)
    conversation = t.NO_CONVERSATION
    if chosen is not None:
        messages = t.join(_item(m) for m in chosen.messages.values())
        conversation = t.render(
            t.CONVERSATION,
            agent=chosen.agent,
            cid=chosen.conversation_id,
            messages=messages,
            csrf=csrf,
        )
    content = t.render(t.CHAT, chats=chats, options=options, csrf=csrf, conversation=conversation)
    return content, t.item_templates(["chat", "message"])
