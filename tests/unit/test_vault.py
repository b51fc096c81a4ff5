import asyncio

import pytest

import legion
from legion import vault


def test_bind_nests_and_restores() -> None:
    assert vault.get("user") is None
    with vault.bind(user="a", org="x"):
        with vault.bind({"user": "b"}):
            assert vault.current() == {"user": "b", "org": "x"}
        assert vault.get("user") == "a"
    assert vault.current() == {}


def test_require_names_the_missing_key() -> None:
    with pytest.raises(legion.VaultKeyError, match="'token' is not bound"):
        vault.require("token")


def test_current_is_read_only() -> None:
    with vault.bind(user="a"), pytest.raises(TypeError):
        vault.current()["user"] = "b"  # type: ignore[index]


async def test_concurrent_tasks_see_their_own_values() -> None:
    async def run(name: str) -> str:
        with vault.bind(user=name):
            await asyncio.sleep(0.01)
            return str(vault.get("user"))

    assert await asyncio.gather(run("a"), run("b"), run("c")) == ["a", "b", "c"]
