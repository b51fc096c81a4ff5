"""The agent driver: one run, from the task to its answer.

:class:`RunDriver` feeds the step machine (:mod:`legion._loop`) with the
model's replies and the sandbox's results; :func:`legion.run`, long-lived
agents' turns (:mod:`legion.live`) and sub-agents all run through it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic

from . import human, telemetry
from ._budget import Budget, Exceeded
from ._ctx import bound
from ._log import get_logger
from ._loop import CallModel, CodeOutcome, Finish, RunCode, Step, StepMachine, Stop
from ._results import RunResult, Usage
from ._run_files import InputFiles, check_input, collect_output, describe_input, put_input
from .config import BUDGET_KEYS, AgentConfig, resolve_agent_config
from .errors import (
    MaxIterationsReached,
    MaxRetriesReached,
    RunError,
    SandboxCrashed,
    UsageLimitExceeded,
)
from .models import LiteLLMModel, Model, model_override
from .prompt import build_system_prompt
from .sandbox import ExecResult, Sandbox, SandboxRuntime, environment
from .sandbox.backend import Package
from .sandbox.tools import ToolDef

if TYPE_CHECKING:
    from .agent import AgentDefinition

__all__ = [
    "RunDriver",
    "budget_of",
    "current_budget",
    "current_runtime",
    "image_packages",
    "new_sandbox",
    "prepare",
]

log = get_logger("legion.run")
T = TypeVar("T")

current_runtime: ContextVar[SandboxRuntime | None] = ContextVar(
    "legion_current_runtime", default=None
)
"""The runtime of the run this code is part of: sub-agents share its pool."""

current_budget: ContextVar[Budget | None] = ContextVar("legion_current_budget", default=None)
"""The budget that work started here is charged to: the run's own inside a
run (so a sub-agent's budget sits under its caller's), a principal's around
a run that ``legion serve`` starts, a conversation's around its turns."""


def budget_of(config: AgentConfig, *, scope: str, parent: Budget | None = None) -> Budget:
    """A budget with ``config``'s limits (max_tokens...), under ``parent``."""
    return Budget({k: getattr(config, k) for k in BUDGET_KEYS}, scope=scope, parent=parent)


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
        artifacts=_artifact_lines(result),
    )


def _artifact_lines(result: ExecResult) -> tuple[str, ...]:
    lines = [artifact.summary() for artifact in result.artifacts]
    if result.artifacts_dropped:
        lines.append(
            f"[{result.artifacts_dropped} more figure(s) or image(s) not kept: over the "
            "bound per step; show fewer, or save them under out/]"
        )
    return tuple(lines)


def _crash_outcome(exc: SandboxCrashed) -> CodeOutcome:
    return CodeOutcome(
        ok=False,
        stdout=exc.stdout,
        stderr=exc.stderr,
        error_type=type(exc).__name__,
        error_message=str(exc),
    )


def prepare(
    definition: AgentDefinition, model: Model | str | None, overrides: dict[str, Any]
) -> tuple[AgentConfig, Model]:
    """The agent's resolved config, and the model to ask."""
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
    return config, llm


