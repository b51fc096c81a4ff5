"""Sandboxes: network-less containers that run Python and call host tools over gRPC."""

from ..errors import SnapshotError
from . import image
from .backend import SandboxBackend
from .endpoint import ChannelEndpoint, UnixSocketEndpoint
from .files import FileInfo, SandboxFiles
from .runtime import SandboxRuntime, default_runtime
from .session import (
    Artifact,
    ExecError,
    ExecResult,
    ResourceStats,
    Restored,
    Sandbox,
    Snapshot,
)
from .tools import ToolDef, tool_from

__all__ = [
    "Artifact",
    "ChannelEndpoint",
    "ExecError",
    "ExecResult",
    "FileInfo",
    "ResourceStats",
    "Restored",
    "Sandbox",
    "SandboxBackend",
    "SandboxFiles",
    "SandboxRuntime",
    "Snapshot",
    "SnapshotError",
    "ToolDef",
    "UnixSocketEndpoint",
    "default_runtime",
    "image",
    "tool_from",
]
