"""Where long-lived agents keep their conversations.

A :class:`ConversationStore` saves a conversation's messages and its binding
snapshot (an opaque blob made and only ever unpickled inside a sandbox) after
every turn, so ``legion.start(Agent, conversation_id=...)`` can resume it, in
this process or after a restart.

- :class:`MemoryStore`: the default for embedded use; gone with the process.
- :class:`SQLiteStore`: one file; the default for ``legion serve``.

Another store (PostgreSQL, Redis...) implements the same four coroutines.

Both also keep what each principal of ``legion serve`` spent per UTC day
(:class:`UsageStore`: ``load_usage`` and ``save_usage``), so the principals'
daily budgets count across a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ._results import Usage
from .errors import UsageError

__all__ = [
    "ConversationRecord",
    "ConversationStore",
    "MemoryStore",
    "SQLiteStore",
    "UsageStore",
    "default_store_path",
]


def default_store_path() -> Path:
    """Where ``legion serve`` keeps conversations unless told otherwise:
    ``$XDG_STATE_HOME/legion/conversations.sqlite3`` (``~/.local/state/...``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "legion" / "conversations.sqlite3"


@dataclass(frozen=True)
class ConversationRecord:
    """A conversation as stored."""

    id: str
    agent: str
    """The agent class's name."""
    messages: tuple[Mapping[str, str], ...] = ()
    """System prompt first, then every finished turn."""
    turns: int = 0
    snapshot: bytes | None = field(default=None, repr=False)
    """The bindings of ``conversation`` scope (opaque; None when there are none)."""
    skipped: Mapping[str, str] = field(default_factory=dict)
    """Bindings the snapshot could not hold: name -> why."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Whatever the owner of the conversation keeps with it (JSON values):
    ``legion serve`` records the principal and the config overrides here."""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@runtime_checkable
class ConversationStore(Protocol):
    durable: bool
    """True when saved conversations outlive the process (then a long-lived
    agent snapshots its bindings after every turn, not only when idle)."""

    async def load(self, conversation_id: str) -> ConversationRecord | None: ...

    async def save(self, record: ConversationRecord) -> None: ...

    async def delete(self, conversation_id: str) -> None: ...

    async def list(self) -> list[ConversationRecord]: ...


@runtime_checkable
class UsageStore(Protocol):
    """What each principal spent per UTC day (``YYYY-MM-DD``), for the daily budgets."""

    async def load_usage(self, principal: str, day: str) -> Usage:
        """That day's total (an empty Usage when nothing is stored)."""
        ...

    async def save_usage(self, principal: str, day: str, usage: Usage) -> None:
        """Replace that day's total."""
        ...


class MemoryStore:
    """Conversations (and principals' usage) in dicts of this process."""

    durable = False

    def __init__(self) -> None:
        self._records: dict[str, ConversationRecord] = {}
        self._usage: dict[tuple[str, str], Usage] = {}

    async def load_usage(self, principal: str, day: str) -> Usage:
        return self._usage.get((principal, day), Usage())

    async def save_usage(self, principal: str, day: str, usage: Usage) -> None:
        self._usage[(principal, day)] = usage

    async def load(self, conversation_id: str) -> ConversationRecord | None:
        return self._records.get(conversation_id)

    async def save(self, record: ConversationRecord) -> None:
        self._records[record.id] = replace(record, updated_at=time.time())

    async def delete(self, conversation_id: str) -> None:
        self._records.pop(conversation_id, None)

    async def list(self) -> list[ConversationRecord]:
        return sorted(self._records.values(), key=lambda r: r.created_at)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    messages TEXT NOT NULL,
    turns INTEGER NOT NULL,
    snapshot BLOB,
    skipped TEXT NOT NULL,
    meta TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""
_COLUMNS = "id, agent, messages, turns, snapshot, skipped, meta, created_at, updated_at"
_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS principal_usage (
    principal TEXT NOT NULL,
    day TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    cost_usd REAL,
    requests INTEGER NOT NULL,
    tool_calls INTEGER NOT NULL,
    sandbox_seconds REAL NOT NULL,
    PRIMARY KEY (principal, day)
)
"""
_USAGE_COLUMNS = (
    "prompt_tokens, completion_tokens, total_tokens, cost_usd, requests, tool_calls, "
    "sandbox_seconds"
)


class SQLiteStore:
    """Conversations in one SQLite file (WAL mode; safe for one process).

    Calls run in a worker thread, so a slow disk never blocks the event loop.
    """

    durable = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
            self._db.execute(_USAGE_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"cannot open the conversation store {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    async def load(self, conversation_id: str) -> ConversationRecord | None:
        rows = await asyncio.to_thread(
            self._run, f"SELECT {_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
        )
        return _record(rows[0]) if rows else None

    async def save(self, record: ConversationRecord) -> None:
        await asyncio.to_thread(
            self._run,
            f"INSERT OR REPLACE INTO conversations ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                record.id,
                record.agent,
                json.dumps([dict(m) for m in record.messages]),
                record.turns,
                record.snapshot,
                json.dumps(dict(record.skipped)),
                json.dumps(dict(record.meta)),
                record.created_at,
                time.time(),
            ),
        )

    async def delete(self, conversation_id: str) -> None:
        await asyncio.to_thread(
            self._run, "DELETE FROM conversations WHERE id = ?", (conversation_id,)
        )

    async def list(self) -> list[ConversationRecord]:
        rows = await asyncio.to_thread(
            self._run, f"SELECT {_COLUMNS} FROM conversations ORDER BY created_at"
        )
        return [_record(r) for r in rows]

    async def load_usage(self, principal: str, day: str) -> Usage:
        rows = await asyncio.to_thread(
            self._run,
            f"SELECT {_USAGE_COLUMNS} FROM principal_usage WHERE principal = ? AND day = ?",
            (principal, day),
        )
        return Usage(*rows[0]) if rows else Usage()

    async def save_usage(self, principal: str, day: str, usage: Usage) -> None:
        await asyncio.to_thread(
            self._run,
            f"INSERT OR REPLACE INTO principal_usage (principal, day, {_USAGE_COLUMNS}) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (
                principal,
                day,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                usage.cost_usd,
                usage.requests,
                usage.tool_calls,
                usage.sandbox_seconds,
            ),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple[Any, ...]) -> ConversationRecord:
    cid, agent, messages, turns, snapshot, skipped, meta, created, updated = row
    return ConversationRecord(
        id=cid,
        agent=agent,
        messages=tuple(json.loads(messages)),
        turns=turns,
        snapshot=snapshot,
        skipped=json.loads(skipped),
        meta=json.loads(meta),
        created_at=created,
        updated_at=updated,
    )
