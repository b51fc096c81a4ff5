"""Files in and out of a sandbox: ``sandbox.files``.

Every sandbox has one writable work directory, ``/data`` (a tmpfs of
``SandboxLimits.files_mb``, no-exec), which is also its current directory.
Code leaves files for the caller in ``/data/out/``. Paths are checked here,
before anything is sent: they must stay inside the work directory (relative,
or absolute under ``/data``; no ``..``, no NUL). The runner then walks each
path without following links, so a link made by sandbox code is refused, not
followed. Contents cross the channel in pieces, so no message limit caps a
file; ``files_mb`` does, enforced by the tmpfs and checked here first.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._proto import sandbox_pb2 as pb
from ..config import MiB
from ..errors import SandboxFileError

if TYPE_CHECKING:
    from .session import Sandbox

WORK_DIR = "/data"
OUT_DIR = "out"
"""Below the work directory: where code leaves files for the caller."""
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FileInfo:
    """One entry of :meth:`SandboxFiles.list`."""

    path: str
    """Relative to the work directory (``out/summary.csv``)."""
    size: int
    is_dir: bool = False
    is_symlink: bool = False
    """A link made by sandbox code: listed, never followed."""


def work_path(path: str, *, allow_root: bool = False) -> str:
    """``path`` relative to the work directory, or SandboxFileError.

    Accepts ``sales.csv``, ``out/x.csv``, ``./x`` and ``/data/x``; refuses
    ``..``, NUL bytes, and absolute paths elsewhere."""
    if not isinstance(path, str):
        raise TypeError(f"a path must be a str, not {type(path).__name__}")
    if "\0" in path:
        raise SandboxFileError(f"{path!r}: a path may not hold a NUL byte", kind="bad_path")
    if path.startswith("/"):
        if path != WORK_DIR and not path.startswith(WORK_DIR + "/"):
            raise SandboxFileError(
                f"{path}: only files in the work directory ({WORK_DIR}) can be reached",
                kind="bad_path",
                path=path,
            )
        path = path[len(WORK_DIR) :].lstrip("/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SandboxFileError(
            f"{path}: '..' may not appear in a path; name files inside {WORK_DIR}",
            kind="bad_path",
            path=path,
        )
    relative = "/".join(parts)
    if not relative and not allow_root:
        raise SandboxFileError(
            f"{path!r} names the work directory itself, not a file", kind="bad_path", path=path
        )
    return relative


def out_name(path: str) -> str | None:
    """The name of ``path`` (relative to the work directory) below ``out/``."""
    if not path.startswith(OUT_DIR + "/"):
        return None
    return posixpath.relpath(path, OUT_DIR)


class SandboxFiles:
    """The work directory of one :class:`legion.Sandbox`, from the host.

    >>> await sandbox.files.write("sales.csv", csv_bytes)
    >>> await sandbox.run("import pandas as pd\\npd.read_csv('sales.csv').shape")
    >>> await sandbox.files.read("out/summary.csv")

    Each call waits for a running ``run`` to end (they take turns), and raises
    :class:`legion.SandboxFileError` when it fails; the sandbox goes on working.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def _quota(self) -> int:
        return self._sandbox.limits.files_mb * MiB

    async def write(self, path: str, data: bytes | str, *, timeout: float | None = None) -> None:
        """Write ``data`` (str is UTF-8) to ``path``, making its directories.
        The file appears whole, or not at all: it is written under a new name
        and renamed over any old one, so replacing a file needs room for
        both in ``files_mb``."""
        relative = work_path(path)
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        body = bytes(data)
        if len(body) > self._quota():
            raise SandboxFileError(
                f"{relative}: {len(body)} bytes is more than the work directory holds "
                f"(files_mb={self._sandbox.limits.files_mb})",
                kind="no_space",
                path=relative,
            )

        def requests(chunk: int, request_id: str) -> list[pb.FileRequest]:
            starts = range(0, len(body), chunk) if body else range(1)
            return [
                pb.FileRequest(
                    request_id=request_id,
                    op=pb.FILE_WRITE,
                    path=relative,
                    chunk=body[start : start + chunk],
                    last=start + chunk >= len(body),
                )
                for start in starts
            ]

        await self._sandbox._file_exchange(requests, relative, timeout, limit=0)

    async def read(
        self, path: str, *, max_bytes: int | None = None, timeout: float | None = None
    ) -> bytes:
        """The bytes of the file at ``path`` (at most ``max_bytes``, by default
        what the work directory holds)."""
        relative = work_path(path)
        limit = self._quota() if max_bytes is None else max_bytes

        def requests(chunk: int, request_id: str) -> list[pb.FileRequest]:
            return [
                pb.FileRequest(
                    request_id=request_id, op=pb.FILE_READ, path=relative, max_bytes=limit
                )
            ]

        reply = await self._sandbox._file_exchange(requests, relative, timeout, limit=limit)
        return bytes(reply.data)

    async def list(
        self, path: str = "", *, recursive: bool = False, timeout: float | None = None
    ) -> list[FileInfo]:
        """The entries of the directory ``path`` ("" : the work directory)."""
        relative = work_path(path, allow_root=True)

        def requests(chunk: int, request_id: str) -> list[pb.FileRequest]:
            return [
                pb.FileRequest(
                    request_id=request_id, op=pb.FILE_LIST, path=relative, recursive=recursive
                )
            ]

        reply = await self._sandbox._file_exchange(requests, relative or ".", timeout, limit=0)
        return reply.entries

    async def remove(
        self, path: str, *, recursive: bool = False, timeout: float | None = None
    ) -> None:
        """Remove a file, a link (never its target), or a directory (empty,
        unless ``recursive``)."""
        relative = work_path(path)

        def requests(chunk: int, request_id: str) -> list[pb.FileRequest]:
            return [
                pb.FileRequest(
                    request_id=request_id, op=pb.FILE_REMOVE, path=relative, recursive=recursive
                )
            ]

        await self._sandbox._file_exchange(requests, relative, timeout, limit=0)
