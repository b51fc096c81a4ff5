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

from . import telemetry, vault
from .agent import Agent, RunResult, prompt_for, run, run_sync
from .config import AgentConfig, SandboxLimits
from .errors import (
    BackendError,
    DockerUnavailable,
    ImageNotFound,
    LegionError,
    MaxIterationsReached,
    MaxRetriesReached,
    ModelError,
    RunError,
    SandboxClosed,
    SandboxCrashed,
    SandboxError,
    SandboxOOMKilled,
    SandboxStartError,
    UsageError,
    VaultKeyError,
)
from .models import Usage
from .sandbox import (
    ExecError,
    ExecResult,
    ResourceStats,
    Sandbox,
    SandboxRuntime,
)
from .tool import Tool, expose

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentConfig",
    "BackendError",
    "DockerUnavailable",
    "ExecError",
    "ExecResult",
    "ImageNotFound",
    "LegionError",
    "MaxIterationsReached",
    "MaxRetriesReached",
    "ModelError",
    "ResourceStats",
    "RunError",
    "RunResult",
    "Sandbox",
    "SandboxClosed",
    "SandboxCrashed",
    "SandboxError",
    "SandboxLimits",
    "SandboxOOMKilled",
    "SandboxRuntime",
    "SandboxStartError",
    "Tool",
    "Usage",
    "UsageError",
    "VaultKeyError",
    "__version__",
    "expose",
    "prompt_for",
    "run",
    "run_sync",
    "telemetry",
    "vault",
]
