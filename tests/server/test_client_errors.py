"""What the client makes of the server's answers: statuses and RunError
messages become the exceptions an embedded run raises, results become
RunResults."""

from __future__ import annotations

import grpc
import pytest

import legion
from legion._proto import controller_pb2 as pb
from legion.client import remote_event, run_error, run_result, translate_status

USAGE = pb.Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7, requests=1)
HISTORY = '[{"role": "system", "content": "You are..."}]'


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (grpc.StatusCode.NOT_FOUND, legion.NotFound),
        (grpc.StatusCode.UNAUTHENTICATED, legion.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, legion.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, legion.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, legion.Unavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, legion.ConversationError),
        (grpc.StatusCode.UNIMPLEMENTED, legion.RemoteError),
        (grpc.StatusCode.INTERNAL, legion.RemoteError),
    ],
)
def test_statuses_become_remote_errors_with_their_code(
    code: grpc.StatusCode, kind: type[legion.LegionError]
) -> None:
    error = translate_status(code, "what the server said")
    assert isinstance(error, kind)
    assert isinstance(error, legion.RemoteError) and isinstance(error, legion.LegionError)
    assert error.code == code.name and str(error) == "what the server said"
    assert isinstance(translate_status(grpc.StatusCode.NOT_FOUND, "x"), LookupError)


def test_invalid_argument_is_the_callers_mistake() -> None:
    error = translate_status(grpc.StatusCode.INVALID_ARGUMENT, "task must be a non-empty string")
    assert type(error) is legion.UsageError and str(error) == "task must be a non-empty string"


@pytest.mark.parametrize(
    "kind", [legion.MaxIterationsReached, legion.MaxRetriesReached, legion.ModelError]
)
def test_run_errors_come_back_with_their_history(kind: type[legion.RunError]) -> None:
    message = pb.RunError(
        run_id="r1", type=kind.__name__, message="it stopped", iterations=3, usage=USAGE,
        messages_json=HISTORY,
    )  # fmt: skip
    error = run_error(message)
    assert type(error) is kind and str(error) == "it stopped"
    assert error.run_id == "r1" and error.iterations == 3
    assert error.usage == legion.Usage(5, 2, 7, None, 1)
    assert error.messages == [{"role": "system", "content": "You are..."}]


def test_sandbox_errors_come_back_as_themselves_carrying_the_run() -> None:
    for kind in (legion.SandboxCrashed, legion.SandboxOOMKilled, legion.DockerUnavailable):
        error = run_error(pb.RunError(run_id="r2", type=kind.__name__, message="gone", usage=USAGE))
        assert type(error) is kind and str(error) == "gone"
        assert error.run_id == "r2"  # type: ignore[attr-defined]
        assert error.usage.requests == 1  # type: ignore[attr-defined]


def test_unknown_error_types_are_run_errors_naming_the_type() -> None:
    error = run_error(pb.RunError(run_id="r3", type="KeyError", message="'x'"))
    assert type(error) is legion.RunError and str(error) == "KeyError: 'x'"
    assert error.run_id == "r3"  # type: ignore[attr-defined]
    usage_error = run_error(pb.RunError(type="UsageError", message="bad limits"))
    assert type(usage_error) is legion.UsageError


def test_results_and_events_come_back_as_sdk_objects() -> None:
    result = run_result(
        pb.RunResult(
            run_id="r4", output_json='{"total": 42}', iterations=1, usage=USAGE,
            messages_json=HISTORY,
        )
    )  # fmt: skip
    assert isinstance(result, legion.RunResult)
    assert result.output == {"total": 42} and result.run_id == "r4" and result.iterations == 1
    assert result.usage.cost_usd is None
    priced = pb.Usage(total_tokens=1, cost_usd=0.25)
    assert run_result(pb.RunResult(usage=priced)).usage.cost_usd == 0.25
    event = remote_event(
        pb.Event(name="tool.call.start", run_id="r4", time=1.5, data_json='{"tool": "Ledger"}')
    )
    assert isinstance(event, legion.telemetry.Event)
    assert (event.name, event.run_id, event.parent_run_id) == ("tool.call.start", "r4", None)
    assert event.data == {"tool": "Ledger"} and event.conversation_id == ""
