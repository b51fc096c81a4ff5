"""The agent's step machine. No I/O: it is told what the model said and what
the code did, and answers with the next thing to do. The driver
(:mod:`legion._driver`) does the talking to the model and the sandbox.

One run::

    start()                     -> CallModel
    on_model_reply(text)        -> RunCode | Finish | CallModel (feedback) | Stop
    on_code_result(outcome)     -> CallModel | Finish | Stop

``max_iterations`` counts successful ``eval_and_continue`` steps: when that
many have run, the run stops. ``max_retries`` counts failures in a row (a
reply that is not a valid action, code that raised, an answer that does not
match the output schema); each is fed back to the model, and one more than
``max_retries`` stops the run. A success resets the count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal


@dataclass(frozen=True)
class ActionSpec:
    """One kind of action: what the prompt tells the model about it, and how a run treats it."""

    description: str
    """How the system prompt explains it to the model."""
    finishes: bool
    """It ends the run (with an answer, or none for ``done``)."""
    runs_code: bool
    """It carries ``code``, which runs in the sandbox."""


ACTIONS: Mapping[str, ActionSpec] = MappingProxyType(
    {
        "eval_and_continue": ActionSpec(
            "run `code` in the sandbox; you then see the value of its last expression, what it "
            "printed, or its error, and take another step",
            finishes=False,
            runs_code=True,
        ),
        "eval_and_complete": ActionSpec(
            "run `code`; the value of its last expression is your final answer",
            finishes=True,
            runs_code=True,
        ),
        "return": ActionSpec(
            "`result` is your final answer; no code runs", finishes=True, runs_code=False
        ),
        "done": ActionSpec(
            "finish without an answer (when the task needs none)", finishes=True, runs_code=False
        ),
    }
)
"""Every action, the one table the step machine, the prompt and the agent checks read."""
ALL_ACTIONS: tuple[str, ...] = tuple(ACTIONS)
_KEYS = {"action", "code", "result"}


class InvalidReply(ValueError):
    """The model's reply is not one valid action."""


class InvalidOutput(ValueError):
    """The final answer does not match the output schema."""


@dataclass(frozen=True)
class Action:
    kind: str
    """A key of :data:`ACTIONS`."""
    code: str = ""
    result: Any = None


@dataclass(frozen=True)
class CodeOutcome:
    """What one code step did, as the machine needs it."""

    ok: bool
    value: Any = None
    value_text: str = ""
    """How to show the value to the model (JSON, or a repr)."""
    has_value: bool = False
    stdout: str = ""
    stderr: str = ""
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    artifacts: tuple[str, ...] = ()
    """One line per figure or image the code showed: the model sees the
    line, never the bytes."""


@dataclass(frozen=True)
class CallModel:
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class RunCode:
    code: str
    complete: bool


@dataclass(frozen=True)
class Finish:
    output: Any


@dataclass(frozen=True)
class Stop:
    reason: Literal["max_iterations", "max_retries"]
    message: str


Step = CallModel | RunCode | Finish | Stop


