"""Agents and authenticators for the identity tests (tests/server/test_jwt.py
and test_auth_plugin.py): served with ``--agents
tests.server.identity_agents:REGISTRY`` and ``--auth
tests.server.identity_agents:...``."""

from __future__ import annotations

import os
from typing import Any

import legion
from legion.server import Principal


class Identity(legion.Tool):
    """Who is calling, as the server's authenticator described them."""

    def whoami(self) -> dict[str, Any]:
        """The vault's user, tenant and roles (each None when not bound)."""
        return {key: legion.vault.get(key) for key in ("user", "tenant", "roles")}


class Teller(legion.Agent):
    """Runs Python with the caller's identity at hand."""

    tools = [Identity]
    config = {"max_iterations": 2, "max_retries": 1}


REGISTRY = {"Teller": Teller}


class PrefixAuthenticator:
    """Accepts ``user:NAME:TENANT`` when NAME starts with the prefix given in
    ``LEGION_TEST_AUTH_PREFIX``; the tenant goes into the vault."""

    def __init__(self) -> None:
        self.prefix = os.environ["LEGION_TEST_AUTH_PREFIX"]

    async def authenticate(self, token: str) -> Principal | None:
        kind, _, rest = token.partition(":")
        name, _, tenant = rest.partition(":")
        if kind != "user" or not name.startswith(self.prefix):
            return None
        return Principal(name, vault={"user": name, "tenant": tenant}, max_concurrent_runs=1)


def make_authenticator() -> PrefixAuthenticator:
    """The factory ``--auth`` names."""
    return PrefixAuthenticator()


class Broken:
    """Its authenticate raises (the server must answer INTERNAL, not crash)."""

    async def authenticate(self, token: str) -> Principal | None:
        raise RuntimeError("the identity provider is down")


class WrongType:
    """Its authenticate answers a string instead of a Principal."""

    async def authenticate(self, token: str) -> Any:
        return "alice"


def failing_factory() -> Any:
    raise RuntimeError("no configuration")


NOT_AN_AUTHENTICATOR = 42
