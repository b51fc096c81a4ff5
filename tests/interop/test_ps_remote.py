"""`legion ps --remote` asks a running `legion serve` for the caller's live
sandboxes: here, the one whose run waits for a person's answer."""

from __future__ import annotations

import json
import os
import subprocess

import grpc
import pytest

from legion._proto import controller_pb2 as pb
from legion._proto import controller_pb2_grpc as pb_grpc

from .conftest import Served, legion_cli

pytestmark = pytest.mark.docker


def ps(address: str, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEGION_SERVER_TOKEN": token}
    return legion_cli("ps", "--remote", address, *args, env=env)


def test_ps_remote_shows_the_sandbox_of_a_waiting_run(served: Served) -> None:
    alice = served.tokens.alice
    auth = [("authorization", f"Bearer {alice}")]
    task = "#code Human.ask('Ship it?')"
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        updates = stub.Run(pb.RunRequest(agent="Coder", task=task), metadata=auth)
        try:
            for update in updates:
                if update.WhichOneof("kind") == "event" and update.event.name == "human.request":
                    break
            else:
                pytest.fail("the run ended without asking its question")
            run_id = update.event.run_id
            ref = json.loads(update.event.data_json)["ref"]

            listed = ps(served.address, "--json", token=alice)
            table = ps(served.address, token=alice)
            others = ps(served.address, "--json", token=served.tokens.bob)
            refused = ps(served.address, token="not-a-valid-token")

            stub.RespondHuman(pb.RespondHumanRequest(ref=ref, answer_json='"yes"'), metadata=auth)
            kinds = [u.WhichOneof("kind") for u in updates]
        finally:
            updates.cancel()
    assert kinds[-1] == "result"

    assert listed.returncode == 0, listed.stderr
    (sandbox,) = json.loads(listed.stdout)
    assert sandbox["run_id"] == run_id and sandbox["agent"] == "Coder"
    assert sandbox["memory_bytes"] > 2**20 and sandbox["age_seconds"] >= 0

    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["CONTAINER", "RUN", "AGENT", "AGE", "MEMORY"]
    assert row.split()[:3] == [sandbox["container_id"][:12], run_id, "Coder"]

    # Another principal's sandboxes are not shown to bob.
    assert others.returncode == 0, others.stderr
    assert json.loads(others.stdout) == []

    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr and "--token" in refused.stderr
