"""The system prompt: how the agent works, the sandbox's rules, who it is,
its tools (with their source) and the shape of its answer.

Deterministic for the same agent and config, so it can be read, diffed and
cached: ``legion prompt module:AgentClass`` prints it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._loop import ACTIONS
from .config import AgentConfig, SandboxLimits

if TYPE_CHECKING:
    from .agent import AgentDefinition
    from .sandbox.backend import Package

_SCOPES = {
    "iteration": "Each step starts with an empty namespace: variables do NOT survive from one "
    "step to the next. Recompute or re-fetch what you need in every step.",
    "turn": "Variables, functions and imports you define persist from step to step for the "
    "whole task: reuse them instead of recomputing.",
    "conversation": "Variables, functions and imports you define persist across steps and "
    "across the messages of this conversation.",
}


def output_contract(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "Your final answer is plain text: a string."
    return (
        "Your final answer must be JSON matching this JSON Schema:\n```json\n"
        + json.dumps(schema, indent=2, sort_keys=True)
        + "\n```"
    )


def environment_line(packages: Sequence[Package]) -> str:
    """What the sandbox's Python has: the standard library, and the packages
    of its environment image (with their import names where those differ)."""
    if not packages:
        return "Python 3.11 with the standard library only; nothing can be installed."
    shown = []
    for package in packages:
        plain = package.name.lower().replace("-", "_")
        imports = "" if plain in package.modules else f" (import {', '.join(package.modules)})"
        shown.append(f"{package.name} {package.version}{imports}")
    return (
        "Python 3.11 with the standard library and these packages: "
        f"{', '.join(shown)}. Nothing else can be installed."
    )


def build_system_prompt(
    definition: AgentDefinition, config: AgentConfig, *, packages: Sequence[Package] = ()
) -> str:
    """The prompt of ``definition`` run with ``config``, in a sandbox whose
    image has ``packages`` beyond the standard library."""
    if definition.system_prompt is not None:
        return definition.system_prompt
    limits = config.sandbox_limits or SandboxLimits()
    actions = "\n".join(f"- `{a}`: {ACTIONS[a].description}" for a in definition.action_types)
    example = '{"action": "eval_and_continue", "code": "rows = Store.search(\\"x\\")\\nlen(rows)"}'
    parts = [
        f"You are {definition.name}. {definition.doc}",
        "## How you work\n"
        "You solve the task by writing Python code that runs in a sandbox. Reply with exactly "
        "one JSON object and nothing else:\n"
        '{"action": "<action>", "code": "<python>", "result": <answer>}\n'
        f"Actions:\n{actions}\n"
        f"Example: {example}\n"
        "Prefer code over many small steps: one step can call several tools, loop, filter and "
        "decide. The value of the code's last expression is what you see (or return).",
        "## The sandbox\n"
        f"- {environment_line(packages)}\n"
        "- No network: the only way out is the tools below.\n"
        f"- Each step may run {config.sandbox_timeout:g} s and use {limits.memory_mb} MiB of "
        "memory; the filesystem is read-only except /tmp.\n"
        f"- Output over {limits.output_limit_bytes // 1024} KiB per stream is cut; print "
        "summaries, not bulk data.\n"
        f"- {_SCOPES[config.binding_scope]}",
    ]
    if definition.tools:
        tool_parts = [
            "## Tools\n"
            "Tools are objects already in your namespace; call them directly, e.g. "
            "`Tool.function(arg)` (or `function(arg)` for a plain-function tool). Arguments and "
            "results are JSON values (str, int, float, bool, None, list, dict). A failed call "
            "raises an exception named after the tool's error (catch it, or `ToolError` for "
            "any). Tools run outside the sandbox on your behalf.\n"
            "Many calls at once, without threads: `Tool.function.map(items)` calls it once per "
            "item concurrently and returns the results in order (one failure raises after all "
            "ran; `return_exceptions=True` keeps each error in its item's place), and async code "
            "can `await asyncio.gather(*(Tool.afunction(x) for x in items))` (`function.aio(x)` "
            "for a plain-function tool)."
        ]
        for tool in definition.tools:
            tool_parts.append(f"### {tool.name}\n```python\n{tool.source}\n```")
        parts.append("\n\n".join(tool_parts))
    parts.append("## Your answer\n" + output_contract(definition.output_json_schema))
    if definition.extra_instructions:
        parts.append("## Instructions\n" + definition.extra_instructions.strip())
    return "\n\n".join(parts) + "\n"
