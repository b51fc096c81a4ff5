"""The dashboard's web server: an aiohttp application in ``legion serve``'s process.

Each signed-in browser session uses its principal's
:class:`~legion.dashboard.viewer.Viewer`: a :class:`legion.Client` connected
to the server's own gRPC API with a token of that principal (the sessions of
one principal share it, and so one ``Events`` stream of the 16 it may open).
Sign-in checks the token with ListAgents; what a page shows comes from the
principal's ``Events`` stream; every action is an API call. So
authentication, ownership and limits are the controller's own, unchanged.

Sessions: a random id in an HttpOnly, SameSite=Strict cookie, a table on the
server, an idle expiry (and a longest life), sign-out. Every form carries the
session's CSRF token, checked on each POST (the sign-in form a token of its
own, tied to a cookie). Every response forbids inline scripts and styles
(Content-Security-Policy), MIME sniffing and referrers. Without tokens the
server has one anonymous principal: no sign-in, and only requests to a
loopback host name are served (so a web page cannot reach it through DNS
rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from .._log import get_logger
from .._net import is_loopback_host
from ..client import Client
from ..errors import LegionError, Unauthenticated
from . import pages
from . import templates as t
from .state import Patch, chat_path
from .viewer import Viewer

__all__ = ["SECURITY_HEADERS", "Dashboard"]

log = get_logger("legion.dashboard")

COOKIE = "legion_session"
LOGIN_COOKIE = "legion_login"
IDLE_SECONDS = 30 * 60.0
"""A session unused this long ends (an open page keeps it in use)."""
MAX_AGE_SECONDS = 12 * 3600.0
"""A session ends this long after sign-in, used or not."""
MAX_SESSIONS = 256
KEEPALIVE_SECONDS = 15.0
"""An open page's event stream gets a comment this often (and keeps its session)."""
MAX_BODY = 1024 * 1024
"""Largest form accepted (a chat message, an answer)."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
"""Sent with every response."""

STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}

VIEWS: dict[str, Callable[[Mapping[str, str]], set[str]]] = {
    "tree": lambda q: {"runs"},
    "trace": lambda q: {f"run:{q.get('run', '')}"},
    "humans": lambda q: {"humans"},
    "sandboxes": lambda q: {"sandboxes"},
    "agents": lambda q: set(),
    "chat": lambda q: {"chats", f"chat:{q.get('c', '')}"},
}
"""The topics each page shows (besides the navigation's), from its query."""


@dataclass(eq=False)
class Session:
    """One signed-in browser."""

    id: str
    csrf: str
    viewer: Viewer
    """Its principal's, shared with the principal's other sessions."""
    created: float
    last_seen: float
    flash: str = ""
    """A message for the next page shown."""


NEW_SESSION = web.RequestKey("new_session", Session)
"""A session made for this request (no tokens): its cookie goes with the response."""


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _sse(patch: Patch) -> bytes:
    data = json.dumps(patch.to_json(), ensure_ascii=False, separators=(",", ":"))
    return f"event: patch\ndata: {data}\n\n".encode()


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


class Dashboard:
    """The dashboard of a ControllerServer (``legion serve --dashboard HOST:PORT``).

    ``api_address`` is where the server's gRPC API answers (its own private
    socket): everything shown, the agents' system prompts and the principal a
    token signs in as included, comes from there. ``sign_in``: the server
    checks tokens (False: no tokens, one anonymous principal, no sign-in).
    ``clock`` measures session ages.
    """

    def __init__(
        self,
        *,
        api_address: str,
        sign_in: bool,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        idle_seconds: float = IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_address = api_address
        self.sign_in = sign_in
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.url = ""
        self._static = {
            name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC
        }
        self._viewers: dict[str, Viewer] = {}
        """Principal name -> its viewer, while it has sessions."""
        self._anonymous_lock = asyncio.Lock()
        self._anonymous = ""
        """The anonymous principal's name, as the server said (no sign-in)."""
        self._closing: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._runner: web.AppRunner | None = None

    @property
    def needs_sign_in(self) -> bool:
        return self.sign_in

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        """Serve; returns the dashboard's URL. Raises OSError when it cannot bind."""
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        app.on_response_prepare.append(_security_headers)
        get: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "/": self.tree,
            "/runs/{run_id}": self.trace,
            "/humans": self.humans,
            "/sandboxes": self.sandboxes,
            "/agents": self.agents,
            "/chat": self.chat,
            "/events": self.events,
            "/login": self.login_form,
            "/static/{name}": self.static,
        }
        post: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "/login": self.login,
            "/logout": self.logout,
            "/humans/answer": self.answer,
            "/humans/approve": self.approve,
            "/chat/start": self.chat_start,
            "/chat/send": self.chat_send,
            "/chat/stop": self.chat_stop,
        }
        for path, handler in get.items():
            app.router.add_get(path, handler, allow_head=False)
        for path, handler in post.items():
            app.router.add_post(path, handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{'https' if self.ssl_context else 'http'}://{host}:{port}"
        log.info("dashboard_serving", url=self.url, sign_in=self.needs_sign_in)
        return self.url

    async def close(self) -> None:
        """End every session (closing their clients) and stop serving."""
        for session in list(self.sessions.values()):
            self._end(session)
        if self._timer is not None:
            self._timer.cancel()
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # sessions --------------------------------------------------------------------------

    def _new_session(self, viewer: Viewer) -> Session:
        now = self.clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            viewer=viewer,
            created=now,
            last_seen=now,
        )
        self.sessions[session.id] = session
        self._arm()
        return session

    def _end(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        viewer = session.viewer
        if any(other.viewer is viewer for other in self.sessions.values()):
            return
        if self._viewers.get(viewer.principal) is viewer:
            del self._viewers[viewer.principal]
        self._close(viewer)

    def _close(self, viewer: Viewer) -> None:
        task = asyncio.create_task(viewer.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _viewer(self, principal: str) -> Viewer | None:
        """The principal's viewer, if it has one that still follows its events."""
        viewer = self._viewers.get(principal)
        if viewer is not None and not viewer.connected:
            del self._viewers[principal]
            for session in [s for s in self.sessions.values() if s.viewer is viewer]:
                del self.sessions[session.id]  # they sign in again
            self._close(viewer)
            return None
        return viewer

    def _expired(self, session: Session, now: float) -> bool:
        return (
            now - session.last_seen > self.idle_seconds or now - session.created > MAX_AGE_SECONDS
        )

    def _sweep(self) -> None:
        """End the sessions that expired (on every request, and by a timer)."""
        now = self.clock()
        for session in list(self.sessions.values()):
            if self._expired(session, now):
                log.info("dashboard_session_expired", principal=session.viewer.principal)
                self._end(session)
        self._arm()

    def _arm(self) -> None:
        """One timer, at the earliest moment a session could expire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.sessions:
            return
        now = self.clock()
        due = min(
            min(s.last_seen + self.idle_seconds, s.created + MAX_AGE_SECONDS)
            for s in self.sessions.values()
        )
        self._timer = asyncio.get_running_loop().call_later(max(1.0, due - now + 1.0), self._sweep)

    async def _session(self, request: web.Request, *, create: bool = True) -> Session:
        """The request's session, else: sign in (GET pages) or 401. Without
        tokens, a browser without a session gets one (``create``)."""
        self._sweep()
        session = self.sessions.get(request.cookies.get(COOKIE, ""))
        if session is not None and not session.viewer.connected:
            self._end(session)  # the server is going away: nothing live to show
            session = None
        if session is not None:
            session.last_seen = self.clock()
            return session
        if not self.needs_sign_in and create:
            viewer = await self._anonymous_viewer()
            session = self._new_session(viewer)
            request[NEW_SESSION] = session
            return session
        if request.method == "GET" and request.path != "/events":
            raise web.HTTPSeeOther("/login")
        raise web.HTTPUnauthorized(text="sign in first (the session ended or never began)")

    async def _anonymous_viewer(self) -> Viewer:
        async with self._anonymous_lock:
            viewer = self._viewer(self._anonymous) if self._anonymous else None
            if viewer is None:
                client = Client(self.api_address)
                try:
                    viewer = Viewer(client, await client.principal())
                    await viewer.open()
                except LegionError as exc:
                    await (viewer.close() if viewer is not None else client.close())
                    raise web.HTTPServiceUnavailable(
                        text=f"the controller does not answer: {exc}"
                    ) from None
                self._anonymous = viewer.principal
                self._viewers[viewer.principal] = viewer
            return viewer

    def _set_cookie(self, response: web.StreamResponse, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            session.id,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=self.ssl_context is not None,
        )

    async def _form(self, request: web.Request, session: Session) -> Mapping[str, str]:
        """The POSTed form, after its CSRF token is checked."""
        form = await request.post()
        token = form.get("csrf")
        if not isinstance(token, str) or not hmac.compare_digest(token, session.csrf):
            log.warning("dashboard_csrf_refused", path=request.path)
            raise web.HTTPForbidden(
                text="this form is not from this session's pages (no or wrong CSRF token); "
                "reload the page and try again"
            )
        return {k: v for k, v in form.items() if isinstance(v, str)}

    @web.middleware
    async def _guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if not self.needs_sign_in and not is_loopback_host(_host_name(request.host)):
            # Without tokens anyone who reaches it is the principal: a page on
            # another site must not reach it by renaming 127.0.0.1 (DNS rebinding).
            raise web.HTTPMisdirectedRequest(
                text="without tokens this dashboard answers only to a loopback address, "
                "e.g. http://127.0.0.1:PORT/"
            )
        response = await handler(request)
        created = request.get(NEW_SESSION)
        if created is not None:
            self._set_cookie(response, created)
        return response

    def _page(
        self,
        session: Session,
        *,
        title: str,
        view: str,
        content: t.Safe,
        templates: t.Safe = t.EMPTY,
        status: int = 200,
        run: str = "",
        chat: str = "",
    ) -> web.Response:
        flash, session.flash = session.flash, ""
        body = t.page(
            title=title,
            view=view,
            content=content,
            principal=session.viewer.principal,
            csrf=session.csrf,
            pending=len(session.viewer.state.humans),
            can_log_out=self.needs_sign_in,
            flash=flash,
            templates=templates,
            run=run,
            chat=chat,
        )
        return _html(body, status)

    def _error(self, session: Session, status: int, title: str, message: str) -> web.Response:
        content = t.render(t.ERROR, title=title, message=message)
        return self._page(session, title=title, view="error", content=content, status=status)

    # sign-in ---------------------------------------------------------------------------

    def _login_page(self, error: str = "", status: int = 200) -> web.Response:
        nonce = secrets.token_urlsafe(24)
        response = _html(t.login(nonce, error), status)
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            httponly=True,
            samesite="Strict",
            path="/login",
            secure=self.ssl_context is not None,
        )
        return response

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.needs_sign_in:
            return _redirect("/")
        return self._login_page()

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.needs_sign_in:
            return _redirect("/")
        form = await request.post()
        nonce, sent = request.cookies.get(LOGIN_COOKIE, ""), form.get("csrf")
        if not nonce or not isinstance(sent, str) or not hmac.compare_digest(sent, nonce):
            return self._login_page("The sign-in form expired; sign in again.", 403)
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else ""
        if not token:
            return self._login_page("Enter your token.", 400)
        client = Client(self.api_address, token=token)
        try:
            name = await client.principal()  # the controller checks the token, as for any client
        except Unauthenticated:
            await client.close()
            log.warning("dashboard_sign_in_refused", remote=request.remote)
            return self._login_page("The controller does not know this token.", 401)
        except LegionError as exc:
            await client.close()
            return self._login_page(f"The controller does not answer: {exc}", 503)
        if len(self.sessions) >= MAX_SESSIONS:
            await client.close()
            return self._login_page("Too many sessions are open; try again later.", 503)
        viewer = self._viewer(name)
        if viewer is not None:  # the principal's other sessions already follow its events
            await client.close()
        else:
            viewer = Viewer(client, name)
            try:
                await viewer.open()
            except LegionError as exc:
                await viewer.close()
                return self._login_page(f"Cannot follow your runs: {exc}", 503)
            self._viewers[name] = viewer
        session = self._new_session(viewer)
        log.info("dashboard_signed_in", principal=viewer.principal)
        response = _redirect("/")
        self._set_cookie(response, session)
        response.del_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request, create=False)
        await self._form(request, session)
        self._end(session)
        log.info("dashboard_signed_out", principal=session.viewer.principal)
        response = _redirect("/login" if self.needs_sign_in else "/")
        response.del_cookie(COOKIE, path="/")
        return response

    # pages -----------------------------------------------------------------------------

    async def tree(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        content, templates = pages.tree(session.viewer.state)
        return self._page(
            session, title="Agent tree", view="tree", content=content, templates=templates
        )

    async def trace(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        run_id = request.match_info["run_id"]
        run = session.viewer.state.runs.get(run_id)
        if run is None:
            return self._error(
                session,
                404,
                "No such run",
                f"This session has seen no run {run_id[:100]!r}: it shows the runs of "
                f"{session.viewer.principal} that happened while signed in.",
            )
        content, templates = pages.trace(session.viewer.state, run)
        return self._page(
            session,
            title=f"{run.agent} {run_id[:8]}",
            view="trace",
            content=content,
            templates=templates,
            run=run_id,
        )

    async def humans(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        content, templates = pages.humans(session.viewer.state, session.csrf)
        return self._page(
            session, title="Human requests", view="humans", content=content, templates=templates
        )

    async def answer(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request, create=False)
        form = await self._form(request, session)
        ref, answer = form.get("ref", ""), form.get("answer", "")
        if not answer.strip():
            session.flash = "Type an answer first."
        else:
            try:
                await session.viewer.answer(ref, answer)
            except LegionError as exc:
                session.flash = f"The answer was not taken: {exc}"
        return _redirect("/humans")

    async def approve(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request, create=False)
        form = await self._form(request, session)
        decision = form.get("decision", "")
        if decision not in ("approve", "refuse"):
            session.flash = "Choose Approve or Refuse."
        else:
            try:
                await session.viewer.decide(
                    form.get("ref", ""),
                    approved=decision == "approve",
                    reason=form.get("reason", "").strip(),
                )
            except LegionError as exc:
                session.flash = f"The decision was not taken: {exc}"
        return _redirect("/humans")

    async def sandboxes(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        await session.viewer.read_sandboxes()
        content, templates = pages.sandboxes(session.viewer.state)
        return self._page(
            session, title="Sandboxes", view="sandboxes", content=content, templates=templates
        )

    async def agents(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        try:
            infos = await session.viewer.client.list_agents()
        except LegionError as exc:
            return self._error(session, 503, "Agents", f"The controller does not answer: {exc}")
        content = pages.agents(infos)
        return self._page(session, title="Agents", view="agents", content=content)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request)
        try:
            names = [info.name for info in await session.viewer.client.list_agents()]
        except LegionError as exc:
            return self._error(session, 503, "Chat", f"The controller does not answer: {exc}")
        chosen = request.query.get("c", "")
        content, templates = pages.chat(session.viewer.state, session.csrf, names, chosen)
        return self._page(
            session,
            title="Chat",
            view="chat",
            content=content,
            templates=templates,
            chat=chosen if chosen in session.viewer.state.chats else "",
        )

    async def chat_start(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request, create=False)
        form = await self._form(request, session)
        try:
            conversation_id = await session.viewer.start_chat(form.get("agent", ""))
        except LegionError as exc:
            session.flash = f"The agent did not start: {exc}"
            return _redirect("/chat")
        return _redirect(chat_path(conversation_id))

    def _conversation(self, session: Session, form: Mapping[str, str]) -> str | None:
        conversation_id = form.get("conversation", "")
        if conversation_id in session.viewer.state.chats:
            return conversation_id
        session.flash = "That conversation was not started from your dashboard."
        return None

    async def chat_send(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request, create=False)
        form = await self._form(request, session)
        conversation_id = self._conversation(session, form)
        if conversation_id is None:
            return _redirect("/chat")
        message = form.get("message", "")
        if message.strip():
            session.viewer.send(conversation_id, message)
        else:
            session.flash = "Type a message first."
        return _redirect(chat_path(conversation_id))

    async def chat_stop(self, request: web.Request) -> web.StreamResponse:
        session = await self._session(request, create=False)
        form = await self._form(request, session)
        conversation_id = self._conversation(session, form)
        if conversation_id is None:
            return _redirect("/chat")
        try:
            await session.viewer.stop_chat(conversation_id)
        except LegionError as exc:
            session.flash = f"The agent was not stopped: {exc}"
        return _redirect(chat_path(conversation_id))

    # live updates ------------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the patches of the topics the page shows."""
        session = await self._session(request, create=False)
        viewer = session.viewer
        if not viewer.connected:
            raise web.HTTPServiceUnavailable(text="the controller's event stream has ended")
        view = VIEWS.get(request.query.get("view", ""))
        if view is None:
            raise web.HTTPBadRequest(text=f"view must be one of {sorted(VIEWS)}")
        topics = {"nav", *view(request.query)}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        listener = viewer.listen(topics)
        try:
            await response.write(b"retry: 2000\n\n")
            while True:
                try:
                    patch = await asyncio.wait_for(listener.queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    if session.id not in self.sessions:
                        break
                    session.last_seen = self.clock()  # an open page keeps its session
                    await response.write(b": keepalive\n\n")
                    continue
                if patch is None:
                    break
                await response.write(_sse(patch))
        except ConnectionResetError:
            pass  # the page was closed
        finally:
            viewer.unlisten(listener)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=STATIC[name], charset="utf-8")
