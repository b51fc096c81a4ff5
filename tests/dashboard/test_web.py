"""The dashboard over HTTP (aiohttp's client, one cookie jar per "browser")
against a real `legion serve --dashboard`: sign-in and sign-out, CSRF
refusals, the security headers, escaping in server-rendered pages, and a
principal who sees nothing of another's runs, questions, sandboxes or chats,
on any page or on the event stream. Session expiry is checked on an
in-process server whose dashboard clock the test moves."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

import legion
from legion.dashboard import SECURITY_HEADERS
from legion.server import ControllerServer, ServerSettings, TokenTable
from legion.server.auth import Principal
from legion.testing import FakeOpenAIServer

from ..server.support import Beacon
from .conftest import CSRF, Browser, Served, legion_cli, server_env, signed_in

pytestmark = pytest.mark.docker

PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture
async def alice(dashboard: Served) -> AsyncIterator[legion.Client]:
    async with legion.Client(dashboard.address, token=dashboard.tokens.alice) as client:
        yield client


async def read_events(browser: Browser, view: str, into: list[str], **query: str) -> None:
    """Read a page's event stream (its `data:` lines) into ``into`` until cancelled."""
    async with browser.http.get(
        f"{browser.url}/events", params={"view": view, **query}, timeout=aiohttp.ClientTimeout()
    ) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        async for line in stream.content:
            if line.startswith(b"data: "):
                into.append(line[6:].decode())


async def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait until ``check()`` holds (it reads what a background reader collects)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def page_showing(browser: Browser, path: str, text: str, timeout: float = 60) -> str:
    """GET ``path`` until it shows ``text``: the session's own event stream may
    deliver a little after the test's client hears of the same event."""
    deadline = time.monotonic() + timeout
    while True:
        status, page = await browser.get(path)
        if status == 200 and text in page:
            return page
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never showed {text!r}: {status} {page[-2000:]}")
        await asyncio.sleep(0.1)


# --- signing in and out --------------------------------------------------------------------


async def test_sign_in_with_a_token_then_sign_out(
    dashboard: Served, browsers: list[Browser]
) -> None:
    browser = Browser(dashboard.url)
    browsers.append(browser)
    status, _ = await browser.get("/")
    assert status == 303  # to /login

    refused = await browser.sign_in("not-a-token")
    assert refused.status == 401
    assert "The controller does not know this token." in await refused.text()
    assert "legion_session" not in {c.key for c in browser.http.cookie_jar}

    answer = await browser.sign_in(dashboard.tokens.alice)
    assert answer.status == 303 and answer.headers["Location"] == "/"
    cookie = answer.cookies["legion_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    status, page = await browser.get("/")
    assert status == 200 and "signed in as <strong>alice</strong>" in page

    kept = cookie.value
    out = await browser.post("/logout", {"csrf": browser.csrf})
    assert out.status == 303 and out.headers["Location"] == "/login"
    status, _ = await browser.get("/")
    assert status == 303
    # The old cookie is dead on the server, not only forgotten by the browser.
    replay = Browser(dashboard.url)
    browsers.append(replay)
    replay.http.cookie_jar.update_cookies({"legion_session": kept})
    status, _ = await replay.get("/")
    assert status == 303
    status, _ = await replay.get("/events?view=tree")
    assert status == 401


async def test_the_sessions_of_one_principal_share_one_event_stream(
    dashboard: Served, browsers: list[Browser], alice: legion.Client
) -> None:
    # More sessions than the 16 Events streams a principal may open...
    for _ in range(20):
        await signed_in(dashboard, browsers, dashboard.tokens.alice)
    # ...leave streams for alice's other clients.
    async with contextlib.AsyncExitStack() as held:
        for _ in range(8):
            await held.enter_async_context(alice.events())


async def test_forms_without_the_session_csrf_token_are_refused(
    dashboard: Served, browsers: list[Browser], alice: legion.Client
) -> None:
    browser = await signed_in(dashboard, browsers, dashboard.tokens.alice)
    async with alice.events(name_prefixes=["human.request"]) as events:
        asking = asyncio.create_task(alice.run("Coder", "#code Human.ask('Ship?')"))
        try:
            async for event in events:
                ref = event.data["ref"]
                break
            for form in ({"ref": ref, "answer": "yes"}, {"ref": ref, "answer": "yes", "csrf": "x"}):
                refused = await browser.post("/humans/answer", form)
                assert refused.status == 403
                assert "CSRF" in await refused.text()
            # Nothing was answered: the question still waits, and the right form answers it.
            await page_showing(browser, "/humans", "Ship?")
            taken = await browser.post(
                "/humans/answer", {"ref": ref, "answer": "yes", "csrf": browser.csrf}
            )
            assert taken.status == 303
            assert (await asyncio.wait_for(asking, 60)).output == "yes"
        finally:
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)

    assert (await browser.post("/logout", {})).status == 403
    assert (await browser.get("/"))[0] == 200  # still signed in
    # The sign-in form is tied to its own cookie: one posted from elsewhere is refused.
    stranger = Browser(dashboard.url)
    browsers.append(stranger)
    forged = await stranger.post("/login", {"csrf": "guess", "token": dashboard.tokens.alice})
    assert forged.status == 403 and "legion_session" not in {
        c.key for c in stranger.http.cookie_jar
    }