def _json_candidates(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    found = []
    for i, ch in enumerate(text):
        if ch != "{":
            continue
        try:
            value, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def parse_action(text: str, allowed: Sequence[str] = ALL_ACTIONS) -> Action:
    """Find the one JSON action in ``text`` (code fences and prose around it
    are tolerated) and check its shape strictly."""
    candidates = [c for c in _json_candidates(text) if "action" in c]
    if not candidates:
        raise InvalidReply('no JSON object with an "action" key was found')
    obj = candidates[0]
    extra = sorted(set(obj) - _KEYS)
    if extra:
        raise InvalidReply(f"unexpected keys {extra}; an action has only action, code, result")
    kind = obj["action"]
    if kind not in ALL_ACTIONS:
        raise InvalidReply(f"unknown action {kind!r}; use one of {', '.join(allowed)}")
    if kind not in allowed:
        raise InvalidReply(f"action {kind!r} is not allowed here; use one of {', '.join(allowed)}")
    if ACTIONS[kind].runs_code:
        code = obj.get("code")
        if not isinstance(code, str) or not code.strip():
            raise InvalidReply(f'{kind} needs "code": a non-empty string of Python')
        return Action(kind, code=code)
    if kind == "return":
        if "result" not in obj:
            raise InvalidReply('return needs "result": your final answer')
        return Action("return", result=obj["result"])
    return Action("done")


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"\n[... {len(text) - limit} characters truncated ...]\n"
    head = max(0, limit - len(marker))
    return text[: head * 2 // 3] + marker + text[len(text) - head // 3 :] if head else marker


@dataclass
class StepMachine:
    system_prompt: str
    task: str
    max_iterations: int
    max_retries: int
    max_message_length: int
    allowed_actions: Sequence[str] = ALL_ACTIONS
    validate_output: Callable[[Any], Any] = lambda value: value
    """Returns the checked (possibly converted) answer, or raises InvalidOutput."""
    history: Sequence[Mapping[str, str]] = ()
    """Earlier turns of a long-lived agent's conversation, system prompt
    first; empty for a single run. The task is added to them as a new turn."""
    messages: list[dict[str, str]] = field(default_factory=list)
    iterations: int = 0
    failures_in_a_row: int = 0
    _pending: Action | None = None

    def start(self) -> CallModel:
        earlier = [dict(m) for m in self.history] or [
            {"role": "system", "content": self.system_prompt}
        ]
        self.messages = [
            *earlier,
            {"role": "user", "content": truncate(self.task, self.max_message_length)},
        ]
        return self._call()

    def _call(self) -> CallModel:
        return CallModel(tuple(dict(m) for m in self.messages))

    def _say(self, content: str) -> None:
        self.messages.append(
            {"role": "user", "content": truncate(content, self.max_message_length)}
        )

    def on_model_reply(self, text: str) -> Step:
        self.messages.append(
            {"role": "assistant", "content": truncate(text, self.max_message_length)}
        )
        try:
            action = parse_action(text, self.allowed_actions)
        except InvalidReply as exc:
            allowed = ", ".join(self.allowed_actions)
            return self._failure(
                f"Your reply was not a valid action: {exc}.\nReply with exactly one JSON object "
                f'like {{"action": "eval_and_continue", "code": "..."}} (actions: '
                f"{allowed}), and nothing else."
            )
        if action.kind == "return":
            return self._complete(action.result)
        if action.kind == "done":
            return Finish(None)
        self._pending = action
        return RunCode(action.code, complete=ACTIONS[action.kind].finishes)

    def on_code_result(self, outcome: CodeOutcome) -> Step:
        action, self._pending = self._pending, None
        if action is None:
            raise RuntimeError("on_code_result without a pending RunCode")
        if not outcome.ok:
            return self._failure(self._describe_error(outcome))
        if ACTIONS[action.kind].finishes:
            if not outcome.has_value:
                return self._failure(
                    "eval_and_complete returns the value of your code's last expression, and "
                    "your code did not end with an expression. End it with the answer, e.g. "
                    "`result` on the last line." + self._describe_output(outcome)
                )
            return self._complete(outcome.value)
        self.iterations += 1
        self.failures_in_a_row = 0
        if self.iterations >= self.max_iterations:
            return Stop(
                "max_iterations",
                f"the agent took {self.iterations} steps "
                f"(max_iterations={self.max_iterations}) without giving an answer",
            )
        self._say("Your code ran." + self._describe_value(outcome) + self._describe_output(outcome))
        return self._call()

    def _complete(self, value: Any) -> Step:
        try:
            output = self.validate_output(value)
        except InvalidOutput as exc:
            return self._failure(
                f"Your answer does not match the required output schema: {exc}\n"
                "Give the answer again in the required shape."
            )
        return Finish(output)

    def _failure(self, feedback: str) -> Step:
        self.failures_in_a_row += 1
        if self.failures_in_a_row > self.max_retries:
            return Stop(
                "max_retries",
                f"{self.failures_in_a_row} failed steps in a row "
                f"(max_retries={self.max_retries}); the last: {feedback.splitlines()[0]}",
            )
        self._say(feedback)
        return self._call()

    @staticmethod
    def _describe_value(outcome: CodeOutcome) -> str:
        return f"\nValue of the last expression:\n{outcome.value_text}" if outcome.has_value else ""

    @staticmethod
    def _describe_output(outcome: CodeOutcome) -> str:
        parts = []
        if outcome.stdout:
            parts.append(f"\nstdout:\n{outcome.stdout}")
        if outcome.stderr:
            parts.append(f"\nstderr:\n{outcome.stderr}")
        if outcome.artifacts:
            shown = "\n".join(outcome.artifacts)
            parts.append(f"\nShown to the user (you get this description, not the image):\n{shown}")
        return "".join(parts)

    def _describe_error(self, outcome: CodeOutcome) -> str:
        detail = outcome.traceback.strip() or f"{outcome.error_type}: {outcome.error_message}"
        if outcome.error_type == "TimeoutError":
            detail = f"{outcome.error_type}: {outcome.error_message}"
        return (
            f"Your code raised an error:\n{detail}"
            + self._describe_output(outcome)
            + "\nFix the code and try again."
        )
