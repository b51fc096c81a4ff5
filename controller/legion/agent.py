"""Agents: a class whose docstring says who it is, and what it may use.

    class Librarian(legion.Agent):
        \"\"\"Finds books in the catalogue and answers questions about them.\"\"\"

        tools = [Catalogue]
        output_schema = {"type": "array", "items": {"type": "string"}}
        config = {"max_iterations": 5}

    result = await legion.run(Librarian, "Which books by Le Guin do we have?")
    result.output       # ["The Dispossessed", ...]

Mistakes in the definition (no docstring, an unknown config key, a tool with
nothing to call, an invalid schema) raise :class:`legion.UsageError` when the
class is created, saying how to fix them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import jsonschema
import pydantic

from . import telemetry
from . import vault as _vault
from ._blocking import run_blocking
from ._driver import RunDriver, image_packages, prepare
from ._log import get_logger
from ._loop import ACTIONS, ALL_ACTIONS, InvalidOutput
from ._mcp_client import MCP
from ._results import RunResult
from .config import AgentConfig, check_config_keys, resolve_agent_config
from .errors import UsageError
from .models import Model
from .prompt import build_system_prompt
from .sandbox import SandboxRuntime
from .sandbox.tools import ToolDef
from .tool import describe, to_tool_def, tool_name

__all__ = ["Agent", "RunResult", "prompt_for", "run", "run_sync"]

log = get_logger("legion.agent")

_ATTRIBUTES = (
    "tools",
    "output_schema",
    "config",
    "tool_config",
    "system_prompt",
    "extra_instructions",
    "action_types",
)


@dataclass(frozen=True)
class AgentTool:
    """One of an agent's tools: what sandbox code calls, and what the model reads.

    An MCP server's are learnt from the server, when it is first connected
    (:func:`resolve_tools`, before a run); until then reading them connects.
    """

    name: str
    tool: Any
    resolved_definition: ToolDef | None
    resolved_source: str | None

    @property
    def definition(self) -> ToolDef:
        if self.resolved_definition is not None:
            return self.resolved_definition
        definition: ToolDef = self.tool.tool_def()
        return definition

    @property
    def source(self) -> str:
        if self.resolved_source is not None:
            return self.resolved_source
        source: str = self.tool.source()
        return source


@dataclass(frozen=True)
class AgentDefinition:
    """An agent class, checked and resolved once, when it is created."""

    name: str
    doc: str
    tools: tuple[AgentTool, ...]
    tool_config: Mapping[str, Mapping[str, Any]]
    output_schema: Any
    output_json_schema: dict[str, Any] | None
    config: Mapping[str, Any]
    system_prompt: str | None
    extra_instructions: str | None
    action_types: tuple[str, ...]

    def validate_output(self, value: Any) -> Any:
        schema = self.output_schema
        if schema is None:  # plain text is asked for; any JSON answer is accepted as is
            return value
        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            try:
                return schema.model_validate(value)
            except pydantic.ValidationError as exc:
                raise InvalidOutput(str(exc)) from None
        errors = sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path)
        )
        if errors:
            raise InvalidOutput(
                "; ".join(
                    f"at {'/'.join(map(str, e.path)) or 'the top'}: {e.message}" for e in errors[:5]
                )
            )
        return value


def _attribute(cls: type, name: str) -> Any:
    value = getattr(cls, name)
    if inspect.ismethod(value):  # a classmethod computing it
        value = value()
    return value


def _tools_of(cls: type, tool_config: dict[str, dict[str, Any]]) -> tuple[AgentTool, ...]:
    name = cls.__name__
    tools = []
    for tool in _attribute(cls, "tools") or ():
        if isinstance(tool, MCP):  # its tools are learnt from the server, before a run
            if tool_config.get(tool.name):
                raise UsageError(f"{name}.tool_config: MCP server {tool.name} takes no options")
            tools.append(AgentTool(tool.name, tool, None, None))
            continue
        try:
            definition = to_tool_def(tool, tool_config.get(tool_name(tool)))
        except UsageError as exc:
            raise UsageError(f"{name}.tools: {exc}") from None
        tools.append(AgentTool(definition.name, tool, definition, describe(tool, definition)))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise UsageError(f"{name}.tools: tool names must be unique, got {names}")
    unknown = sorted(set(tool_config) - set(names))
    if unknown:
        raise UsageError(
            f"{name}.tool_config names {unknown}, which are not among its tools {names}"
        )
    return tuple(tools)


def _json_schema_of(name: str, schema: Any) -> dict[str, Any] | None:
    if schema is None:
        return None
    if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, Mapping):
        try:
            jsonschema.Draft202012Validator.check_schema(dict(schema))
        except jsonschema.SchemaError as exc:
            raise UsageError(
                f"{name}.output_schema is not a valid JSON Schema: {exc.message}"
            ) from None
        return dict(schema)
    raise UsageError(
        f"{name}.output_schema must be a JSON Schema dict or a pydantic model "
        f"class, not {type(schema).__name__}"
    )


def _define(cls: type[Agent]) -> AgentDefinition:
    name = cls.__name__
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    if not doc:
        raise UsageError(
            f"agent {name} has no docstring. The docstring tells the model who the agent is "
            f"and what it is for: add one, e.g.\n    class {name}(legion.Agent):\n"
            f'        """Answers questions about our product catalogue."""'
        )
    config = dict(_attribute(cls, "config") or {})
    check_config_keys(config, f"{name}.config")
    try:
        AgentConfig(**config)
    except TypeError as exc:
        raise UsageError(f"{name}.config: {exc}") from None
    tool_config = {k: dict(v) for k, v in dict(_attribute(cls, "tool_config") or {}).items()}
    tools = _tools_of(cls, tool_config)
    schema = _attribute(cls, "output_schema")
    actions = tuple(_attribute(cls, "action_types") or ())
    bad = [a for a in actions if a not in ALL_ACTIONS]
    if bad or not actions:
        raise UsageError(
            f"{name}.action_types must be a non-empty selection of "
            f"{list(ALL_ACTIONS)}; got {list(actions)}"
        )
    if not any(ACTIONS[a].finishes for a in actions):
        finishing = [a for a, action in ACTIONS.items() if action.finishes]
        raise UsageError(
            f"{name}.action_types allows no way to finish: include "
            f"{', '.join(finishing[:-1])} or {finishing[-1]}"
        )
    return AgentDefinition(
        name=name,
        doc=doc,
        tools=tools,
        tool_config=tool_config,
        output_schema=schema,
        output_json_schema=_json_schema_of(name, schema),
        config=config,
        system_prompt=_attribute(cls, "system_prompt"),
        extra_instructions=_attribute(cls, "extra_instructions"),
        action_types=actions,
    )


class Agent:
    """Base class of agents. The subclass's docstring says who the agent is.

    Class attributes (or classmethods returning them), all optional:

    - ``tools``: what sandbox code may call (functions, classes, instances,
      modules, :class:`legion.Tool` subclasses, :func:`legion.expose`).
    - ``output_schema``: a JSON Schema dict or a pydantic model class; the final
      answer is validated against it (a model class comes back as an instance).
      Default: a string.
    - ``config``: :class:`legion.AgentConfig` keys (model, max_iterations...).
    - ``tool_config``: options per tool name, handed to ``legion.Tool`` subclasses.
    - ``system_prompt``: replaces the generated prompt entirely;
      ``extra_instructions``: appended to it.
    - ``action_types``: the actions the model may use (default: all four).

    Pass ``abstract=True`` to define a base class for other agents.
    """

    tools: ClassVar[Sequence[Any]] = ()
    output_schema: ClassVar[Mapping[str, Any] | type[pydantic.BaseModel] | None] = None
    config: ClassVar[Mapping[str, Any]] = {}
    tool_config: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    system_prompt: ClassVar[str | None] = None
    extra_instructions: ClassVar[str | None] = None
    action_types: ClassVar[Sequence[str]] = ALL_ACTIONS

    __legion_definition__: ClassVar[AgentDefinition]

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not abstract:
            cls.__legion_definition__ = _define(cls)

    def __init__(self) -> None:
        raise UsageError(
            f"agents are not instantiated: run one with "
            f"`await legion.run({type(self).__name__}, task)`"
        )


async def resolve_tools(
    definition: AgentDefinition, vault: Mapping[str, Any] | None = None
) -> None:
    """Connect the agent's MCP servers (with ``vault``'s credentials) and learn
    their tools, so that the prompt and the sandbox need not wait for them."""
    pending = [t.tool for t in definition.tools if isinstance(t.tool, MCP) and not t.tool.resolved]
    if pending:
        with _vault.bind(vault or {}):
            await asyncio.gather(*(server.resolve() for server in pending))


def definition_of(agent: type[Agent]) -> AgentDefinition:
    if not (isinstance(agent, type) and issubclass(agent, Agent)):
        raise UsageError(f"{agent!r} is not a legion.Agent subclass")
    definition: AgentDefinition | None = agent.__dict__.get("__legion_definition__")
    if definition is None:
        raise UsageError(
            f"{agent.__name__} is abstract (defined with abstract=True); run a concrete subclass"
        )
    return definition


def prompt_for(agent: type[Agent], **overrides: Any) -> str:
    """The system prompt a run of ``agent`` would use."""
    definition = definition_of(agent)
    config = resolve_agent_config(definition.config, overrides, where=f"{definition.name}.config")
    return build_system_prompt(definition, config, packages=image_packages(config, None))


async def run(
    agent: type[Agent],
    task: str,
    *,
    vault: Mapping[str, Any] | None = None,
    model: Model | str | None = None,
    runtime: SandboxRuntime | None = None,
    parent_run_id: str | None = None,
    files: Mapping[str, bytes | str] | None = None,
    **overrides: Any,
) -> RunResult:
    """Run ``agent`` on ``task`` until it answers.

    ``files`` (name -> bytes, or str as UTF-8) are put in the sandbox's work
    directory ``/data`` before the first step, and the model is told their
    names and sizes. What the code leaves in ``/data/out`` comes back as
    :attr:`RunResult.files`.

    ``overrides`` are :class:`legion.AgentConfig` keys for this call only.
    ``model`` is a litellm model string (the ``model`` config key), or a model
    object that replaces litellm (e.g. :class:`legion.testing.ScriptedModel`).
    Raises :class:`legion.MaxIterationsReached`, :class:`legion.MaxRetriesReached`
    or :class:`legion.ModelError` (each carrying the history) when it stops
    without an answer.
    """
    definition = definition_of(agent)
    config, llm = prepare(definition, model, overrides)
    if not isinstance(task, str) or not task.strip():
        raise UsageError("task must be a non-empty string")
    if config.binding_scope == "conversation":
        raise UsageError(
            "binding_scope='conversation' keeps variables across the calls of a "
            "long-lived agent (legion.start); a single run uses 'turn' (default) or 'iteration'"
        )
    await resolve_tools(definition, vault)
    driver = RunDriver(definition, config, task, llm=llm, vault=vault, runtime=runtime, files=files)
    with telemetry.run_context(driver.run_id, parent_run_id):
        return await driver.drive()


def run_sync(agent: type[Agent], task: str, **kwargs: Any) -> RunResult:
    """:func:`run`, blocking until the answer; it works where an event loop is
    already running too (Jupyter, a web handler): there the run goes to a loop
    of its own on a worker thread, and the calling thread (with its loop)
    waits for it. In async code, ``await legion.run(...)`` instead."""
    return run_blocking(run(agent, task, **kwargs))
