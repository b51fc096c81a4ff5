"""The dashboard's HTML: ``string.Template`` strings, every value escaped.

Everything shown comes from models, sandboxes, tools or users, and is hostile
until escaped: :func:`render` escapes each value it substitutes, except
:class:`Safe` fragments, which only this module makes (by rendering).

Live lists are made of *items* (:class:`~legion.dashboard.state.Item`). An
item template is written once, here, and used twice: the server renders it
with the item's fields, and the page carries it empty in a ``<template>``
element, which ``static/dashboard.js`` clones for items that arrive later and
fills with ``textContent``. So a template follows three rules: the item's
root element has ``data-key="$key"`` (and may have ``data-status="$status"``);
each field is the whole content of an element marked ``data-field="NAME"``
(``$NAME``); a link is ``href="$link_NAME"`` on an element marked
``data-link="NAME"``.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from string import Template

__all__ = ["EMPTY", "ITEMS", "Safe", "escape", "item_templates", "page", "render", "render_item"]


class Safe(str):
    """HTML this module rendered: inserted as it is."""

    __slots__ = ()


EMPTY = Safe("")


def escape(value: object) -> str:
    """``value`` as text that HTML shows as it is (quotes too, for attributes)."""
    return html.escape(str(value), quote=True)


def render(template: Template, **values: object) -> Safe:
    """``template`` with each value escaped (:class:`Safe` ones inserted as they are)."""
    return Safe(
        template.substitute({k: v if isinstance(v, Safe) else escape(v) for k, v in values.items()})
    )


def join(parts: Iterable[Safe]) -> Safe:
    return Safe("".join(parts))


# --- items ---------------------------------------------------------------------------------

ITEMS: dict[str, Template] = {
    # the agent tree: one run, its sub-agents' runs nested in data-children
    "run": Template(
        '<li class="run" data-key="$key" data-status="$status"><div class="row">'
        '<span class="state" data-field="state">$state</span>'
        '<a class="agent" data-link="trace" href="$link_trace" data-field="agent">$agent</a>'
        '<span class="task" data-field="task">$task</span>'
        '<span class="figures"><span data-field="iterations">$iterations</span> iterations · '
        '<span data-field="tokens">$tokens</span> tokens · '
        '<span data-field="cost">$cost</span></span>'
        '<span class="meta">started <span data-field="started">$started</span> by '
        '<span data-field="principal">$principal</span> · '
        '<span class="id" data-field="short">$short</span></span>'
        '</div><ul class="children" data-children>$children</ul></li>'
    ),
    # a run's trace page: its summary, then one item per step, call or question
    "summary": Template(
        '<div class="summary" data-key="$key" data-status="$status">'
        '<h1><span data-field="agent">$agent</span> '
        '<span class="state" data-field="state">$state</span></h1>'
        '<dl class="facts">'
        '<dt>Run</dt><dd class="id" data-field="run">$run</dd>'
        '<dt>Principal</dt><dd data-field="principal">$principal</dd>'
        '<dt>Started</dt><dd data-field="started">$started</dd>'
        '<dt>Took</dt><dd data-field="took">$took</dd>'
        '<dt>Iterations</dt><dd data-field="iterations">$iterations</dd>'
        '<dt>Model calls</dt><dd data-field="requests">$requests</dd>'
        '<dt>Tokens</dt><dd data-field="tokens">$tokens</dd>'
        '<dt>Cost</dt><dd data-field="cost">$cost</dd>'
        '<dt>Parent</dt><dd><a data-link="parent" href="$link_parent" '
        'data-field="parent">$parent</a></dd>'
        '<dt>Conversation</dt><dd class="id" data-field="conversation">$conversation</dd>'
        "</dl>"
        '<h2>Task</h2><pre class="text" data-field="task">$task</pre>'
        '<div class="part"><h2>Answer</h2>'
        '<pre class="text output" data-field="output">$output</pre></div>'
        '<pre class="text error" data-field="error">$error</pre></div>'
    ),
    "llm": Template(
        '<li class="entry llm" data-key="$key" data-status="$status">'
        '<h3><span data-field="title">$title</span> '
        '<span class="meta"><span data-field="model">$model</span> · '
        '<span data-field="tokens">$tokens</span> · <span data-field="took">$took</span>'
        "</span></h3>"
        '<div class="part"><div class="label">prompt (excerpt)</div>'
        '<pre class="text" data-field="prompt">$prompt</pre></div>'
        '<div class="part"><div class="label">reply</div>'
        '<pre class="text" data-field="reply">$reply</pre></div>'
        '<pre class="text error" data-field="error">$error</pre></li>'
    ),
    "eval": Template(
        '<li class="entry eval" data-key="$key" data-status="$status">'
        '<h3><span data-field="title">$title</span> '
        '<span class="meta"><span data-field="state">$state</span> · '
        '<span data-field="took">$took</span></span></h3>'
        '<div class="part"><div class="label">code</div>'
        '<pre class="code" data-field="code">$code</pre></div>'
        '<div class="part"><div class="label">stdout</div>'
        '<pre class="text" data-field="stdout">$stdout</pre></div>'
        '<div class="part"><div class="label">stderr</div>'
        '<pre class="text" data-field="stderr">$stderr</pre></div>'
        '<div class="part"><div class="label">value</div>'
        '<pre class="text" data-field="value">$value</pre></div>'
        '<div class="part figures" data-images="figures">$images_figures</div>'
        '<pre class="text error" data-field="error">$error</pre></li>'
    ),
    "tool": Template(
        '<li class="entry tool" data-key="$key" data-status="$status">'
        '<h3>tool call <code data-field="title">$title</code> '
        '<span class="meta"><span data-field="state">$state</span> · '
        '<span data-field="took">$took</span></span></h3>'
        '<div class="part"><div class="label">arguments</div>'
        '<pre class="code" data-field="args">$args</pre></div>'
        '<div class="part"><div class="label">result</div>'
        '<pre class="text" data-field="result">$result</pre></div>'
        '<pre class="text error" data-field="error">$error</pre></li>'
    ),
    "asked": Template(
        '<li class="entry asked" data-key="$key" data-status="$status">'
        '<h3>asked a human <span class="meta" data-field="state">$state</span></h3>'
        '<pre class="text" data-field="question">$question</pre>'
        '<pre class="text meta-json" data-field="meta">$meta</pre></li>'
    ),
    "sub": Template(
        '<li class="entry sub" data-key="$key" data-status="$status">'
        '<h3>sub-agent <a data-link="trace" href="$link_trace" data-field="agent">$agent</a> '
        '<span class="meta" data-field="state">$state</span></h3>'
        '<pre class="text" data-field="task">$task</pre></li>'
    ),
    # pending human requests, each with its answer form
    "human": Template(
        '<section class="human" data-key="$key" data-status="$status">'
        '<h2><span data-field="agent">$agent</span> asks</h2>'
        '<pre class="text question" data-field="question">$question</pre>'
        '<pre class="text meta-json" data-field="meta">$meta</pre>'
        '<p class="meta">asked <span data-field="asked">$asked</span> in run '
        '<a data-link="trace" href="$link_trace" data-field="short">$short</a></p>'
        '<form method="post" action="/humans/answer" class="answer">'
        '<input type="hidden" name="csrf" value="$csrf">'
        '<input type="hidden" name="ref" data-value="ref" value="$ref">'
        '<label>Answer <input type="text" name="answer" required autocomplete="off"></label>'
        '<button type="submit">Send answer</button></form></section>'
    ),
    # tool calls held for approval, each with its approve / refuse form
    "approval": Template(
        '<section class="human approval" data-key="$key" data-status="$status">'
        '<h2><span data-field="agent">$agent</span> wants to call '
        '<code data-field="call">$call</code></h2>'
        '<pre class="text meta-json" data-field="args">$args</pre>'
        '<p class="meta">approver: <span data-field="approvers">$approvers</span> · asked '
        '<span data-field="asked">$asked</span> in run '
        '<a data-link="trace" href="$link_trace" data-field="short">$short</a></p>'
        '<form method="post" action="/humans/approve" class="answer">'
        '<input type="hidden" name="csrf" value="$csrf">'
        '<input type="hidden" name="ref" data-value="ref" value="$ref">'
        '<label>Reason <input type="text" name="reason" autocomplete="off"></label>'
        '<button type="submit" name="decision" value="approve">Approve</button>'
        '<button type="submit" name="decision" value="refuse">Refuse</button></form></section>'
    ),
    "sandbox": Template(
        '<tr data-key="$key" data-status="$status">'
        '<td class="id" data-field="container">$container</td>'
        '<td><a data-link="trace" href="$link_trace" data-field="run">$run</a></td>'
        '<td data-field="agent">$agent</td><td data-field="age">$age</td>'
        '<td data-field="memory">$memory</td><td data-field="peak">$peak</td>'
        '<td data-field="memory_limit">$memory_limit</td>'
        '<td data-field="cpu_now">$cpu_now</td><td data-field="cpu">$cpu</td>'
        '<td data-field="cpus">$cpus</td><td data-field="pids">$pids</td></tr>'
    ),
    "chat": Template(
        '<li data-key="$key" data-status="$status"><a data-link="chat" href="$link_chat">'
        '<span data-field="agent">$agent</span> <span class="id" data-field="short">$short</span>'
        "</a></li>"
    ),
    "message": Template(
        '<li class="message" data-key="$key" data-status="$status">'
        '<span class="who" data-field="who">$who</span>'
        '<pre class="text" data-field="text">$text</pre></li>'
    ),
    "count": Template(
        '<span class="count" data-key="$key" data-status="$status" data-field="count">$count</span>'
    ),
}
"""Item templates by name."""


def _blanks(template: Template) -> dict[str, object]:
    return dict.fromkeys(template.get_identifiers(), "")


def render_item(
    template: str,
    key: str,
    *,
    fields: Mapping[str, str],
    status: str = "",
    links: Mapping[str, str] | None = None,
    children: Safe = EMPTY,
    context: Mapping[str, str] | None = None,
    images: Mapping[str, list[str]] | None = None,
) -> Safe:
    """One item as HTML: its fields escaped into their places."""
    chosen = ITEMS[template]
    values = _blanks(chosen)
    values.update(context or {})
    values.update(fields)
    values.update({f"link_{name}": path for name, path in (links or {}).items()})
    values.update({f"images_{name}": pictures(urls) for name, urls in (images or {}).items()})
    values.update(key=key, status=status, children=children)
    return render(chosen, **values)


def pictures(urls: Iterable[str]) -> Safe:
    """``<img>`` elements for ``data:image/png`` URLs (others are left out)."""
    return Safe(
        "".join(
            f'<img src="{escape(url)}" alt="a figure the code showed">'
            for url in urls
            if url.startswith("data:image/png;base64,")
        )
    )


def item_templates(names: Iterable[str], context: Mapping[str, str] | None = None) -> Safe:
    """Empty copies of the named item templates, for the page's script to clone."""
    parts = []
    for name in names:
        values = _blanks(ITEMS[name])
        values.update(context or {})
        values["children"] = Safe("")
        parts.append(
            Safe(f'<template id="tpl-{escape(name)}">{render(ITEMS[name], **values)}</template>')
        )
    return join(parts)


