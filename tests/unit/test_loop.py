"""The step machine alone: no model, no sandbox, exact counts."""

from __future__ import annotations

import json

import pytest

from legion._loop import (
    CallModel,
    CodeOutcome,
    Finish,
    InvalidOutput,
    InvalidReply,
    RunCode,
    StepMachine,
    Stop,
    parse_action,
    truncate,
)


def machine(**options: object) -> StepMachine:
    settings: dict[str, object] = {
        "system_prompt": "sys",
        "task": "do it",
        "max_iterations": 3,
        "max_retries": 2,
        "max_message_length": 1000,
    }
    settings.update(options)
    return StepMachine(**settings)  # type: ignore[arg-type]


def reply(kind: str, **fields: object) -> str:
    return json.dumps({"action": kind, **fields})


OK = CodeOutcome(ok=True, value=1, value_text="1", has_value=True, stdout="hi\n")
BOOM = CodeOutcome(
    ok=False,
    error_type="ValueError",
    error_message="boom",
    traceback="Traceback...\nValueError: boom",
)


@pytest.mark.parametrize(
    "text",
    [
        '{"action": "return", "result": 5}',
        'Sure! Here it is:\n```json\n{"action": "return", "result": 5}\n```\nDone.',
        'I think {not json} then {"action": "return", "result": 5}',
    ],
)
def test_tolerant_extraction(text: str) -> None:
    assert parse_action(text).result == 5


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("no json here", "no JSON object"),
        ('{"action": "fly"}', "unknown action"),
        ('{"action": "eval_and_continue"}', 'needs "code"'),
        ('{"action": "eval_and_continue", "code": "  "}', 'needs "code"'),
        ('{"action": "return"}', 'needs "result"'),
        ('{"action": "done", "extra": 1}', "unexpected keys"),
    ],
)
def test_strict_shape(text: str, problem: str) -> None:
    with pytest.raises(InvalidReply, match=problem):
        parse_action(text)


def test_disallowed_action_is_refused() -> None:
    with pytest.raises(InvalidReply, match="not allowed"):
        parse_action(reply("done"), allowed=("eval_and_complete", "return"))


def test_each_action() -> None:
    m = machine()
    assert isinstance(m.start(), CallModel)
    step = m.on_model_reply(reply("eval_and_continue", code="x = 1"))
    assert step == RunCode("x = 1", complete=False)
    step = m.on_code_result(OK)
    assert isinstance(step, CallModel)
    assert "Value of the last expression:\n1" in step.messages[-1]["content"]
    assert "stdout:\nhi" in step.messages[-1]["content"]
    step = m.on_model_reply(reply("eval_and_complete", code="x + 1"))
    assert step == RunCode("x + 1", complete=True)
    assert m.on_code_result(CodeOutcome(ok=True, value=2, has_value=True)) == Finish(2)
    assert m.iterations == 1
    assert machine().on_model_reply(reply("return", result={"a": 1})) == Finish({"a": 1})
    assert machine().on_model_reply(reply("done")) == Finish(None)


def test_max_iterations_counts_successful_continue_steps() -> None:
    m = machine(max_iterations=3)
    m.start()
    runs = 0
    while True:
        step = m.on_model_reply(reply("eval_and_continue", code="1"))
        assert isinstance(step, RunCode)
        runs += 1
        step = m.on_code_result(OK)
        if isinstance(step, Stop):
            break
    assert runs == 3 and m.iterations == 3
    assert step.reason == "max_iterations"


def test_max_retries_counts_failures_in_a_row_and_success_resets() -> None:
    m = machine(max_retries=2)
    m.start()
    assert isinstance(m.on_model_reply("garbage"), CallModel)  # failure 1
    assert isinstance(m.on_model_reply(reply("eval_and_continue", code="x")), RunCode)
    assert isinstance(m.on_code_result(BOOM), CallModel)  # failure 2
    assert isinstance(m.on_model_reply(reply("eval_and_continue", code="y")), RunCode)
    assert isinstance(m.on_code_result(OK), CallModel)  # success: reset
    assert m.failures_in_a_row == 0
    assert isinstance(m.on_model_reply("garbage"), CallModel)  # 1
    assert isinstance(m.on_model_reply("garbage"), CallModel)  # 2
    stop = m.on_model_reply("garbage")  # 3 > max_retries
    assert isinstance(stop, Stop) and stop.reason == "max_retries"


def test_code_error_feedback_shows_the_traceback_and_output() -> None:
    m = machine()
    m.start()
    m.on_model_reply(reply("eval_and_continue", code="x"))
    step = m.on_code_result(
        CodeOutcome(
            ok=False,
            error_type="ValueError",
            error_message="boom",
            traceback="Traceback...\nValueError: boom",
            stdout="partial\n",
        )
    )
    assert isinstance(step, CallModel)
    feedback = step.messages[-1]["content"]
    assert "ValueError: boom" in feedback and "partial" in feedback and "Fix the code" in feedback


def test_output_validation_failure_is_a_retry_with_the_reason() -> None:
    def validate(value: object) -> object:
        if not isinstance(value, int):
            raise InvalidOutput("expected an integer")
        return value

    m = machine(validate_output=validate)
    m.start()
    step = m.on_model_reply(reply("return", result="five"))
    assert isinstance(step, CallModel)
    assert "expected an integer" in step.messages[-1]["content"]
    assert m.on_model_reply(reply("return", result=5)) == Finish(5)


def test_eval_and_complete_without_a_value_is_a_failure() -> None:
    m = machine()
    m.start()
    m.on_model_reply(reply("eval_and_complete", code="x = 1"))
    step = m.on_code_result(CodeOutcome(ok=True, has_value=False))
    assert isinstance(step, CallModel)
    assert "did not end with an expression" in step.messages[-1]["content"]


def test_long_messages_are_truncated_with_a_marker() -> None:
    m = machine(max_message_length=200)
    m.start()
    m.on_model_reply(reply("eval_and_continue", code="print('x' * 10**6)"))
    step = m.on_code_result(CodeOutcome(ok=True, stdout="x" * 10_000))
    assert isinstance(step, CallModel)
    content = step.messages[-1]["content"]
    assert len(content) <= 200 and "characters truncated" in content
    assert truncate("short", 200) == "short"
