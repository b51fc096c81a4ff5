"""Sandboxes: network-less containers that run Python and call host tools over gRPC."""

from . import image
from .runtime import SandboxRuntime, default_runtime
from .session import ExecError, ExecResult, ResourceStats, Sandbox
from .tools import ToolDef, tool_from

__all__ = [
    "ExecError",
    "ExecResult",
    "ResourceStats",
    "Sandbox",
    "SandboxRuntime",
    "ToolDef",
    "default_runtime",
    "image",
    "tool_from",
]
