"""`legion serve --auth module:factory`: your own Authenticator, loaded at
start, beside a token table; a broken one answers INTERNAL, never crashes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import legion
from legion.server import Principal
from legion.server.commands import FirstOf, load_authenticator
from legion.testing import FakeOpenAIServer

from .conftest import (
    ServerProcess,
    Tokens,
    legion_cli,
    server_env,
    start_server,
    stop_cleanly,
    write_token_file,
)
from .identity_agents import PrefixAuthenticator, WrongType

AGENTS = "tests.server.identity_agents"


def test_a_factory_or_an_object_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEGION_TEST_AUTH_PREFIX", "u-")
    assert isinstance(load_authenticator(f"{AGENTS}:make_authenticator"), PrefixAuthenticator)
    assert isinstance(load_authenticator(f"{AGENTS}:PrefixAuthenticator"), PrefixAuthenticator)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (f"{AGENTS}", "as package.module:factory"),
        (f"{AGENTS}:", "as package.module:factory"),
        ("tests.server.no_such_module:make", "cannot load it: ModuleNotFoundError"),
        (f"{AGENTS}:absent", "cannot load it: AttributeError"),
        (f"{AGENTS}:NOT_AN_AUTHENTICATOR", "gave 42, not an Authenticator"),
        (f"{AGENTS}:failing_factory", "the factory raised RuntimeError: no configuration"),
        (f"{AGENTS}:REGISTRY", "not an Authenticator"),
    ],
)
def test_a_bad_auth_spec_says_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(legion.UsageError) as caught:
        load_authenticator(spec)
    assert problem in str(caught.value)


async def test_first_of_asks_in_turn_and_checks_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEGION_TEST_AUTH_PREFIX", "u-")
    either = FirstOf([PrefixAuthenticator(), WrongType()])
    ada = await either.authenticate("user:u-ada:acme")
    assert ada == Principal(
        "u-ada", vault={"user": "u-ada", "tenant": "acme"}, max_concurrent_runs=1
    )
    with pytest.raises(TypeError, match="returned str, not a Principal or None"):
        await either.authenticate("user:bob:acme")


@pytest.fixture(scope="module")
def plugin_server(
    docker_ready: None,
    fake_model: FakeOpenAIServer,
    tokens: Tokens,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """A server with the prefix authenticator (``u-``) and the shared token table."""
    where = tmp_path_factory.mktemp("auth-plugin")
    server = start_server(
        [
            "--agents",
            f"{AGENTS}:REGISTRY",
            "--listen",
            "127.0.0.1:0",
            "--auth",
            f"{AGENTS}:make_authenticator",
            "--tokens",
            str(write_token_file(where, tokens)),
            "--grace-seconds",
            "2",
        ],
        server_env(fake_model, LEGION_TEST_AUTH_PREFIX="u-"),
        where,
    )
    try:
        yield server
    finally:
        stop_cleanly(server)


async def test_the_plugins_principal_and_vault_reach_a_tool(
    plugin_server: ServerProcess, tokens: Tokens
) -> None:
    async with legion.Client(plugin_server.address, token="user:u-ada:acme") as client:
        assert await client.principal() == "u-ada"
        result = await client.run("Teller", "#code Identity.whoami()")
    assert result.output == {"user": "u-ada", "tenant": "acme", "roles": None}
    async with legion.Client(plugin_server.address, token=tokens.alice) as client:
        assert await client.principal() == "alice"  # the token table still answers
    for refused in ("user:bob:acme", "u-ada", tokens.alice + "x"):
        async with legion.Client(plugin_server.address, token=refused) as client:
            with pytest.raises(legion.Unauthenticated, match="unknown token"):
                await client.principal()


async def test_a_failing_authenticator_answers_internal_and_the_server_lives_on(
    docker_ready: None, fake_model: FakeOpenAIServer, tmp_path: Path
) -> None:
    server = start_server(
        ["--agents", f"{AGENTS}:REGISTRY", "--listen", "127.0.0.1:0", "--auth", f"{AGENTS}:Broken"],
        server_env(fake_model),
        tmp_path,
    )
    try:
        for _ in range(2):
            async with legion.Client(server.address, token="anything") as client:
                with pytest.raises(legion.RemoteError) as caught:
                    await client.principal()
            assert caught.value.code == "INTERNAL"
            assert "the identity provider is down" not in str(caught.value)
        assert "the identity provider is down" in server.log()
    finally:
        stop_cleanly(server)


def test_a_bad_auth_option_stops_the_server_at_start(fake_model: FakeOpenAIServer) -> None:
    done = legion_cli(
        "serve", "--agents", f"{AGENTS}:REGISTRY", "--listen", "127.0.0.1:0",
        "--auth", f"{AGENTS}:failing_factory",
        env=server_env(fake_model), timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "the factory raised RuntimeError: no configuration" in done.stderr
