"""What a run produces: its answer (:class:`RunResult`) and what it used (:class:`Usage`).

Embedded runs and a controller's clients return the same objects, so this
module imports nothing but the standard library: the client needs these
types without the agent machinery, the sandbox layer or the model adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunResult", "Usage"]


@dataclass(frozen=True)
class Usage:
    """What a run used: tokens (and cost in USD, when litellm knows the
    model's price), model requests, tool calls made by its code, and the wall
    time its code steps ran in the sandbox."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float | None = None
    requests: int = 0
    tool_calls: int = 0
    """Tool calls its sandbox code made (each one that reached the host)."""
    sandbox_seconds: float = 0.0
    """Wall time of its code steps, from sending the code to the result."""

    def __add__(self, other: Usage) -> Usage:
        cost = None
        if self.cost_usd is not None or other.cost_usd is not None:
            cost = (self.cost_usd or 0.0) + (other.cost_usd or 0.0)
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            cost,
            self.requests + other.requests,
            self.tool_calls + other.tool_calls,
            self.sandbox_seconds + other.sandbox_seconds,
        )


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    output: Any
    """The answer: a string, JSON data matching ``output_schema``, a pydantic
    model instance, or None for ``done``."""
    iterations: int
    """Successful ``eval_and_continue`` steps taken."""
    usage: Usage
    run_id: str
    messages: list[dict[str, str]] = field(repr=False)
    """The whole conversation with the model, system prompt first."""
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    """Files the code left in ``/data/out`` (name below ``out/`` -> bytes),
    at most 64 files and 32 MiB together."""
    files_note: str = ""
    """What of ``/data/out`` was not returned, and why ("" when nothing)."""