async def test_every_response_carries_the_security_headers(
    dashboard: Served, browsers: list[Browser]
) -> None:
    browser = await signed_in(dashboard, browsers, dashboard.tokens.alice)
    paths = ["/login", "/", "/humans", "/sandboxes", "/agents", "/chat", "/runs/nope"]
    paths += ["/static/dashboard.js", "/static/dashboard.css", "/no-such-page"]
    for path in paths:
        async with browser.http.get(browser.url + path, allow_redirects=False) as answer:
            for name, value in SECURITY_HEADERS.items():
                assert answer.headers.get(name) == value, (path, name)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "default-src 'self'; script-src 'self'; style-src 'self'" in csp
    # Pictures only from this server or inline data: (a step's figures); no other origin.
    assert "img-src 'self' data:;" in csp
    async with browser.http.get(
        browser.url + "/events", params={"view": "tree"}, timeout=aiohttp.ClientTimeout(total=30)
    ) as stream:
        assert stream.headers["X-Content-Type-Options"] == "nosniff"
        assert stream.headers["Content-Security-Policy"] == csp


# --- escaping ----------------------------------------------------------------------------------


async def test_server_rendered_pages_escape_what_models_and_sandboxes_said(
    dashboard: Served, browsers: list[Browser], alice: legion.Client
) -> None:
    browser = await signed_in(dashboard, browsers, dashboard.tokens.alice)
    beacon = Beacon("human.request")
    asking = asyncio.create_task(
        alice.run("Coder", f"#code print({PAYLOAD!r})\nHuman.ask({PAYLOAD!r})", on_event=beacon)
    )
    try:
        await asyncio.wait_for(beacon.reached.wait(), 60)
        humans = await page_showing(browser, "/humans", "__pwned")
        _, tree = await browser.get("/")
        await alice.respond_human(
            next(e for e in beacon.events if e.name == "human.request").data["ref"], PAYLOAD
        )
        result = await asyncio.wait_for(asking, 60)
    finally:
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
    status, trace = await browser.get(f"/runs/{result.run_id}")
    assert status == 200
    escaped = html.escape(PAYLOAD, quote=True)
    for page in (humans, tree, trace):
        assert "<script>window" not in page and "<img src=x" not in page
    assert f'<pre class="text question" data-field="question">{escaped}</pre>' in humans
    assert escaped in tree  # in the task
    assert f'data-field="stdout">{escaped}\n</pre>' in trace
    assert html.escape(json.dumps(PAYLOAD), quote=True) in trace  # the value
    # The run id from the URL is hostile input too.
    status, missing = await browser.get("/runs/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert status == 404 and "<script>alert" not in missing
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in missing


# --- one principal's view ------------------------------------------------------------------------


async def test_a_principal_sees_nothing_of_anothers_runs_anywhere(
    dashboard: Served, browsers: list[Browser], alice: legion.Client
) -> None:
    alices = await signed_in(dashboard, browsers, dashboard.tokens.alice)
    bobs = await signed_in(dashboard, browsers, dashboard.tokens.bob)
    streams: dict[str, list[str]] = {view: [] for view in ("tree", "humans", "sandboxes")}
    readers = [asyncio.create_task(read_events(bobs, view, got)) for view, got in streams.items()]
    await until(lambda: all(streams.values()), "bob's pages to connect")

    # alice: a long-lived agent, and a run that waits on a question with its sandbox live.
    started = await alices.post("/chat/start", {"agent": "Echo", "csrf": alices.csrf})
    alices_chat = started.headers["Location"].split("c=")[1]
    beacon = Beacon("human.request")
    asking = asyncio.create_task(
        alice.run("Coder", "#code Human.ask('For alice only?')", on_event=beacon)
    )
    try:
        await asyncio.wait_for(beacon.reached.wait(), 60)
        ref = next(e for e in beacon.events if e.name == "human.request").data["ref"]
        run_id = beacon.run_id
        (sandbox,) = await alice.list_sandboxes()
        # Once alice's session has the question, bob's would have had it too.
        alices_humans = await page_showing(alices, "/humans", "For alice only?")

        _, tree = await bobs.get("/")
        _, humans = await bobs.get("/humans")
        _, sandboxes = await bobs.get("/sandboxes")
        status, trace = await bobs.get(f"/runs/{run_id}")
        _, chat = await bobs.get(f"/chat?c={alices_chat}")
        # bob cannot answer alice's question, nor talk to her agent, through the pages.
        await bobs.post("/humans/answer", {"ref": ref, "answer": "no", "csrf": bobs.csrf})
        _, after_answer = await bobs.get("/humans")
        sent = await bobs.post(
            "/chat/send", {"conversation": alices_chat, "message": "hi", "csrf": bobs.csrf}
        )
        _, after_send = await bobs.get("/chat")
        # ...while alice's own pages show all of it.
        _, alices_sandboxes = await alices.get("/sandboxes")
        await alice.respond_human(ref, "yes")
        assert (await asyncio.wait_for(asking, 60)).output == "yes"
    finally:
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)

    # bob's own run, last: once his tree has it, anything of alice's would have arrived.
    async with legion.Client(dashboard.address, token=dashboard.tokens.bob) as bob:
        own = await bob.run("Echo", "bob's own run")
    await until(lambda: any(own.run_id in d for d in streams["tree"]), "bob's own run")
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    assert "For alice only?" in alices_humans and sandbox.container_id[:12] in alices_sandboxes
    for page in (tree, humans, sandboxes, chat, after_answer, after_send):
        for secret in (run_id, run_id[:8], "For alice only?", sandbox.container_id[:12]):
            assert secret not in page
        assert alices_chat not in page
    # The trace page of her run is a 404 that only repeats the id bob asked for.
    assert status == 404 and "This session has seen no run" in trace
    assert "For alice only?" not in trace and "Coder" not in trace
    assert "The answer was not taken" in after_answer and "another principal" in after_answer
    assert sent.status == 303 and "not started from your dashboard" in after_send
    for view, data in streams.items():
        for line in data:
            assert run_id not in line and "For alice only?" not in line, view
            assert sandbox.container_id not in line, view