# --- pages ---------------------------------------------------------------------------------

PAGE = Template(
    "<!doctype html>"
    '<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<meta name="referrer" content="no-referrer">'
    "<title>$title · Legion</title>"
    '<link rel="stylesheet" href="/static/dashboard.css">'
    '<script src="/static/dashboard.js" defer></script></head>'
    '<body data-view="$view" data-run="$run" data-chat="$chat">'
    "<header>$nav</header><main>$flash$content</main>$templates</body></html>"
)

NAV = Template(
    '<nav><a class="brand" href="/">Legion</a>'
    '<a href="/" data-view="tree">Agent tree</a>'
    '<a href="/humans" data-view="humans">Humans <span data-list="nav">$count</span></a>'
    '<a href="/sandboxes" data-view="sandboxes">Sandboxes</a>'
    '<a href="/agents" data-view="agents">Agents</a>'
    '<a href="/chat" data-view="chat">Chat</a>'
    '<span class="spacer"></span><span id="connection" class="connection">offline</span>'
    '<span class="principal">signed in as <strong>$principal</strong></span>$logout</nav>'
)

LOGOUT = Template(
    '<form method="post" action="/logout" class="logout">'
    '<input type="hidden" name="csrf" value="$csrf"><button type="submit">Log out</button></form>'
)

