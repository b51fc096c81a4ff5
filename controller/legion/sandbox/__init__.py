"""Sandboxes: network-less containers that run Python and call host tools over gRPC."""

from ..errors import SnapshotError
from . import image
from .runtime import SandboxRuntime, default_runtime
from .session import ExecError, ExecResult, ResourceStats, Restored, Sandbox, Snapshot
from .tools import ToolDef, tool_from

__all__ = [
    "ExecError",
    "ExecResult",
    "ResourceStats",
    "Restored",
    "Sandbox",
    "SandboxRuntime",
    "Snapshot",
    "SnapshotError",
    "ToolDef",
    "default_runtime",
    "image",
    "tool_from",
]