# --- sessions that expire, and the server without tokens ------------------------------------------


async def test_idle_and_old_sessions_expire(runtime: legion.SandboxRuntime) -> None:
    token = "tok-expiry-test"
    settings = ServerSettings(
        listen="127.0.0.1:0",
        dashboard="127.0.0.1:0",
        authenticator=TokenTable({token: Principal("dora")}),
        grace_seconds=0,
    )
    async with _server(settings, runtime) as server:
        dashboard = server.dashboard
        assert dashboard is not None
        now = [1000.0]
        dashboard.clock = lambda: now[0]
        browser = Browser(server.dashboard_url)
        try:
            assert (await browser.sign_in(token)).status == 303
            now[0] += dashboard.idle_seconds - 1
            assert (await browser.get("/"))[0] == 200  # used: the idle time starts again
            now[0] += dashboard.idle_seconds - 1
            assert (await browser.get("/"))[0] == 200
            now[0] += dashboard.idle_seconds + 1
            status, _ = await browser.get("/")
            assert status == 303 and not dashboard.sessions  # ended, its client closed

            assert (await browser.sign_in(token)).status == 303
            for _ in range(int(12 * 3600 / dashboard.idle_seconds) + 1):
                now[0] += dashboard.idle_seconds - 1  # always in use, yet too old at last
                await browser.get("/")
            status, _ = await browser.get("/")
            assert status == 303 and not dashboard.sessions
        finally:
            await browser.close()


