"""Legion for Python: agents write Python; it runs in network-less Docker
sandboxes; every tool call is proxied back to the host over gRPC.

The sandbox layer on its own::

    import asyncio, legion

    class Calculator:
        \"\"\"Arithmetic on the host.\"\"\"
        def add(self, a: int, b: int) -> int:
            return a + b

    async def main():
        async with legion.Sandbox(tools=[Calculator]) as sandbox:
            result = await sandbox.run("total = Calculator.add(2, 3)\\ntotal * 10")
            print(result.value)   # 50

    asyncio.run(main())
"""

import os as _os

# litellm otherwise fetches a price table from the internet when imported; a
# user's own setting wins.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from . import human, store, telemetry, vault
from ._mcp_client import MCP
from .agent import Agent, RunResult, prompt_for, run, run_sync
from .client import Client, SyncClient
from .compose import parallel, pipeline
from .config import AgentConfig, SandboxLimits
from .errors import (
    BackendError,
    BackendUnavailable,
    ConversationError,
    DockerUnavailable,
    HumanRequestNotFound,
    ImageNotFound,
    LegionError,
    MaxIterationsReached,
    MaxRetriesReached,
    MCPError,
    MCPToolError,
    ModelError,
    NotFound,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
    RunError,
    SandboxClosed,
    SandboxCrashed,
    SandboxError,
    SandboxFileError,
    SandboxOOMKilled,
    SandboxStartError,
    ToolArgumentError,
    Unauthenticated,
    Unavailable,
    UsageError,
    UsageLimitExceeded,
    VaultKeyError,
)
from .human import Human
from .live import AgentHandle, AgentPool, pool, start
from .models import Usage
from .sandbox import (
    Artifact,
    ExecError,
    ExecResult,
    FileInfo,
    ResourceStats,
    Sandbox,
    SandboxRuntime,
)
from .subagents import SubAgents
from .tool import Tool, expose

__version__ = "0.1.0"

__all__ = [
    "MCP",
    "Agent",
    "AgentConfig",
    "AgentHandle",
    "AgentPool",
    "Artifact",
    "BackendError",
    "BackendUnavailable",
    "Client",
    "ConversationError",
    "DockerUnavailable",
    "ExecError",
    "ExecResult",
    "FileInfo",
    "Human",
    "HumanRequestNotFound",
    "ImageNotFound",
    "LegionError",
    "MCPError",
    "MCPToolError",
    "MaxIterationsReached",
    "MaxRetriesReached",
    "ModelError",
    "NotFound",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "ResourceStats",
    "RunError",
    "RunResult",
    "Sandbox",
    "SandboxClosed",
    "SandboxCrashed",
    "SandboxError",
    "SandboxFileError",
    "SandboxLimits",
    "SandboxOOMKilled",
    "SandboxRuntime",
    "SandboxStartError",
    "SubAgents",
    "SyncClient",
    "Tool",
    "ToolArgumentError",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "UsageError",
    "UsageLimitExceeded",
    "VaultKeyError",
    "__version__",
    "expose",
    "human",
    "parallel",
    "pipeline",
    "pool",
    "prompt_for",
    "run",
    "run_sync",
    "start",
    "store",
    "telemetry",
    "vault",
]
