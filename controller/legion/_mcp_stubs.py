"""Python stubs for MCP tools: a signature and a docstring from each tool's
JSON Schemas, and the check of a call's arguments against its inputSchema.

What sandbox code sees of an MCP tool is only this text; the call itself is
checked here (jsonschema) and made by the controller's MCP session.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import jsonschema.validators

from .errors import ToolArgumentError

__all__ = ["ToolStubSpec", "python_name", "stub_for"]

_JSON_TYPES = {
    "string": "str",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "null": "None",
    "array": "list[Any]",
    "object": "dict[str, Any]",
}
_MAX_SCHEMA_DOC = 1500
"""An outputSchema longer than this (as compact JSON) is cut in the docstring."""


def python_name(name: str) -> str:
    """A public Python identifier for an MCP name (``get-sum`` -> ``get_sum``)."""
    out = re.sub(r"\W", "_", name)
    if not out or out[0].isdigit():
        out = f"t_{out}"
    out = out.lstrip("_") or "t"
    if keyword.iskeyword(out) or keyword.issoftkeyword(out):
        out += "_"
    return out


def annotation(schema: Any) -> str:
    """The Python type a JSON Schema describes, as source text."""
    if not isinstance(schema, Mapping):
        return "Any"
    if "const" in schema:
        return f"Literal[{schema['const']!r}]"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, (str, int, bool)) for v in enum):
        return "Literal[" + ", ".join(repr(v) for v in enum) + "]"
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            return _union(annotation(o) for o in options)
    kind = schema.get("type")
    if isinstance(kind, list):
        return _union(annotation({**schema, "type": k}) for k in kind)
    if kind == "array":
        items = schema.get("items")
        return f"list[{annotation(items)}]" if isinstance(items, Mapping) else "list[Any]"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping) and not schema.get("properties"):
            return f"dict[str, {annotation(extra)}]"
        return "dict[str, Any]"
    if isinstance(kind, str):
        return _JSON_TYPES.get(kind, "Any")
    return "Any"


def _union(parts: Any) -> str:
    seen: list[str] = []
    for part in parts:
        if part not in seen:
            seen.append(part)
    return "Any" if "Any" in seen else " | ".join(seen)


@dataclass(frozen=True)
class Param:
    python: str
    json: str
    annotation: str
    required: bool
    default: Any
    has_default: bool
    description: str


@dataclass(frozen=True)
class ToolStubSpec:
    """One MCP tool as Python: its name, parameters, signature and docstring."""

    name: str
    """The Python name (``get_sum``)."""
    mcp_name: str
    """The tool's name on the server (``get-sum``)."""
    params: tuple[Param, ...]
    signature: str
    doc: str
    input_schema: Mapping[str, Any]

    @property
    def positional(self) -> tuple[str, ...]:
        return tuple(p.python for p in self.params)

    def arguments(
        self, label: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The MCP arguments of a Python call: bound by name, checked against
        the inputSchema. Raises ToolArgumentError naming the parameter."""
        if len(args) > len(self.params):
            raise ToolArgumentError(
                f"{label}{self.signature}: takes {len(self.params)} arguments, "
                f"{len(args)} were given"
            )
        bound: dict[str, Any] = dict(zip(self.positional, args, strict=False))
        by_python = {p.python: p for p in self.params}
        for key, value in kwargs.items():
            if key not in by_python:
                known = ", ".join(self.positional) or "none"
                raise ToolArgumentError(
                    f"{label}{self.signature}: unexpected parameter {key!r} (parameters: {known})"
                )
            if key in bound:
                raise ToolArgumentError(f"{label}: parameter {key!r} given twice")
            bound[key] = value
        out: dict[str, Any] = {}
        for param in self.params:
            if param.python not in bound:
                continue
            value = bound[param.python]
            if value is None and not param.required:
                continue  # None stands for "not given" for an optional parameter
            out[param.json] = value
        json_names = {p.json: p.python for p in self.params}
        validator_class = jsonschema.validators.validator_for(
            self.input_schema, default=jsonschema.Draft202012Validator
        )
        errors = sorted(
            validator_class(dict(self.input_schema)).iter_errors(out),
            key=lambda e: [str(p) for p in e.absolute_path],
        )
        if errors:
            raise ToolArgumentError(
                f"{label}: " + "; ".join(_explain(e, json_names) for e in errors[:5])
            )
        return out


def _explain(error: jsonschema.ValidationError, names: Mapping[str, str]) -> str:
    path = list(error.absolute_path)
    if path and isinstance(path[0], str):
        path[0] = names.get(path[0], path[0])
        where = path[0] + "".join(f"[{p!r}]" for p in path[1:])
        return f"parameter {where!r}: {error.message}"
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        if missing:
            return f"parameter {names.get(missing[0], missing[0])!r} is required"
    return error.message


def _params(schema: Mapping[str, Any]) -> tuple[Param, ...]:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return ()
    required = set(schema.get("required") or ())
    params: list[Param] = []
    taken: set[str] = set()
    for json_name, given in properties.items():
        python = python_name(str(json_name))
        while python in taken:
            python += "_"
        taken.add(python)
        sub = given if isinstance(given, Mapping) else {}
        has_default = "default" in sub and _literal(sub["default"])
        params.append(
            Param(
                python=python,
                json=str(json_name),
                annotation=annotation(sub),
                required=json_name in required,
                default=sub.get("default"),
                has_default=has_default,
                description=str(sub.get("description") or "").strip(),
            )
        )
    # Python wants the required parameters first; each group keeps the schema's order.
    return tuple(p for p in params if p.required) + tuple(p for p in params if not p.required)


def _literal(value: Any) -> bool:
    """Whether ``repr(value)`` is Python source for it (JSON values are)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _signature(params: Sequence[Param], returns: str) -> str:
    parts = []
    for p in params:
        if p.required:
            parts.append(f"{p.python}: {p.annotation}")
        elif p.has_default:
            parts.append(f"{p.python}: {p.annotation} = {p.default!r}")
        else:
            kind = p.annotation if "None" in p.annotation.split(" | ") else f"{p.annotation} | None"
            parts.append(f"{p.python}: {kind} = None")
    return f"({', '.join(parts)}) -> {returns}"


def stub_for(
    name: str,
    description: str | None,
    input_schema: Mapping[str, Any] | None,
    output_schema: Mapping[str, Any] | None,
    *,
    python: str | None = None,
) -> ToolStubSpec:
    """The Python face of one MCP tool."""
    schema = dict(input_schema or {"type": "object"})
    params = _params(schema)
    if output_schema:
        returns = annotation(output_schema)
        shown = json.dumps(output_schema, separators=(",", ":"), sort_keys=True)
        if len(shown) > _MAX_SCHEMA_DOC:
            shown = shown[:_MAX_SCHEMA_DOC] + " ...(cut)"
        returned = f"Returns: data matching this JSON Schema: {shown}"
    else:
        returns = "Any"
        returned = ""
    lines = [(description or "").strip()]
    described = [p for p in params if p.description]
    if described:
        lines.append("Args:\n" + "\n".join(f"    {p.python}: {p.description}" for p in described))
    lines.append(returned)
    doc = "\n\n".join(line for line in lines if line)
    return ToolStubSpec(
        name=python or python_name(name),
        mcp_name=name,
        params=params,
        signature=_signature(params, returns),
        doc=doc,
        input_schema=schema,
    )