def _server(settings: ServerSettings, runtime: legion.SandboxRuntime) -> ControllerServer:
    from tests.server.agents import REGISTRY

    return ControllerServer(REGISTRY, settings, runtime=runtime)


async def test_without_tokens_only_loopback_names_reach_the_dashboard(
    runtime: legion.SandboxRuntime,
) -> None:
    settings = ServerSettings(listen="127.0.0.1:0", dashboard="127.0.0.1:0", grace_seconds=0)
    async with _server(settings, runtime) as server:
        browser = Browser(server.dashboard_url)
        try:
            status, page = await browser.get("/")
            assert status == 200 and "signed in as <strong>local</strong>" in page
            assert "Log out" not in page
            assert (await browser.get("/login"))[0] == 303
            port = server.dashboard_url.rsplit(":", 1)[1]
            for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
                assert (await browser.get("/", headers={"Host": host}))[0] == 200
            for host in (f"attacker.example:{port}", "attacker.example", f"10.0.0.1:{port}"):
                status, said = await browser.get("/", headers={"Host": host})
                assert status == 421 and "loopback" in said
            # No sign-in, but forms still need the session's CSRF token.
            _, chat = await browser.get("/chat")
            forged = await browser.post("/chat/start", {"agent": "Echo"})
            assert forged.status == 403
            started = await browser.post(
                "/chat/start", {"agent": "Echo", "csrf": CSRF.findall(chat)[0]}
            )
            assert started.status == 303 and started.headers["Location"].startswith("/chat?c=")
        finally:
            await browser.close()


async def test_under_tls_the_dashboard_is_https_with_the_same_client_certificates(
    runtime: legion.SandboxRuntime, tmp_path: Path
) -> None:
    from tests.server.test_serve import _certificate, _key, _pem_key

    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _certificate("Legion test CA", ca_key, ca=True)
    files = {
        "ca.pem": ca,
        "server.pem": _certificate("legion server", server_key, ("Legion test CA", ca_key)),
        "server.key": _pem_key(server_key),
        "client.pem": _certificate("a client", client_key, ("Legion test CA", ca_key)),
        "client.key": _pem_key(client_key),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    token = "tok-tls-test"
    settings = ServerSettings(
        listen="127.0.0.1:0",
        dashboard="127.0.0.1:0",
        authenticator=TokenTable({token: Principal("erin")}),
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
        grace_seconds=0,
    )
    async with _server(settings, runtime) as server:
        assert server.dashboard_url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=tmp_path / "ca.pem")
        trusted.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        browser = Browser(server.dashboard_url, tls=trusted)
        anonymous = Browser(
            server.dashboard_url, tls=ssl.create_default_context(cafile=tmp_path / "ca.pem")
        )
        try:
            answer = await browser.sign_in(token)
            assert answer.status == 303
            assert answer.cookies["legion_session"]["secure"]
            status, page = await browser.get("/agents")
            assert status == 200 and "signed in as <strong>erin</strong>" in page
            with pytest.raises(aiohttp.ClientError):  # no client certificate
                await anonymous.get("/login")
        finally:
            await browser.close()
            await anonymous.close()


def test_serve_refuses_a_public_dashboard_without_tokens_or_a_taken_port(
    docker_ready: None, fake_model: FakeOpenAIServer
) -> None:
    refused = legion_cli(
        *("serve", "--agents", "tests.server.agents:REGISTRY", "--listen", "127.0.0.1:0"),
        *("--dashboard", "0.0.0.0:0"),
        env=server_env(fake_model),
    )
    assert refused.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0:0 without tokens" in refused.stderr
    malformed = legion_cli(
        *("serve", "--agents", "tests.server.agents:REGISTRY", "--dashboard", "8080"),
        env=server_env(fake_model),
    )
    assert malformed.returncode == 2
    assert "--dashboard takes HOST:PORT" in malformed.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = legion_cli(
            *("serve", "--agents", "tests.server.agents:REGISTRY", "--store", "memory"),
            *("--listen", "127.0.0.1:0", "--dashboard", f"127.0.0.1:{taken.getsockname()[1]}"),
            env=server_env(fake_model),
        )
    assert busy.returncode == 2, busy.stderr
    assert "cannot serve the dashboard on 127.0.0.1:" in busy.stderr
    assert "Traceback" not in busy.stderr
