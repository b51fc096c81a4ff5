"""One helper for the context variables that carry a run's state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def bound(var: ContextVar[T], value: T) -> Iterator[T]:
    """Set ``var`` to ``value`` for the block, then put the old value back."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
