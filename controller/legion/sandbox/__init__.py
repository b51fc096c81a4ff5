"""Sandboxes: network-less containers that run Python and call host tools over gRPC."""

from ..errors import SnapshotError
from . import image
from .backend import SandboxBackend
from .endpoint import ChannelEndpoint, UnixSocketEndpoint
from .runtime import SandboxRuntime, default_runtime
from .session import ExecError, ExecResult, ResourceStats, Restored, Sandbox, Snapshot
from .tools import ToolDef, tool_from

__all__ = [
    "ChannelEndpoint",
    "ExecError",
    "ExecResult",
    "ResourceStats",
    "Restored",
    "Sandbox",
    "SandboxBackend",
    "SandboxRuntime",
    "Snapshot",
    "SnapshotError",
    "ToolDef",
    "UnixSocketEndpoint",
    "default_runtime",
    "image",
    "tool_from",
]