FLASH = Template('<p class="flash" role="alert">$message</p>')


def page(
    *,
    title: str,
    view: str,
    content: Safe,
    principal: str = "",
    csrf: str = "",
    pending: int = 0,
    can_log_out: bool = False,
    flash: str = "",
    templates: Safe = EMPTY,
    run: str = "",
    chat: str = "",
) -> Safe:
    """A whole page: the navigation, a one-time message, the content."""
    nav = Safe("")
    if principal:
        count = render_item(
            "count", "humans", fields={"count": str(pending)}, status="waiting" if pending else ""
        )
        logout = render(LOGOUT, csrf=csrf) if can_log_out else Safe("")
        nav = render(NAV, principal=principal, count=count, logout=logout)
    return render(
        PAGE,
        title=title,
        view=view,
        run=run,
        chat=chat,
        nav=nav,
        flash=render(FLASH, message=flash) if flash else Safe(""),
        content=content,
        templates=templates,
    )


LOGIN = Template(
    '<section class="login"><h1>Legion dashboard</h1>'
    "<p>Sign in with the bearer token the server's token table gives you.</p>"
    '<form method="post" action="/login">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<label>Token <input type="password" name="token" required autocomplete="off" autofocus>'
    "</label>"
    '<button type="submit">Sign in</button></form>$error</section>'
)


