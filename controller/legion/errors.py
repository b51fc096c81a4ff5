"""Every error Legion raises derives from :class:`LegionError`.

The tree::

    LegionError
    ├── UsageError               the caller's mistake: bad config, bad tool; says how to fix it
    ├── VaultKeyError            a tool asked the vault for a key the caller did not bind
    ├── HumanRequestNotFound     no human request with that ref is waiting for an answer
    ├── ConversationError        a long-lived agent cannot take the turn (stopped, unknown id)
    ├── MCPError                 an MCP server could not be started, reached or listed; names it
    │   └── MCPToolError         the server answered a tool call with an error (``isError``)
    ├── ToolArgumentError        a tool call's arguments do not fit the tool's schema
    ├── RemoteError              a controller (`legion serve`) refused a call; ``code``: the status
    │   ├── NotFound             no such agent, conversation, run or human request
    │   ├── Unauthenticated      no token, or one the server does not know
    │   ├── PermissionDenied     it exists, but belongs to another principal
    │   ├── ResourceExhausted    too many runs, a message too big, or a principal's budget spent
    │   └── Unavailable          the server cannot be reached, or is shutting down
    ├── RunError                 an agent run stopped without an answer; carries its history
    │   ├── MaxIterationsReached max_iterations successful steps and no answer yet
    │   ├── MaxRetriesReached    more failed steps in a row than max_retries
    │   ├── UsageLimitExceeded   a budget (max_tokens, max_cost_usd, ...) was spent; names it
    │   └── ModelError           the model could not be reached, or refused the request
    └── SandboxError             a sandbox could not do its job
        ├── BackendUnavailable   the sandbox backend (its engine) does not answer
        │   └── DockerUnavailable no Docker engine answers
        ├── ImageNotFound        an image is not built; says the command (`legion image build ...`)
        ├── BackendError         the engine refused or failed an operation
        ├── SandboxStartError    a container did not become ready (no Hello in time, or exited)
        ├── SandboxClosed        the Sandbox was used after it was closed
        ├── SnapshotError        a snapshot or restore failed: timed out, not a snapshot, too large
        ├── SandboxFileError     a file could not be written, read, listed or removed
        └── SandboxCrashed       the container died while running code; bindings are lost
            └── SandboxOOMKilled the kernel killed it at its memory limit

Errors raised by sandbox *code* (including a timeout) are not exceptions on the
host: they come back in :attr:`legion.ExecResult.error`, because a model, not
the host program, is meant to read and fix them.

Docker and gRPC errors are translated into these where they enter Legion, once.
"""

from __future__ import annotations

from typing import Any


class LegionError(Exception):
    """Root of every error raised by Legion."""


class UsageError(LegionError, ValueError):
    """The caller used Legion wrongly (bad settings, a tool with nothing to call).

    The message says how to fix it.
    """


class VaultKeyError(LegionError, KeyError):
    """A tool read a vault key that the caller did not bind."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SandboxError(LegionError):
    """A sandbox could not be provided or did not survive the code it ran."""


class BackendUnavailable(SandboxError):
    """The engine behind a sandbox backend does not answer (any backend)."""


class DockerUnavailable(BackendUnavailable):
    """No Docker engine answers."""


class ImageNotFound(SandboxError):
    """A sandbox image is not built: the runner's, or an environment's (such
    as ``data``). The message says the command that builds it."""


class BackendError(SandboxError):
    """The container engine refused or failed an operation."""


class SandboxStartError(SandboxError):
    """A container did not become ready (no Hello in time, or it exited first)."""


class SandboxClosed(SandboxError):
    """The Sandbox was used after it was closed."""


class SnapshotError(SandboxError):
    """``Sandbox.snapshot`` or ``Sandbox.restore`` failed as a whole: it timed
    out (the container was replaced), the blob is not a snapshot, or it is
    larger than ``SandboxLimits.max_snapshot_bytes``. Values that could not
    be saved or loaded one by one are not errors: they are listed in
    ``Snapshot.skipped`` and ``Restored.failed``."""


class SandboxFileError(SandboxError):
    """A file operation in the sandbox's work directory failed. ``kind`` says
    why, in one word: ``bad_path`` (outside the work directory), ``not_found``,
    ``too_large``, ``no_space`` (over ``files_mb``), ``symlink`` (links are
    never followed), ``not_a_file``, ``not_a_dir``, ``exists``, ``denied``,
    ``failed``. The sandbox goes on working."""

    def __init__(self, message: str, *, kind: str = "failed", path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


class SandboxCrashed(SandboxError):
    """The container died while running code. Its bindings are lost; the next
    ``run`` on the same :class:`legion.Sandbox` gets a fresh container."""

    def __init__(
        self, message: str, *, exit_code: int | None = None, stdout: str = "", stderr: str = ""
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


class SandboxOOMKilled(SandboxCrashed):
    """The kernel killed the sandbox at its memory limit."""


class RunError(LegionError):
    """An agent run stopped without an answer.

    ``messages`` is the conversation so far, ``run_id`` the run's id and
    ``usage`` the tokens (and cost) spent, so nothing of the work is lost.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str = "",
        messages: list[dict[str, Any]] | None = None,
        usage: Any = None,
        iterations: int = 0,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.messages = list(messages or [])
        self.usage = usage
        self.iterations = iterations


