"""Agents are checked when their class is created; the prompt is deterministic."""

from __future__ import annotations

import json
import subprocess
import sys

import pydantic
import pytest

import legion


class Notes(legion.Tool):
    """Notes kept on the host."""

    def add(self, text: str) -> int:
        """Store a note; returns its id."""
        return len(text)


def test_missing_docstring_says_how_to_fix_it() -> None:
    with pytest.raises(legion.UsageError, match=r"has no docstring.*add one"):

        class Nameless(legion.Agent):
            tools = [Notes]


def test_unknown_config_key_names_the_closest() -> None:
    with pytest.raises(legion.UsageError, match="did you mean 'max_iterations'"):

        class Typo(legion.Agent):
            """Has a typo."""

            config = {"max_iteration": 3}


def test_bad_config_value() -> None:
    with pytest.raises(legion.UsageError, match="binding_scope must be one of"):

        class Scoped(legion.Agent):
            """Wrong scope."""

            config = {"binding_scope": "forever"}


def test_tool_with_no_public_functions() -> None:
    class Hidden:
        def _secret(self) -> None: ...

    with pytest.raises(legion.UsageError, match=r"Tooly\.tools: tool Hidden has no public"):

        class Tooly(legion.Agent):
            """Uses a tool with nothing to call."""

            tools = [Hidden]


def test_bad_output_schema_and_actions_and_tool_config() -> None:
    with pytest.raises(legion.UsageError, match="not a valid JSON Schema"):

        class BadSchema(legion.Agent):
            """Bad schema."""

            output_schema = {"type": "nonsense"}

    with pytest.raises(legion.UsageError, match="no way to finish"):

        class NeverEnds(legion.Agent):
            """Cannot finish."""

            action_types = ["eval_and_continue"]

    with pytest.raises(legion.UsageError, match="not among its tools"):

        class Misconfigured(legion.Agent):
            """Configures a tool it lacks."""

            tools = [Notes]
            tool_config = {"Nope": {"x": 1}}

    def plain(x: int) -> int:
        return x

    with pytest.raises(legion.UsageError, match=r"only legion\.Tool subclasses take options"):

        class PlainConfigured(legion.Agent):
            """Configures a plain function."""

            tools = [plain]
            tool_config = {"plain": {"x": 1}}


def test_abstract_bases_and_instantiation() -> None:
    class Base(legion.Agent, abstract=True):
        tools = [Notes]

    class Concrete(Base):
        """Inherits the tools."""

    assert [t.name for t in Concrete.__legion_definition__.tools] == ["Notes"]
    with pytest.raises(legion.UsageError, match="abstract"):
        legion.prompt_for(Base)
    with pytest.raises(legion.UsageError, match="not instantiated"):
        Concrete()


class Answer(pydantic.BaseModel):
    title: str
    score: float


class Scholar(legion.Agent):
    """Finds and ranks papers."""

    tools = [Notes, legion.expose(json, functions=["dumps"])]
    output_schema = Answer
    extra_instructions = "Cite your sources."


def test_prompt_is_deterministic_and_complete() -> None:
    prompt = legion.prompt_for(Scholar)
    assert prompt == legion.prompt_for(Scholar)
    assert prompt.startswith("You are Scholar. Finds and ranks papers.")
    assert "class Notes(legion.Tool):" in prompt and "def add(self, text: str) -> int:" in prompt
    assert "def json.dumps(" in prompt  # an exposed module shows signatures, not source
    assert '"title"' in prompt and "JSON Schema" in prompt
    assert "persist from step to step" in prompt
    assert "Cite your sources." in prompt
    assert "No network" in prompt
    iteration = legion.prompt_for(Scholar, binding_scope="iteration")
    assert "do NOT survive" in iteration


def test_prompt_override_replaces_everything() -> None:
    class Custom(legion.Agent):
        """Custom."""

        system_prompt = "Only this."

    assert legion.prompt_for(Custom) == "Only this."


def test_cli_prints_the_prompt() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "legion.cli", "prompt", "tests.unit.test_agent_definition:Scholar"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == legion.prompt_for(Scholar)
    bad = subprocess.run(
        [sys.executable, "-m", "legion.cli", "prompt", "nope:Nothing"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "cannot import" in bad.stderr


def test_run_refuses_bad_input() -> None:
    with pytest.raises(legion.UsageError, match=r"not a legion\.Agent"):
        legion.run_sync(dict, "task")  # type: ignore[arg-type]
    with pytest.raises(legion.UsageError, match="non-empty string"):
        legion.run_sync(Scholar, "  ")
    with pytest.raises(legion.UsageError, match="did you mean 'max_retries'"):
        legion.run_sync(Scholar, "task", max_retrys=2)


async def test_real_model_requests_are_refused_in_the_suite() -> None:
    with pytest.raises(legion.UsageError, match="forbidden here"):
        await legion.run(Scholar, "task", model="openai/gpt-4o-mini", api_key="sk-not-real")
