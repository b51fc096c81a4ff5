"""Tools: host code that sandbox code may call.

Any plain function, class, instance or module can be a tool (see
:func:`legion.sandbox.tool_from`). Subclass :class:`Tool` when the tool needs
per-agent options: an agent's ``tool_config`` reaches it as ``self.config``.

    class Weather(legion.Tool):
        \"\"\"Forecasts from our internal service.\"\"\"

        def today(self, city: str) -> dict:
            return fetch(self.config["endpoint"], city)

    class Planner(legion.Agent):
        \"\"\"Plans trips.\"\"\"
        tools = [Weather]
        tool_config = {"Weather": {"endpoint": "http://weather.internal"}}

The model sees a tool's source code, or its ``description`` when it has one.
:func:`expose` picks functions of a third-party module (or any object) to show
and call, without writing a wrapper.
"""

from __future__ import annotations

import inspect
import textwrap
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .errors import UsageError
from .sandbox.tools import ToolDef, tool_from

__all__ = ["Tool", "describe", "expose"]


class Tool:
    """Base for tools with options. Public methods are what sandbox code may call."""

    description: ClassVar[str | None] = None
    """Shown to the model instead of the source code, when set."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: Mapping[str, Any] = types.MappingProxyType(dict(config or {}))


class Exposed:
    """Chosen functions of an object, as a tool (made by :func:`expose`)."""

    def __init__(
        self, target: Any, *, name: str, functions: Sequence[str], description: str | None
    ) -> None:
        missing = [f for f in functions if not callable(getattr(target, f, None))]
        if missing:
            raise UsageError(f"expose({name}): {missing} are not functions of {target!r}")
        if not functions:
            raise UsageError(f"expose({name}): name at least one function to expose")
        self.target = target
        self.name = name
        self.functions = tuple(functions)
        self.description = description

    def tool_def(self) -> ToolDef:
        module = types.ModuleType(self.name, self.description or inspect.getdoc(self.target))
        for fn in self.functions:
            setattr(module, fn, getattr(self.target, fn))
        module.__all__ = list(self.functions)  # type: ignore[attr-defined]
        return tool_from(module, name=self.name)


def expose(
    target: Any,
    *,
    functions: Sequence[str],
    name: str | None = None,
    description: str | None = None,
) -> Exposed:
    """Offer some functions of ``target`` (a module, class or object) as a tool:

    legion.expose(json, functions=["loads", "dumps"])
    """
    default = getattr(target, "__name__", type(target).__name__).rsplit(".", 1)[-1]
    return Exposed(target, name=name or default, functions=functions, description=description)


def to_tool_def(tool: Any, config: Mapping[str, Any] | None = None) -> ToolDef:
    """A ToolDef for anything an agent lists in ``tools``."""
    if isinstance(tool, Exposed):
        return tool.tool_def()
    if isinstance(tool, type) and issubclass(tool, Tool):
        return tool_from(tool(config), name=tool.__name__)
    if config:
        raise UsageError(
            f"tool_config for {tool_name(tool)}: only legion.Tool subclasses take "
            "options; subclass legion.Tool to receive them as self.config"
        )
    return tool_from(tool)


def tool_name(tool: Any) -> str:
    if isinstance(tool, Exposed):
        return tool.name
    name = getattr(tool, "__name__", None) or type(tool).__name__
    return str(name).rsplit(".", 1)[-1]


def describe(tool: Any, definition: ToolDef) -> str:
    """What the model reads about a tool: its description, or its source."""
    description = getattr(tool, "description", None)
    if isinstance(description, str) and description.strip():
        return textwrap.dedent(description).strip()
    if isinstance(tool, (Exposed, types.ModuleType)):
        return _signatures(definition)
    target = tool if isinstance(tool, type) or inspect.isfunction(tool) else type(tool)
    try:
        return textwrap.dedent(inspect.getsource(target)).strip()
    except (OSError, TypeError):
        return _signatures(definition)


def _signatures(definition: ToolDef) -> str:
    lines = [f'"""{definition.doc}"""'] if definition.doc else []
    for name, fn in definition.functions.items():
        qualified = definition.name if definition.is_function else f"{definition.name}.{name}"
        lines.append(f"def {qualified}{fn.signature}:")
        doc = fn.doc.strip() or "..."
        lines.append(textwrap.indent(f'"""{doc}"""', "    "))
    return "\n".join(lines)
