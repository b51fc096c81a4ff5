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
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jsonschema
import pydantic

from . import human, telemetry
from ._ctx import bound
from ._log import get_logger
from ._loop import (
    ACTIONS,
    ALL_ACTIONS,
    CallModel,
    CodeOutcome,
    Finish,
    InvalidOutput,
    RunCode,
    Step,
    StepMachine,
    Stop,
)
from .config import AgentConfig, check_config_keys, resolve_agent_config
from .errors import MaxIterationsReached, MaxRetriesReached, RunError, SandboxCrashed, UsageError
from .models import LiteLLMModel, Model, Usage, model_override
from .prompt import build_system_prompt
from .sandbox import ExecResult, Sandbox, SandboxRuntime
from .sandbox.tools import ToolDef
from .tool import describe, to_tool_def, tool_name

__all__ = ["Agent", "RunResult", "prompt_for", "run", "run_sync"]

log = get_logger("legion.agent")

current_runtime: ContextVar[SandboxRuntime | None] = ContextVar(
    "legion_current_runtime", default=None
)
"""The runtime of the run this code is part of: sub-agents share its pool."""

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
    name: str
    tool: Any
    definition: ToolDef
    source: str


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


def definition_of(agent: type[Agent]) -> AgentDefinition:
    if not (isinstance(agent, type) and issubclass(agent, Agent)):
        raise UsageError(f"{agent!r} is not a legion.Agent subclass")
    definition: AgentDefinition | None = agent.__dict__.get("__legion_definition__")
    if definition is None:
        raise UsageError(
            f"{agent.__name__} is abstract (defined with abstract=True); run a concrete subclass"
        )
    return definition


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    output: Any
    """The answer: a string, JSON data matching ``output_schema``, a pydantic
    model instance, or None for ``done``."""
    iterations: int
    """Successful ``eval_and_continue`` steps taken."""
    usage: Usage
    run_id: str
    messages: list[dict[str, str]] = field(repr=False)
    """The whole conversation with the model, system prompt first."""


def prompt_for(agent: type[Agent], **overrides: Any) -> str:
    """The system prompt a run of ``agent`` would use."""
    definition = definition_of(agent)
    config = resolve_agent_config(definition.config, overrides, where=f"{definition.name}.config")
    return build_system_prompt(definition, config)


def _output_excerpt(output: Any) -> str:
    """A run's answer as a trace shows it: text, or JSON, cut."""
    if isinstance(output, str):
        return telemetry.excerpt(output)
    if isinstance(output, pydantic.BaseModel):
        return telemetry.excerpt(output.model_dump_json())
    return telemetry.excerpt(json.dumps(output, ensure_ascii=False, default=repr))


def _last_user_excerpt(messages: Sequence[Mapping[str, str]]) -> str:
    """What the model is asked now (the task, or the last code result), for traces."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return telemetry.excerpt(str(message.get("content", "")))
    return ""


def _outcome(result: ExecResult) -> CodeOutcome:
    if result.has_value:
        text = (
            result.value_repr
            if result.value_repr is not None
            else json.dumps(result.value, ensure_ascii=False, default=repr)
        )
    else:
        text = ""
    value = result.value if result.value_repr is None else result.value_repr
    error = result.error
    return CodeOutcome(
        ok=error is None,
        value=value,
        value_text=text,
        has_value=result.has_value,
        stdout=result.stdout,
        stderr=result.stderr,
        error_type=error.type if error else "",
        error_message=error.message if error else "",
        traceback=error.traceback if error else "",
    )


def _crash_outcome(exc: SandboxCrashed) -> CodeOutcome:
    return CodeOutcome(
        ok=False,
        stdout=exc.stdout,
        stderr=exc.stderr,
        error_type=type(exc).__name__,
        error_message=str(exc),
    )


async def run(
    agent: type[Agent],
    task: str,
    *,
    vault: Mapping[str, Any] | None = None,
    model: Model | str | None = None,
    runtime: SandboxRuntime | None = None,
    parent_run_id: str | None = None,
    **overrides: Any,
) -> RunResult:
    """Run ``agent`` on ``task`` until it answers.

    ``overrides`` are :class:`legion.AgentConfig` keys for this call only.
    ``model`` is a litellm model string (the ``model`` config key), or a model
    object that replaces litellm (e.g. :class:`legion.testing.ScriptedModel`).
    Raises :class:`legion.MaxIterationsReached`, :class:`legion.MaxRetriesReached`
    or :class:`legion.ModelError` (each carrying the history) when it stops
    without an answer.
    """
    definition, config, llm = _prepare(agent, model, overrides)
    if not isinstance(task, str) or not task.strip():
        raise UsageError("task must be a non-empty string")
    if config.binding_scope == "conversation":
        raise UsageError(
            "binding_scope='conversation' keeps variables across the calls of a "
            "long-lived agent (legion.start); a single run uses 'turn' (default) or 'iteration'"
        )
    driver = _Run(definition, config, task, llm=llm, vault=vault, runtime=runtime)
    with telemetry.run_context(driver.run_id, parent_run_id):
        return await driver.drive()


def _prepare(
    agent: type[Agent], model: Model | str | None, overrides: dict[str, Any]
) -> tuple[AgentDefinition, AgentConfig, Model]:
    """The agent's definition, its resolved config, and the model to ask."""
    definition = definition_of(agent)
    if isinstance(model, str):
        overrides["model"], model = model, None
    config = resolve_agent_config(definition.config, overrides, where=f"{definition.name}.config")
    llm: Model = (
        model
        or model_override(definition.name)
        or LiteLLMModel(
            config.model,
            api_base=config.api_base,
            api_key=config.api_key,
            temperature=config.temperature,
            timeout=config.model_timeout,
            retries=config.model_retries,
            backoff=config.model_retry_backoff,
        )
    )
    return definition, config, llm


