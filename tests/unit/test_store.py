"""Conversation stores: what is saved comes back, in memory and in SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

import legion
from legion.store import ConversationRecord, ConversationStore, MemoryStore, SQLiteStore

RECORD = ConversationRecord(
    id="c1",
    agent="Keeper",
    messages=({"role": "system", "content": "hi"}, {"role": "user", "content": "ünïcode"}),
    turns=1,
    snapshot=b"\x00\x01opaque\xff",
    skipped={"square": "a function defined in sandbox code"},
    meta={"principal": "alice", "config": {"max_iterations": 3}},
)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ConversationStore:
    return MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "c.db")


async def test_a_saved_record_comes_back(store: ConversationStore) -> None:
    assert isinstance(store, ConversationStore)
    assert await store.load("c1") is None
    await store.save(RECORD)
    loaded = await store.load("c1")
    assert loaded is not None
    assert (loaded.id, loaded.agent, loaded.turns, loaded.snapshot) == (
        "c1",
        "Keeper",
        1,
        RECORD.snapshot,
    )
    assert [dict(m) for m in loaded.messages] == [dict(m) for m in RECORD.messages]
    assert dict(loaded.skipped) == dict(RECORD.skipped)
    assert dict(loaded.meta) == dict(RECORD.meta)
    assert loaded.updated_at >= RECORD.updated_at
    assert [r.id for r in await store.list()] == ["c1"]
    await store.delete("c1")
    assert await store.load("c1") is None


async def test_sqlite_keeps_records_across_store_objects(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "c.db")
    await first.save(RECORD)
    first.close()
    loaded = await SQLiteStore(tmp_path / "c.db").load("c1")
    assert loaded is not None and loaded.snapshot == RECORD.snapshot and loaded.turns == 1


def test_an_unusable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(legion.UsageError, match="cannot open the conversation store"):
        SQLiteStore(tmp_path / "file" / "c.db")
