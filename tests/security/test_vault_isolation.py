"""A secret in the vault is used by a host tool during an agent run, and is
then looked for in the live container: its configuration and environment,
its files, and every readable page of the runner's memory. The search runs on
the host, so the probe itself never carries the secret into the sandbox."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import docker
import pytest

import legion
from legion.testing import ScriptedModel, action

pytestmark = pytest.mark.docker

SECRET = "sk-live-7c1f9a3e-planted-vault-secret"


class Payments(legion.Tool):
    """Charges cards through the payment provider."""

    def charge(self, cents: int) -> str:
        """Charge the current customer; returns a receipt id."""
        key = legion.vault.require("provider_key")
        assert key == SECRET
        return f"receipt-{cents}-{len(key)}"


class Cashier(legion.Agent):
    """Charges customers."""

    tools = [Payments]


def _runner_pids(client: docker.DockerClient, container_id: str) -> list[int]:
    init = client.api.inspect_container(container_id)["State"]["Pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    return [init, *map(int, children)]


def _memory_hits(pid: int, needle: bytes) -> list[str]:
    hits = []
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            addresses, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(a, 16) for a in addresses.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue  # e.g. [vvar]: not readable through /proc/pid/mem
            if needle in chunk:
                hits.append(line)
    return hits


def _file_hits(client: docker.DockerClient, container_id: str, needle: bytes) -> list[str]:
    hits = []
    for root in ("/tmp", "/run/legion", "/opt/legion"):
        stream, _ = client.api.get_archive(container_id, root)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            for member in archive.getmembers():
                data = archive.extractfile(member) if member.isfile() else None
                if data is not None and needle in data.read():
                    hits.append(member.name)
    upper = client.api.inspect_container(container_id)["GraphDriver"]["Data"].get("UpperDir")
    if upper and os.path.isdir(upper):
        for dirpath, _, files in os.walk(upper):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and needle in Path(path).read_bytes():
                    hits.append(path)
    return hits


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a container's memory needs root")
async def test_vault_secret_never_reaches_the_container(
    docker_ready: None, docker_client: docker.DockerClient
) -> None:
    needle = SECRET.encode()
    findings: dict[str, list[str]] = {}

    def inspect_live_container(messages: list[dict[str, str]]) -> str:
        # Runs between two agent steps, while the sandbox is alive.
        [container_id] = runtime.live_containers
        config = docker_client.api.inspect_container(container_id)
        findings["config"] = [
            k for k in ("Config", "HostConfig", "Mounts") if SECRET in repr(config.get(k))
        ]
        pids = _runner_pids(docker_client, container_id)
        assert len(pids) == 2, "expected docker-init and the runner"
        findings["environ"] = [
            str(p) for p in pids if needle in Path(f"/proc/{p}/environ").read_bytes()
        ]
        findings["memory"] = [f"{p}: {hit}" for p in pids for hit in _memory_hits(p, needle)]
        # Control: the same scan finds what the sandbox does hold (the receipt).
        receipt = f"receipt-250-{len(SECRET)}".encode()
        findings["control"] = [str(p) for p in pids if _memory_hits(p, receipt)]
        findings["files"] = _file_hits(docker_client, container_id, needle)
        findings["checked_runner_memory_bytes"] = [
            str(
                sum(
                    int(b, 16) - int(a, 16)
                    for a, b in (
                        line.split()[0].split("-")
                        for line in Path(f"/proc/{pids[1]}/maps").read_text().splitlines()
                    )
                )
            )
        ]
        return action(
            "return", result=re.search(r"receipt-\d+-\d+", messages[-1]["content"]).group(0)
        )  # type: ignore[union-attr]

    async with legion.SandboxRuntime(pool_size=0) as runtime:
        model = ScriptedModel(
            [
                action("eval_and_continue", "receipt = Payments.charge(250)\nreceipt"),
                inspect_live_container,
            ]
        )
        result = await legion.run(
            Cashier, "charge 2.50", model=model, runtime=runtime, vault={"provider_key": SECRET}
        )
    assert result.output == f"receipt-250-{len(SECRET)}"  # the tool did use the secret
    assert int(findings.pop("checked_runner_memory_bytes")[0]) > 10_000_000
    assert findings.pop("control"), "the memory scan should find the receipt the sandbox holds"
    assert findings == {"config": [], "environ": [], "memory": [], "files": []}