class _Run:
    """Drives one run: feeds the step machine with the model's replies and
    the sandbox's results until it finishes or stops."""

    def __init__(
        self,
        definition: AgentDefinition,
        config: AgentConfig,
        task: str,
        *,
        llm: Model,
        vault: Mapping[str, Any] | None,
        runtime: SandboxRuntime | None,
        history: Sequence[Mapping[str, str]] = (),
        borrow: Callable[[], Awaitable[Sandbox]] | None = None,
    ) -> None:
        self.definition = definition
        self.config = config
        self.task = task
        self.llm = llm
        self.vault = vault
        self.runtime = runtime
        self.run_id = uuid.uuid4().hex
        self.usage = Usage()
        self.sandbox: Sandbox | None = None
        self._borrow = borrow
        """Where a long-lived agent's sandbox comes from: the run uses it and
        leaves it open. None: the run starts its own and closes it."""
        self.machine = StepMachine(
            system_prompt=build_system_prompt(definition, config),
            task=task,
            max_iterations=config.max_iterations,
            max_retries=config.max_retries,
            max_message_length=config.max_message_length,
            allowed_actions=definition.action_types,
            validate_output=definition.validate_output,
            history=history,
        )

    async def drive(self) -> RunResult:
        name = self.definition.name
        with (
            bound(current_runtime, self.runtime),
            bound(human.asking_agent, name),
            telemetry.span(telemetry.RUN, agent=name, task=self.task) as run_stop,
        ):
            try:
                step: Step = self.machine.start()
                while not isinstance(step, (Finish, Stop)):
                    if isinstance(step, CallModel):
                        step = await self._ask_model(step)
                    else:
                        step = await self._run_code(step)
                if isinstance(step, Stop):
                    raise self._stopped(step)
                run_stop.update(iterations=self.machine.iterations, usage=self.usage)
                if telemetry.active():
                    run_stop["output"] = _output_excerpt(step.output)
                return RunResult(
                    step.output,
                    self.machine.iterations,
                    self.usage,
                    self.run_id,
                    self.machine.messages,
                )
            except RunError as exc:
                if not exc.run_id:  # a ModelError from the model layer: attach the history
                    exc.run_id, exc.messages = self.run_id, self.machine.messages
                    exc.usage, exc.iterations = self.usage, self.machine.iterations
                raise
            finally:
                if self.sandbox is not None and self._borrow is None:
                    await self.sandbox.close()

    async def _ask_model(self, step: CallModel) -> Step:
        traced = telemetry.active()
        extra = {"prompt": _last_user_excerpt(step.messages)} if traced else {}
        with telemetry.span(
            telemetry.LLM_REQUEST, model=self.llm.name, messages=len(step.messages), **extra
        ) as stop:
            reply = await self.llm.complete(step.messages)
            stop["usage"] = reply.usage
            if traced:
                stop["reply"] = telemetry.excerpt(reply.content)
        self.usage += reply.usage
        return self.machine.on_model_reply(reply.content)

    async def _run_code(self, step: RunCode) -> Step:
        if self.sandbox is None:
            self.sandbox = (
                await self._borrow()
                if self._borrow is not None
                else await new_sandbox(self.definition, self.config, self.vault, self.runtime)
            )
        with telemetry.span(
            telemetry.ITERATION, index=self.machine.iterations + 1, complete=step.complete
        ):
            try:
                result = await self.sandbox.run(
                    step.code,
                    timeout=self.config.sandbox_timeout,
                    reset=self.config.binding_scope == "iteration",
                )
                outcome = _outcome(result)
            except SandboxCrashed as exc:
                outcome = _crash_outcome(exc)
        return self.machine.on_code_result(outcome)

    def _stopped(self, step: Stop) -> RunError:
        error = MaxIterationsReached if step.reason == "max_iterations" else MaxRetriesReached
        return error(
            f"{self.definition.name}: {step.message}",
            run_id=self.run_id,
            messages=self.machine.messages,
            usage=self.usage,
            iterations=self.machine.iterations,
        )


async def new_sandbox(
    definition: AgentDefinition,
    config: AgentConfig,
    vault: Mapping[str, Any] | None,
    runtime: SandboxRuntime | None,
) -> Sandbox:
    """A started sandbox holding ``definition``'s tools."""
    return await Sandbox(
        tools=[t.definition for t in definition.tools],
        limits=config.sandbox_limits,
        vault=vault,
        runtime=runtime,
        agent=definition.name,
    ).start()


def run_sync(agent: type[Agent], task: str, **kwargs: Any) -> RunResult:
    """:func:`run` for code without an event loop."""
    return asyncio.run(run(agent, task, **kwargs))
