"""The default authenticator: token tables from a file and from LEGION_TOKENS."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import legion
from legion.server import Principal, TokenTable

TOML = """
["alice-token-0123456789"]
name = "alice"
max_concurrent_runs = 2
vault = { user = "alice", tenant = 7 }

["bob-token-0123456789"]
name = "bob"
"""


async def test_a_toml_file_maps_tokens_to_principals(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(TOML)
    table = TokenTable.from_file(path)
    alice = await table.authenticate("alice-token-0123456789")
    assert alice == Principal("alice", {"user": "alice", "tenant": 7}, max_concurrent_runs=2)
    bob = await table.authenticate("bob-token-0123456789")
    assert bob is not None and bob.name == "bob" and dict(bob.vault) == {}
    assert bob.max_concurrent_runs is None
    for wrong in ("", "alice-token-012345678", "alice-token-0123456789 ", "ALICE-TOKEN-0123456789"):
        assert await table.authenticate(wrong) is None
    assert table.principals == ["alice", "bob"]


async def test_a_json_file_and_the_environment_add_up(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"json-token": "carol", "other": {"name": "dave", "vault": {"k": [1]}}}')
    table = TokenTable.load(path, {"LEGION_TOKENS": "erin=env-token, frank=env-token-2"})
    assert table is not None and len(table) == 4
    assert table.principals == ["carol", "dave", "erin", "frank"]
    erin = await table.authenticate("env-token")
    assert erin is not None and erin.name == "erin"
    dave = await table.authenticate("other")
    assert dave is not None and dict(dave.vault) == {"k": [1]}
    as_json = TokenTable.load(None, {"LEGION_TOKENS": '{"j-token": {"name": "gina"}}'})
    assert as_json is not None and as_json.principals == ["gina"]
    assert TokenTable.load(None, {}) is None
    assert TokenTable.load(None, {"LEGION_TOKENS": "  "}) is None


def test_only_digests_of_the_tokens_are_kept() -> None:
    token = "a-secret-token-that-must-not-stay-in-memory"
    table = TokenTable({token: Principal("alice")})
    kept = [digest for digest, _ in table._entries]
    assert kept == [hashlib.sha256(token.encode()).digest()]
    assert token not in repr(vars(table))


@pytest.mark.parametrize(
    ("content", "suffix", "problem"),
    [
        ("not = [toml", ".toml", "is not valid TOML"),
        ("{", ".json", "is not valid JSON"),
        ("[1, 2]", ".json", "must map each token to its principal"),
        ('{"t": 5}', ".json", "each token maps to a name or a table"),
        ('{"t": {"vault": {}}}', ".json", "needs a name"),
        ('{"t": {"name": "x", "role": "admin"}}', ".json", "unknown key(s) ['role']"),
        ('{"t": {"name": ""}}', ".json", "non-empty name"),
        ('{"t": {"name": "x", "max_concurrent_runs": 0}}', ".json", "at least 1"),
        ('{"t": {"name": "x", "vault": [1]}}', ".json", "vault must be a table"),
        ('{"has space": "x"}', ".json", "without spaces"),
    ],
)
def test_a_bad_token_file_says_what_is_wrong(
    tmp_path: Path, content: str, suffix: str, problem: str
) -> None:
    path = tmp_path / f"tokens{suffix}"
    path.write_text(content)
    with pytest.raises(legion.UsageError) as refused:
        TokenTable.from_file(path)
    assert problem in str(refused.value)


@pytest.mark.parametrize("value", ["alice", "alice=", "=token", "alice=t,bob", '{"t": 1'])
def test_a_bad_legion_tokens_says_how_to_write_it(value: str) -> None:
    with pytest.raises(legion.UsageError, match="LEGION_TOKENS"):
        TokenTable.from_env(value)


def test_a_missing_token_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(legion.UsageError, match="cannot read the token file"):
        TokenTable.from_file(tmp_path / "nope.toml")
