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

A function can require a person's approval before each call: decorate it
with :func:`requires_approval`, or name it in the tool's ``tool_config``
(``{"Payments": {"approval": {"refund": {"approver": "alice"}}}}``). An
approver is a principal's name, or ``role:NAME`` for any principal holding
the role NAME. The hold is on the host, where the tool lives; see
:mod:`legion.human`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import textwrap
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, overload

from .errors import UsageError
from .sandbox.tools import ToolDef, tool_from

__all__ = ["Approval", "Tool", "describe", "expose", "requires_approval"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_APPROVAL_TIMEOUT = 300.0

ROLE = "role:"
"""An approver written ``role:NAME`` is every principal holding the role NAME
(under ``legion serve``, a principal's roles are its vault's ``roles``)."""


@dataclass(frozen=True)
class Approval:
    """Each call of a tool function waits for a person to approve it.

    ``approvers`` are the principals whose approval counts, by name or as
    ``role:NAME`` (any principal holding that role); empty: the principal
    whose run makes the call (embedded, whoever answers). After
    ``timeout`` seconds without a decision the call fails with
    ``ApprovalTimeout`` in the code; a refusal fails it with
    ``ApprovalRefused``. Either way the function never runs.
    """

    approvers: tuple[str, ...] = ()
    timeout: float = DEFAULT_APPROVAL_TIMEOUT

    def __post_init__(self) -> None:
        approvers = self.approvers
        if isinstance(approvers, str):
            approvers = (approvers,)
        if not isinstance(approvers, (tuple, list)) or not all(
            isinstance(a, str) and a.strip() and a.removeprefix(ROLE).strip() for a in approvers
        ):
            raise UsageError(
                f"approval: approver must be a principal's name, role:NAME, or a list of them, "
                f"got {self.approvers!r}"
            )
        object.__setattr__(self, "approvers", tuple(approvers))
        timeout = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise UsageError(
                f"approval: timeout must be a positive number of seconds, got {timeout!r}"
            )
        object.__setattr__(self, "timeout", float(timeout))

    async def hold(
        self, *, tool: str, function: str, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[str, str] | None:
        """Wait for the decision: None when approved, else the error for the code."""
        from .human import hold_for_approval  # noqa: PLC0415 - human.py builds on this module

        return await hold_for_approval(self, tool=tool, function=function, args=args, kwargs=kwargs)


@overload
def requires_approval(fn: F, /) -> F: ...
@overload
def requires_approval(
    *, approver: str | Sequence[str] = (), timeout: float = DEFAULT_APPROVAL_TIMEOUT
) -> Callable[[F], F]: ...
def requires_approval(
    fn: Any = None,
    /,
    *,
    approver: str | Sequence[str] = (),
    timeout: float = DEFAULT_APPROVAL_TIMEOUT,
) -> Any:
    """Make each call of a tool function wait for a person's approval::

        class Payments(legion.Tool):
            @legion.human.requires_approval(approver="alice", timeout=120)
            def refund(self, order: str, amount: float) -> str: ...

    Bare ``@requires_approval`` lets the run's own principal approve;
    ``approver="role:finance"`` lets any principal holding the role finance.
    """
    approval = Approval(approvers=_approvers(approver), timeout=timeout)

    def mark(target: F) -> F:
        if not callable(target):
            raise UsageError(f"requires_approval decorates a function, not {target!r}")
        target.__legion_approval__ = approval  # type: ignore[attr-defined]
        return target

    return mark(fn) if fn is not None else mark


def _approvers(approver: Any) -> tuple[str, ...]:
    if isinstance(approver, str):
        return (approver,)
    if isinstance(approver, Sequence):
        return tuple(approver)
    raise UsageError(
        f"approval: approver must be a principal's name, role:NAME, or a list of them, "
        f"got {approver!r}"
    )


def may_decide(approvers: Iterable[str], principal: str | None, roles: Iterable[str] = ()) -> bool:
    """Whether ``principal``, holding ``roles``, is one of ``approvers``: named
    there, or holding a role named there as ``role:NAME``."""
    held = frozenset(roles)
    return any(
        approver.removeprefix(ROLE) in held if approver.startswith(ROLE) else approver == principal
        for approver in approvers
    )


def who_decides(approvers: Sequence[str]) -> str:
    """``approvers`` in words: "alice, bob or a principal with the role finance"."""
    names = [a for a in approvers if not a.startswith(ROLE)]
    roles = [a.removeprefix(ROLE) for a in approvers if a.startswith(ROLE)]
    if roles:
        names.append(f"a principal with the role {' or '.join(roles)}")
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def approval_of(spec: Any, *, where: str) -> Approval:
    """An :class:`Approval` from a ``tool_config`` entry: ``True``, a principal's
    name (or ``role:NAME``), a list of them, or ``{"approver": ..., "timeout": ...}``."""
    if isinstance(spec, Approval):
        return spec
    if spec is True:
        return Approval()
    if isinstance(spec, (str, list, tuple)):
        return Approval(approvers=_approvers(spec))
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"approver", "timeout"})
        if unknown:
            raise UsageError(
                f"{where}: unknown approval option(s) {unknown}; use approver, timeout"
            )
        return Approval(
            approvers=_approvers(spec.get("approver", ())),
            timeout=spec.get("timeout", DEFAULT_APPROVAL_TIMEOUT),
        )
    raise UsageError(
        f"{where}: an approval is true, a principal's name, a list of names, or "
        f"{{'approver': ..., 'timeout': ...}}; got {spec!r}"
    )


def _with_approvals(definition: ToolDef, approvals: Any) -> ToolDef:
    """``definition`` with the functions ``tool_config``'s ``approval`` names held."""
    where = f"tool_config for {definition.name}: approval"
    if not isinstance(approvals, Mapping):
        raise UsageError(
            f"{where} maps function names to approvals "
            f"({{'refund': {{'approver': 'alice'}}}}), got {approvals!r}"
        )
    functions = dict(definition.functions)
    for name, spec in approvals.items():
        key = "" if definition.is_function and name == definition.name else name
        if key not in functions:
            offered = [definition.name] if definition.is_function else sorted(functions)
            raise UsageError(f"{where} names {name!r}, which is not one of its functions {offered}")
        functions[key] = dataclasses.replace(
            functions[key], approval=approval_of(spec, where=f"{where}[{name!r}]")
        )
    return dataclasses.replace(definition, functions=functions)


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
    """A ToolDef for anything an agent lists in ``tools``. A ``config`` key
    ``approval`` (any tool) names the functions held for approval; the other
    keys go to a :class:`Tool` subclass as ``self.config``."""
    options = dict(config or {})
    approvals = options.pop("approval", None)
    definition = _tool_def(tool, options)
    return definition if approvals is None else _with_approvals(definition, approvals)


def _tool_def(tool: Any, config: Mapping[str, Any]) -> ToolDef:
    if isinstance(tool, Exposed):
        return tool.tool_def()
    if isinstance(tool, type) and issubclass(tool, Tool):
        return tool_from(tool(config), name=tool.__name__)
    if config:
        raise UsageError(
            f"tool_config for {tool_name(tool)}: only legion.Tool subclasses take "
            "options (and any tool 'approval'); subclass legion.Tool to receive them "
            "as self.config"
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