def login(csrf: str, error: str = "") -> Safe:
    message = render(FLASH, message=error) if error else Safe("")
    return page(title="Sign in", view="login", content=render(LOGIN, csrf=csrf, error=message))


TREE = Template(
    "<h1>Agent tree</h1>"
    '<p class="hint">Runs of $principal since signing in, newest first; sub-agents nest '
    "under the run that called them. Updates arrive as they happen.</p>"
    '<ul class="tree" data-list="runs" data-order="newest-first">$items</ul>'
    '<p class="empty">No runs yet.</p>'
)

TRACE = Template(
    '<div data-list="summary">$summary</div>'
    "<h2>Trace</h2>"
    '<p class="hint">Each model call with its prompt and reply, each step\'s code with its '
    "output and value or error, each tool call with its arguments and result.</p>"
    '<ol class="trace" data-list="trace">$items</ol><p class="empty">Nothing yet.</p>'
)

DROPPED = Template('<li class="entry dropped">$count more entries were not kept.</li>')

HUMANS = Template(
    "<h1>Human requests</h1>"
    '<p class="hint">Questions that agents\' code is waiting on (the answer is sent as text), '
    "and tool calls held until a person approves them.</p>"
    '<div class="humans" data-list="humans">$items</div>'
    '<p class="empty">No question is waiting.</p>'
)

SANDBOXES = Template(
    "<h1>Sandboxes</h1>"
    '<p class="hint">Live containers of your runs, read from the engine when something '
    'happens in a run (as of <span data-list="stamp">$stamp</span>). CPU now: share of one '
    "core since the previous reading.</p>"
    '<table class="sandboxes"><thead><tr><th>Container</th><th>Run</th><th>Agent</th>'
    "<th>Age</th><th>Memory</th><th>Peak</th><th>Limit</th><th>CPU now</th>"
    "<th>CPU time</th><th>CPUs</th><th>Pids</th></tr></thead>"
    '<tbody data-list="sandboxes">$items</tbody></table>'
    '<p class="empty">No live sandbox.</p>'
)

AGENT = Template(
    '<section class="agent"><h2 id="agent-$anchor">$name</h2>'
    '<pre class="text">$description</pre>'
    '<p class="meta">Tools: <code>$tools</code> · answer: <code>$schema</code></p>'
    '<p class="meta">Image: <code>$image</code> · packages: <code>$packages</code></p>'
    "<details$open><summary>System prompt</summary>"
    '<pre class="text prompt">$prompt</pre></details></section>'
)

AGENTS = Template(
    '<h1>Agents</h1><p class="hint">The agents this server offers, each with the system '
    "prompt its runs use.</p>$items"
)

CHAT = Template(
    '<div class="chat"><aside><h2>Conversations</h2>'
    '<ul class="chats" data-list="chats">$chats</ul>'
    '<form method="post" action="/chat/start" class="start">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<label>Agent <select name="agent">$options</select></label>'
    '<button type="submit">Start a conversation</button></form></aside>'
    '<section class="conversation">$conversation</section></div>'
)

CONVERSATION = Template(
    '<h1>$agent <span class="id">$cid</span></h1>'
    '<ol class="messages" data-list="messages">$messages</ol>'
    '<form method="post" action="/chat/send" class="send">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<input type="hidden" name="conversation" value="$cid">'
    '<textarea name="message" rows="3" required placeholder="Message"></textarea>'
    '<button type="submit">Send</button></form>'
    '<form method="post" action="/chat/stop" class="stop">'
    '<input type="hidden" name="csrf" value="$csrf">'
    '<input type="hidden" name="conversation" value="$cid">'
    '<button type="submit">Stop this agent</button></form>'
)

NO_CONVERSATION = Safe(
    '<p class="hint">Start a conversation with a long-lived agent: each message is one turn '
    "(Call), and the agent keeps the history between turns.</p>"
)

OPTION = Template('<option value="$value">$value</option>')

ERROR = Template('<h1>$title</h1><p class="flash">$message</p><p><a href="/">Back</a></p>')
