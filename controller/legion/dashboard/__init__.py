"""The web dashboard of ``legion serve --dashboard HOST:PORT``.

Pages: the live agent tree (``/``), a run's trace (``/runs/<id>``), the live
sandboxes with their limits and use (``/sandboxes``), the human requests
waiting, with a form to answer (``/humans``), every agent's system prompt
(``/agents``) and a chat box for long-lived agents (``/chat``). Updates are
pushed to open pages as server-sent events (``/events``).

The dashboard is a client of the controller's own gRPC API: a browser signs
in with its bearer token, and everything it sees or does goes through a
:class:`legion.Client` holding that token (see :mod:`legion.dashboard.app`).
Text from models, sandboxes and tools is escaped on the server and set with
``textContent`` in the browser, never parsed as HTML.
"""

from .app import SECURITY_HEADERS, Dashboard

__all__ = ["SECURITY_HEADERS", "Dashboard"]