class RunDriver:
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
        files: InputFiles | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.definition = definition
        self.files = check_input(files)
        self.config = config
        self.task = task
        self.llm = llm
        self.vault = vault
        self.runtime = runtime
        self.run_id = uuid.uuid4().hex
        self.budget = budget or budget_of(
            config, scope=f"run of {definition.name}", parent=current_budget.get()
        )
        """What the run charges: its config's limits, under its caller's budget
        (or, for a conversation's turn, a budget under the conversation's)."""
        self._cost_warned = False
        self.sandbox: Sandbox | None = None
        self._borrow = borrow
        """Where a long-lived agent's sandbox comes from: the run uses it and
        leaves it open. None: the run starts its own and closes it."""
        self.machine = StepMachine(
            system_prompt=build_system_prompt(
                definition, config, packages=image_packages(config, runtime)
            ),
            task=task + describe_input(self.files),
            max_iterations=config.max_iterations,
            max_retries=config.max_retries,
            max_message_length=config.max_message_length,
            allowed_actions=definition.action_types,
            validate_output=definition.validate_output,
            history=history,
        )

    @property
    def usage(self) -> Usage:
        """What this run spent itself (its sub-agents count on their own)."""
        return self.budget.own

    async def drive(self) -> RunResult:
        name = self.definition.name
        with (
            bound(current_runtime, self.runtime),
            bound(current_budget, self.budget),
            bound(human.asking_agent, name),
            telemetry.span(telemetry.RUN, agent=name, task=self.task) as run_stop,
        ):
            try:
                if self.files:  # there before the model's first step
                    await put_input(await self._sandbox_now(), self.files)
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
                files: dict[str, bytes] = {}
                note = ""
                if self.sandbox is not None:
                    files, note = await collect_output(self.sandbox)
                return RunResult(
                    step.output,
                    self.machine.iterations,
                    self.usage,
                    self.run_id,
                    self.machine.messages,
                    files=files,
                    files_note=note,
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
        self._check(self.budget.before_request())
        traced = telemetry.active()
        extra = {"prompt": _last_user_excerpt(step.messages)} if traced else {}
        with telemetry.span(
            telemetry.LLM_REQUEST, model=self.llm.name, messages=len(step.messages), **extra
        ) as stop:
            reply = await self._guarded(self.llm.complete(step.messages), code=False)
            stop["usage"] = reply.usage
            if traced:
                stop["reply"] = telemetry.excerpt(reply.content)
        if (
            reply.usage.cost_usd is None
            and not self._cost_warned
            and any("max_cost_usd" in b.limits for b in self.budget.chain())
        ):
            self._cost_warned = True
            log.warning(
                "budget_cost_unknown",
                model=self.llm.name,
                why="no price is known for this model: max_cost_usd counts nothing for it",
            )
        self._check(self.budget.charge(reply.usage))
        return self.machine.on_model_reply(reply.content)

    def _check(self, exceeded: Exceeded | None) -> None:
        if exceeded is not None:
            raise self._over_budget(exceeded)

    def _over_budget(self, exceeded: Exceeded) -> UsageLimitExceeded:
        node = next((b for b in self.budget.chain() if b.scope == exceeded.scope), self.budget)
        return UsageLimitExceeded(
            f"{self.definition.name}: {exceeded.describe()}",
            run_id=self.run_id,
            messages=self.machine.messages,
            usage=self.usage,
            iterations=self.machine.iterations,
            limit=exceeded.limit,
            allowed=exceeded.allowed,
            used=exceeded.used,
            scope=exceeded.scope,
            counted=node.counted,
        )

    async def _guarded(self, work: Awaitable[T], *, code: bool) -> T:
        """Await ``work`` (a model request, or a code step whose wall time is
        charged as sandbox seconds) unless a budget here or above trips or
        runs out meanwhile: then cancel it and raise UsageLimitExceeded."""
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(work)
        tripped: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not tripped.done():
                tripped.set_result(None)

        def on_trip() -> None:  # from any thread
            loop.call_soon_threadsafe(wake)

        stop_listening = self.budget.listen(on_trip)
        step = self.budget.step_started() if code else None
        exceeded: Exceeded | None = None
        try:
            while True:
                left = self.budget.seconds_left() if code else None
                waits: set[asyncio.Future[Any]] = {task, tripped}
                await asyncio.wait(
                    waits,
                    timeout=None if left is None else max(left, 0.005),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if task.done():
                    break
                exceeded = self.budget.exceeded_now()
                if exceeded is not None:
                    break
                if tripped.done():
                    tripped = loop.create_future()
        finally:
            stop_listening()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            if step is not None:
                self.budget.step_ended(step)
        if exceeded is not None:
            raise self._over_budget(exceeded)
        return task.result()

    async def _sandbox_now(self) -> Sandbox:
        if self.sandbox is None:
            self.sandbox = (
                await self._borrow()
                if self._borrow is not None
                else await new_sandbox(self.definition, self.config, self.vault, self.runtime)
            )
        return self.sandbox

    async def _run_code(self, step: RunCode) -> Step:
        self._check(self.budget.exceeded_now())
        sandbox = await self._sandbox_now()
        with telemetry.span(
            telemetry.ITERATION, index=self.machine.iterations + 1, complete=step.complete
        ):
            try:
                run = sandbox.run(
                    step.code,
                    timeout=self.config.sandbox_timeout,
                    reset=self.config.binding_scope == "iteration",
                )
                result = await self._guarded(run, code=True)
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


class _Allotted(Sandbox):
    """A sandbox that holds room in a budget's sandbox allowance (a
    principal's ``max_sandboxes`` and ``max_sandbox_memory_mb``) until closed."""

    def __init__(self, *, budget: Budget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._budget: Budget | None = budget
        self._memory_mb = self.limits.memory_mb

    async def close(self) -> None:
        budget, self._budget = self._budget, None
        try:
            await super().close()
        finally:
            if budget is not None:
                budget.release_sandbox(self._memory_mb)


async def new_sandbox(
    definition: AgentDefinition,
    config: AgentConfig,
    vault: Mapping[str, Any] | None,
    runtime: SandboxRuntime | None,
) -> Sandbox:
    """A started sandbox holding ``definition``'s tools, each of whose calls
    counts against the budget of the run making it. Raises
    UsageLimitExceeded when the budget above allows no more sandboxes."""
    options: dict[str, Any] = {
        "tools": [_counted(t.definition) for t in definition.tools],
        "limits": config.sandbox_limits,
        "vault": vault,
        "runtime": runtime,
        "agent": definition.name,
        "image": config.image,
    }
    budget = current_budget.get()
    if budget is None:
        return await Sandbox(**options).start()
    sandbox = _Allotted(budget=budget, **options)
    refused = budget.acquire_sandbox(sandbox.limits.memory_mb)
    if refused is not None:
        raise UsageLimitExceeded(
            f"{definition.name}: cannot start a sandbox: {refused.describe()}",
            limit=refused.limit,
            allowed=refused.allowed,
            used=refused.used,
            scope=refused.scope,
        )
    try:
        return await sandbox.start()
    except BaseException:
        await sandbox.close()
        raise


def _counted(definition: ToolDef) -> ToolDef:
    """``definition`` with each call counted against the calling run's budget
    (the one in the call's context) before it runs; a call over
    ``max_tool_calls`` raises UsageLimitExceeded in the sandbox code instead."""
    functions = {
        name: dataclasses.replace(
            fn, call=_count_calls(fn.call, fn.is_async, f"{definition.name}.{name}")
        )
        for name, fn in definition.functions.items()
    }
    return dataclasses.replace(definition, functions=functions)


def _take_call(label: str) -> None:
    budget = current_budget.get()
    refused = budget.take_tool_call() if budget is not None else None
    if refused is not None:
        raise UsageLimitExceeded(f"{label} was not called: {refused.describe()}")


def _count_calls(call: Callable[..., Any], is_async: bool, label: str) -> Callable[..., Any]:
    if is_async:

        @functools.wraps(call)
        async def counted_async(*args: Any, **kwargs: Any) -> Any:
            _take_call(label)
            return await call(*args, **kwargs)

        return counted_async

    @functools.wraps(call)
    def counted(*args: Any, **kwargs: Any) -> Any:
        _take_call(label)
        return call(*args, **kwargs)

    return counted


def image_packages(config: AgentConfig, runtime: SandboxRuntime | None) -> tuple[Package, ...]:
    """What the agent's code can import beyond the standard library: the
    packages of its image (``config.image``, else the runtime's). Asks the
    engine once per image and half a minute; the runner's own image answers
    none without asking. Raises ImageNotFound (with the build command) when
    the image is not built."""
    image = config.image or (runtime.image if runtime is not None else None)
    return environment.describe(image).packages
