"""A real `legion serve --dashboard` subprocess (the agents, fake model and
tokens of tests/server/conftest.py), HTTP clients signed in to it, and the
browser set-up: Debian's chromium and the playwright-core package (`make test`
installs both)."""

from __future__ import annotations

import re
import shutil
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from legion.testing import FakeOpenAIServer
from tests.conftest import missing
from tests.server import conftest as server_fixtures
from tests.server.conftest import (
    ServerProcess,
    Tokens,
    legion_cli,
    server_env,
    start_server,
    stop_cleanly,
    write_token_file,
)

# The controller-service tests' fixtures, by name: its fake model and tokens.
fake_model = server_fixtures.fake_model
tokens = server_fixtures.tokens

__all__ = ["legion_cli", "server_env"]

HERE = Path(__file__).parent
CHROMIUM = Path("/usr/bin/chromium")
DASHBOARD_LINE = re.compile(r"legion serve: dashboard on (\S+)")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="package")
def node() -> str:
    """node, with playwright-core installed in tests/dashboard."""
    found = shutil.which("node")
    if found is None:
        missing("node is not installed (apt-get install nodejs npm): no browser test")
    assert found is not None
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.fail(
            "playwright-core is not installed: `make test` installs it "
            "(or `npm install` in tests/dashboard)",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="package")
def chromium(node: str) -> Path:
    """Debian's chromium (`make test` installs it when it can)."""
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is missing (apt-get install chromium): no browser test")
    return CHROMIUM


@dataclass(frozen=True)
class Served:
    """`legion serve` with its dashboard."""

    server: ServerProcess
    tokens: Tokens
    url: str

    @property
    def address(self) -> str:
        return self.server.address


@pytest.fixture(scope="package")
def dashboard(
    docker_ready: None,
    fake_model: FakeOpenAIServer,
    tokens: Tokens,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """`legion serve --dashboard 127.0.0.1:0` with tokens for alice, bob and carol."""
    where = tmp_path_factory.mktemp("dashboard")
    token_file = write_token_file(where, tokens)
    server = start_server(
        [
            *("--listen", "127.0.0.1:0", "--dashboard", "127.0.0.1:0"),
            *("--tokens", str(token_file), "--grace-seconds", "2"),
        ],
        server_env(fake_model),
        where,
    )
    try:
        found = [m.group(1) for line in server.stdout if (m := DASHBOARD_LINE.search(line))]
        assert found, f"no dashboard line in {server.stdout}"
        yield Served(server, tokens, found[0])
    finally:
        stop_cleanly(server)


class Browser:
    """An HTTP client with its own cookies, as one browser would be."""

    def __init__(self, url: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.url = url
        # unsafe: keep cookies of an IP address host (127.0.0.1)
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=tls) if tls is not None else None,
            raise_for_status=False,
        )
        self.csrf = ""

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        async with self.http.get(self.url + path, allow_redirects=False, headers=headers) as got:
            return got.status, await got.text()

    async def post(self, path: str, form: dict[str, str]) -> aiohttp.ClientResponse:
        answer = await self.http.post(self.url + path, data=form, allow_redirects=False)
        await answer.read()
        answer.release()
        return answer

    async def sign_in(self, token: str) -> aiohttp.ClientResponse:
        status, page = await self.get("/login")
        assert status == 200, page
        (nonce,) = CSRF.findall(page)
        answer = await self.post("/login", {"csrf": nonce, "token": token})
        if answer.status == 303:
            status, page = await self.get("/")
            assert status == 200, page
            self.csrf = CSRF.findall(page)[0]
        return answer


@pytest.fixture
async def browsers(dashboard: Served) -> AsyncIterator[list[Browser]]:
    """Make HTTP browsers with ``browsers.append``; they are closed after the test."""
    made: list[Browser] = []
    yield made
    for browser in made:
        await browser.close()


async def signed_in(dashboard: Served, made: list[Browser], token: str) -> Browser:
    browser = Browser(dashboard.url)
    made.append(browser)
    answer = await browser.sign_in(token)
    assert answer.status == 303, await answer.text()
    return browser
