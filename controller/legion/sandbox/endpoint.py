"""How a runner reaches the controller: the channel endpoint.

The runtime owns one endpoint; a backend receives it and translates it into
its own terms (a bind mount for Docker, a volume and a network policy for a
pod). The runner learns where to dial, and its one-time token, from a *boot
file* the endpoint writes for each sandbox. The file is removed as soon as the
runner has said Hello, before any code runs, so the token is in no file and in
no process's environment while sandbox code runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

SOCKET_NAME = "legion.sock"
SANDBOX_MOUNT = "/run/legion"
"""Where the endpoint's directory appears inside a Docker sandbox."""


@dataclass(frozen=True)
class BootFile:
    """One sandbox's boot data, written on the host, read once by its runner."""

    host_path: Path
    sandbox_path: str
    """The same file as the runner sees it (its only command-line argument)."""

    def discard(self) -> None:
        """Remove it (idempotent). Done at Hello, and when a start fails."""
        with contextlib.suppress(FileNotFoundError):
            self.host_path.unlink()


@runtime_checkable
class ChannelEndpoint(Protocol):
    """Where runners dial in, and how each gets its boot file."""

    def runner_address(self) -> str:
        """The gRPC target the runner dials (``unix:///...``, later ``dns:...``)."""
        ...

    def write_boot(self, *, token: str, max_message_bytes: int) -> BootFile:
        """Write one sandbox's boot data where only that sandbox will look."""
        ...


@dataclass(frozen=True)
class UnixSocketEndpoint:
    """A Unix socket in a host directory that each sandbox mounts read-only.

    The directory is ``0711``: the sandbox's unprivileged user can reach the
    socket and open a file whose name it knows, but cannot list the
    directory. Each boot file has a random name, so a sandbox cannot find
    another's while it starts.
    """

    directory: Path
    """The host directory holding the socket and the boot files."""
    mount_path: str = SANDBOX_MOUNT

    @property
    def socket_path(self) -> Path:
        return self.directory / SOCKET_NAME

    def runner_address(self) -> str:
        return f"unix://{self.mount_path}/{SOCKET_NAME}"

    def write_boot(self, *, token: str, max_message_bytes: int) -> BootFile:
        name = f"boot-{secrets.token_urlsafe(24)}.json"
        host_path = self.directory / name
        data = json.dumps(
            {
                "token": token,
                "address": self.runner_address(),
                "max_message_bytes": max_message_bytes,
            }
        ).encode()
        # Readable by the sandbox's user (not the file's owner); O_EXCL: never
        # write through something already there.
        fd = os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            os.fchmod(fd, 0o444)  # whatever the umask
            os.write(fd, data)
        finally:
            os.close(fd)
        return BootFile(host_path, f"{self.mount_path}/{name}")
