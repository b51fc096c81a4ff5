"""The agents the test servers offer (``--agents tests.server.agents:REGISTRY``).

Their model is the test's FakeOpenAIServer, named by LEGION_MODEL and
LEGION_API_BASE in the server's environment; it answers by the task (see
``conftest.script``). The other names are registries that must be refused.
"""

from __future__ import annotations

import legion


class Profile(legion.Tool):
    """The caller's profile, on the host."""

    def user(self) -> str:
        """Who is calling: the vault's "user", which the server's token table sets."""
        return str(legion.vault.require("user"))


class Echo(legion.Agent):
    """Says what it is told."""

    config = {"max_iterations": 2, "max_retries": 1}


class Coder(legion.Agent):
    """Runs Python, with the caller's profile and a person at hand."""

    tools = [Profile, legion.Human]
    config = {"max_iterations": 2, "max_retries": 1}


class Counter(legion.Agent):
    """Counts."""

    output_schema = {"type": "integer", "minimum": 0}
    config = {"max_retries": 0}


class Keeper(legion.Agent):
    """Keeps its variables from one turn to the next."""

    config = {"binding_scope": "conversation", "max_iterations": 2, "max_retries": 1}


class Editor(legion.Agent):
    """Hands work to a sub-agent and asks a person before it answers."""

    tools = [legion.SubAgents(Echo), legion.Human]
    tool_config = {"Human": {"timeout": 120}}
    config = {"max_iterations": 2, "max_retries": 1}


class Base(legion.Agent, abstract=True):
    """A base for other agents."""


REGISTRY = {"Echo": Echo, "Coder": Coder, "Counter": Counter, "Keeper": Keeper, "Editor": Editor}


def make_registry() -> list[type[legion.Agent]]:
    return [Echo, Counter]


NOT_AGENTS = {"Echo": Echo, "Oops": dict}
ABSTRACT = [Base]
NUMBER = 42
EMPTY: list[type[legion.Agent]] = []
