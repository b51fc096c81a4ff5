import subprocess
import sys

import legion

PUBLIC = [
    # agents
    "Agent", "AgentConfig", "RunResult", "Tool", "Usage", "expose", "prompt_for", "run",
    "run_sync", "telemetry", "vault",
    # long-lived and cooperating agents
    "AgentHandle", "AgentPool", "Human", "SubAgents", "human", "pool", "start", "store",
    "parallel", "pipeline",
    # a controller service (legion serve)
    "Client", "SyncClient",
    # sandboxes
    "Artifact", "ExecError", "ExecResult", "FileInfo", "ResourceStats", "Sandbox",
    "SandboxLimits", "SandboxRuntime",
    # MCP servers as a tool source
    "MCP", "MCPError", "MCPToolError", "ToolArgumentError",
    # errors
    "BackendError", "BackendUnavailable", "ConversationError", "DockerUnavailable",
    "HumanRequestNotFound", "SandboxFileError",
    "ImageNotFound", "LegionError", "MaxIterationsReached", "MaxRetriesReached", "ModelError",
    "RunError", "SandboxClosed", "SandboxCrashed", "SandboxError", "SandboxOOMKilled",
    "SandboxStartError", "UsageError", "UsageLimitExceeded", "VaultKeyError",
    # errors from a controller service
    "RemoteError", "NotFound", "Unauthenticated", "PermissionDenied", "ResourceExhausted",
    "Unavailable",
    "__version__",
]  # fmt: skip


def test_public_api_is_pinned() -> None:
    assert sorted(legion.__all__) == sorted(PUBLIC)
    for name in legion.__all__:
        assert hasattr(legion, name), name


def test_every_error_derives_from_legion_error() -> None:
    errors = [
        getattr(legion, n)
        for n in legion.__all__
        if isinstance(getattr(legion, n), type) and issubclass(getattr(legion, n), BaseException)
    ]
    assert len(errors) >= 10
    assert all(issubclass(e, legion.LegionError) for e in errors)
    assert issubclass(legion.SandboxOOMKilled, legion.SandboxCrashed)


def test_import_is_light() -> None:
    # `import legion` must not pull in litellm (seconds, and network look-ups).
    code = "import sys, legion; print('litellm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
