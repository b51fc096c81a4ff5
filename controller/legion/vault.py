"""The caller's auth context, visible to tools and never to sandbox code.

Bind values around a run; tools read them while serving a call that sandbox
code made on that caller's behalf. Nothing in the vault is ever sent to a
container: the sandbox only holds stubs that ask the controller.

    >>> from legion import vault
    >>> with vault.bind(user_id=42):
    ...     vault.get("user_id")
    42

It is a :mod:`contextvars` mapping, so concurrent runs (tasks, threads started
through ``contextvars.copy_context``) each see their own values.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from .errors import VaultKeyError

__all__ = ["bind", "current", "get", "require"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_values: ContextVar[Mapping[str, Any]] = ContextVar("legion_vault", default=_EMPTY)
_MISSING: Any = object()


def current() -> Mapping[str, Any]:
    """The values bound in this context (read-only)."""
    return _values.get()


def get(key: str, default: Any = None) -> Any:
    """The value bound to ``key``, or ``default``."""
    return _values.get().get(key, default)


def require(key: str) -> Any:
    """The value bound to ``key``; raises :class:`legion.VaultKeyError` when unbound."""
    value = _values.get().get(key, _MISSING)
    if value is _MISSING:
        raise VaultKeyError(
            f"vault key {key!r} is not bound; bind it around the run, e.g. "
            f"`with legion.vault.bind({key}=...)` or `Sandbox(vault={{...}})`"
        )
    return value


@contextmanager
def bind(values: Mapping[str, Any] | None = None, /, **more: Any) -> Iterator[Mapping[str, Any]]:
    """Bind values on top of the current ones for the duration of the block."""
    merged = MappingProxyType({**_values.get(), **(values or {}), **more})
    token = _values.set(merged)
    try:
        yield merged
    finally:
        _values.reset(token)


def _overlay(values: Mapping[str, Any]) -> None:
    """Set ``values`` over the current ones in this context (no reset: for a
    context copy made to serve one run)."""
    _values.set(MappingProxyType({**_values.get(), **values}))