class MaxIterationsReached(RunError):
    """The agent took ``max_iterations`` successful steps without answering."""


class MaxRetriesReached(RunError):
    """More steps failed in a row than ``max_retries`` allows."""


class UsageLimitExceeded(RunError):
    """A budget was spent: the run's or conversation's ``max_tokens``,
    ``max_cost_usd``, ``max_tool_calls`` or ``max_sandbox_seconds``, its
    caller's (a sub-agent counts against the run that called it), or, under
    ``legion serve``, its principal's daily budget or sandbox allowance.

    ``limit`` names the budget (``"max_tokens"``, ``"max_tokens_per_day"``...),
    ``allowed`` is its value, ``used`` the amount counted against it, and
    ``scope`` whose budget it is (``"run"``, ``"conversation"``,
    ``"calling run"``, ``"principal alice"``). ``usage`` is the run's own, as
    for every :class:`RunError`; ``counted`` is everything counted against the
    budget (sub-agents included)."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str = "",
        messages: list[dict[str, Any]] | None = None,
        usage: Any = None,
        iterations: int = 0,
        limit: str = "",
        allowed: float | None = None,
        used: float | None = None,
        scope: str = "",
        counted: Any = None,
    ) -> None:
        super().__init__(
            message, run_id=run_id, messages=messages, usage=usage, iterations=iterations
        )
        self.limit = limit
        self.allowed = allowed
        self.used = used
        self.scope = scope
        self.counted = counted


class ModelError(RunError):
    """The model could not be reached (after retries), or refused the request."""


class HumanRequestNotFound(LegionError, LookupError):
    """No human request with that ref is waiting for an answer."""


class ConversationError(LegionError):
    """A long-lived agent cannot take the turn: it was stopped, or no
    conversation with that id is stored."""


class MCPError(LegionError):
    """An MCP server could not be started, reached or listed, or it died
    during a call. The message names the server (and, for a stdio server,
    ends with its last stderr lines)."""


class MCPToolError(MCPError):
    """An MCP server answered a tool call with an error (``isError``, or a
    JSON-RPC error); the message is the server's."""


class ToolArgumentError(LegionError, TypeError):
    """A tool call's arguments do not fit the tool's schema; the message
    names the parameter. Sandbox code sees it as ``ToolArgumentError``."""


class RemoteError(LegionError):
    """A controller service (``legion serve``) refused a call.

    ``code`` is the gRPC status name (``"NOT_FOUND"``...); the message is the
    server's. Input the server found malformed raises :class:`UsageError`
    instead, and a run that started and failed raises its :class:`RunError`.
    """

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class NotFound(RemoteError, LookupError):
    """No such agent, conversation, run or human request on the server."""


class Unauthenticated(RemoteError):
    """The call carried no token, or one the server does not know."""


class PermissionDenied(RemoteError):
    """The thing exists, but belongs to another principal."""


class ResourceExhausted(RemoteError):
    """Too many concurrent runs for this principal, a message over the size
    limit, or one of the principal's budgets spent (the message names the
    budget and when it resets)."""


class Unavailable(RemoteError):
    """The server cannot be reached, or is shutting down."""
