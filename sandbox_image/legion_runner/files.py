"""Files in the sandbox's work directory, for the controller's file requests.

Every path is walked from the work directory one component at a time with
``O_NOFOLLOW``: a symlink that sandbox code made (to ``/proc/self/environ``,
``/run/legion`` or the runner's own files) is refused, never followed, so a
caller that reads or writes ``out/x`` gets that file or an error, never
another one. The controller has already refused absolute paths, ``..`` and NUL
bytes; this is the second check, on the side that knows what is a link.

Writes go to a temporary name and are renamed into place at the last piece,
so a reader never sees half a file and a failed write leaves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from ._proto import sandbox_pb2 as pb

WORK_DIR = "/data"
OUT_DIR = "out"
_MAX_ENTRIES = 10_000


class FileProblem(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _problem(exc: OSError, path: str) -> FileProblem:
    code = exc.errno
    if code == errno.ENOENT:
        return FileProblem("not_found", f"{path}: no such file or directory")
    if code == errno.ELOOP:
        return FileProblem("symlink", f"{path}: a symbolic link; links are not followed")
    if code == errno.ENOTDIR:
        return FileProblem("not_a_dir", f"{path}: a part of the path is not a directory")
    if code == errno.EISDIR:
        return FileProblem("not_a_file", f"{path}: is a directory")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return FileProblem("no_space", f"{path}: the work directory is full (files_mb)")
    if code == errno.EFBIG:
        return FileProblem("too_large", f"{path}: larger than a file may be (fsize_mb)")
    if code == errno.EEXIST:
        return FileProblem("exists", f"{path}: already exists")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FileProblem("denied", f"{path}: permission denied")
    return FileProblem("failed", f"{path}: {os.strerror(code or 0)}")


def _parts(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or "\0" in path:
        raise FileProblem("bad_path", f"{path!r}: not a path inside the work directory")
    return parts


def _open_no_link(name: str, dir_fd: int, flags: int) -> int:
    """Open ``name`` in ``dir_fd`` unless it is a link. ``O_NOFOLLOW`` alone is
    not enough: with ``O_DIRECTORY``, gVisor follows a final link anyway. So
    look first (lstat), open, and check the opened file is the one looked at
    (a link swapped in meanwhile is caught by its device and inode)."""
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(before.st_mode):
        raise OSError(errno.ELOOP, "a symbolic link")
    fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise OSError(errno.ELOOP, "replaced by a link while being opened")
    return fd


def _open_dir(parts: list[str], *, create: bool = False) -> int:
    """A descriptor of the directory ``parts`` below the work directory,
    reached without following any link."""
    fd = os.open(WORK_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            flags = os.O_RDONLY | os.O_DIRECTORY
            try:
                inner = _open_no_link(part, fd, flags)
            except FileNotFoundError:
                if not create:
                    raise
                # Made meanwhile by sandbox code: opened below, links refused.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                inner = _open_no_link(part, fd, flags)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


_Write = tuple[int, int, str, str, "FileProblem | None"]
"""A write under way: directory fd, file fd, temporary name, name, problem."""


class WorkDir:
    """Serves FileRequests; ``send`` takes each FileReply."""

    def __init__(self, send: Callable[[pb.FileReply], None], budget: int) -> None:
        self._send = send
        self._budget = budget  # bytes of file data per reply message
        self._writes: dict[str, _Write] = {}

    @staticmethod
    def prepare() -> None:
        """Make ``out/``, where code leaves files for the caller."""
        # No work directory mounted: file requests will say so.
        with contextlib.suppress(OSError):
            os.makedirs(os.path.join(WORK_DIR, OUT_DIR), exist_ok=True)

    def handle(self, request: pb.FileRequest) -> None:
        try:
            if request.op == pb.FILE_WRITE:
                self._write(request)
                return
            if request.op == pb.FILE_READ:
                self._read(request)
            elif request.op == pb.FILE_LIST:
                self._list(request)
            elif request.op == pb.FILE_REMOVE:
                self._remove(request)
                self._reply(request.request_id)
            else:
                raise FileProblem("failed", f"unknown file operation {request.op}")
        except FileProblem as problem:
            self._reply(request.request_id, problem=problem)
        except OSError as exc:
            self._reply(request.request_id, problem=_problem(exc, request.path))

    def _reply(self, request_id: str, problem: FileProblem | None = None, **fields: Any) -> None:
        reply = pb.FileReply(request_id=request_id, last=True, **fields)
        if problem is not None:
            reply.error = str(problem)
            reply.error_kind = problem.kind
        self._send(reply)

    # write: pieces into a temporary file, renamed into place at the last ---------

    def _write(self, request: pb.FileRequest) -> None:
        state = self._writes.get(request.request_id)
        if state is None:
            state = self._begin_write(request)
        dir_fd, fd, temp, name, problem = state
        if problem is None:
            try:
                view = memoryview(request.chunk)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                problem = _problem(exc, request.path)
                self._writes[request.request_id] = (dir_fd, fd, temp, name, problem)
        if not request.last:
            return
        del self._writes[request.request_id]
        try:
            if fd >= 0:
                os.close(fd)
            if problem is None:
                try:
                    # Replaces a link of that name itself, never its target.
                    os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except OSError as exc:
                    problem = _problem(exc, request.path)
            if problem is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
        self._reply(request.request_id, problem=problem)

    def _begin_write(
        self, request: pb.FileRequest
    ) -> tuple[int, int, str, str, FileProblem | None]:
        dir_fd = fd = -1
        temp = f".legion-upload-{request.request_id[:16]}"
        name = ""
        problem: FileProblem | None = None
        try:
            parts = _parts(request.path)
            if not parts:
                raise FileProblem("not_a_file", "the work directory itself is not a file")
            name = parts[-1]
            dir_fd = _open_dir(parts[:-1], create=True)
            if _is_link(name, dir_fd):
                # Renaming over it would be harmless, but the caller meant
                # the link's target, which is never reached: say so.
                raise OSError(errno.ELOOP, "a symbolic link")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(temp, flags, 0o644, dir_fd=dir_fd)
        except FileProblem as exc:
            problem = exc
        except OSError as exc:
            problem = _problem(exc, request.path)
        state = (dir_fd, fd, temp, name, problem)
        self._writes[request.request_id] = state
        return state

    # read, list, remove ----------------------------------------------------------

    def _read(self, request: pb.FileRequest) -> None:
        parts = _parts(request.path)
        if not parts:
            raise FileProblem("not_a_file", "the work directory itself is not a file")
        dir_fd = _open_dir(parts[:-1])
        try:
            fd = _open_no_link(parts[-1], dir_fd, os.O_RDONLY | os.O_NONBLOCK)
        finally:
            os.close(dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FileProblem("not_a_file", f"{request.path}: not a regular file")
            if request.max_bytes and info.st_size > request.max_bytes:
                raise FileProblem(
                    "too_large",
                    f"{request.path}: {info.st_size} bytes, more than the {request.max_bytes} "
                    "asked for at most",
                )
            sent = 0
            while True:
                chunk = os.read(fd, self._budget)
                sent += len(chunk)
                if request.max_bytes and sent > request.max_bytes:
                    raise FileProblem("too_large", f"{request.path}: grew while being read")
                if not chunk:
                    break
                self._send(pb.FileReply(request_id=request.request_id, chunk=chunk))
            self._reply(request.request_id)
        finally:
            os.close(fd)

    def _list(self, request: pb.FileRequest) -> None:
        parts = _parts(request.path)
        limit = request.max_bytes or _MAX_ENTRIES
        entries: list[pb.FileEntry] = []
        truncated = False
        used = 0
        fd = _open_dir(parts)
        try:
            for entry in _walk(fd, "/".join(parts), request.recursive):
                if len(entries) >= limit:
                    truncated = True
                    break
                size = len(entry.path) + 32
                if used + size > self._budget:
                    self._send(pb.FileReply(request_id=request.request_id, entries=entries))
                    entries, used = [], 0
                entries.append(entry)
                used += size
        finally:
            os.close(fd)
        self._reply(request.request_id, entries=entries, truncated=truncated)

    def _remove(self, request: pb.FileRequest) -> None:
        parts = _parts(request.path)
        if not parts:
            raise FileProblem("denied", "the work directory itself cannot be removed")
        dir_fd = _open_dir(parts[:-1])
        try:
            name = parts[-1]
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                if request.recursive:
                    inner = _open_no_link(name, dir_fd, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        _empty(inner)
                    finally:
                        os.close(inner)
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)  # a link itself, never its target
        finally:
            os.close(dir_fd)


def _walk(fd: int, prefix: str, recursive: bool) -> Iterator[pb.FileEntry]:
    with os.scandir(fd) as found:
        names = sorted((e.name, e) for e in found)
    for name, entry in names:
        if name.startswith(".legion-upload-"):
            continue
        path = f"{prefix}/{name}" if prefix else name
        info = entry.stat(follow_symlinks=False)
        is_link = stat.S_ISLNK(info.st_mode)
        is_dir = stat.S_ISDIR(info.st_mode)
        yield pb.FileEntry(
            path=path, size=0 if is_dir else info.st_size, is_dir=is_dir, is_symlink=is_link
        )
        if recursive and is_dir:
            try:
                inner = _open_no_link(name, fd, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                yield from _walk(inner, path, recursive)
            finally:
                os.close(inner)


def _empty(fd: int) -> None:
    """Remove everything below the directory ``fd``, following no link."""
    with os.scandir(fd) as found:
        entries = list(found)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            inner = _open_no_link(entry.name, fd, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _empty(inner)
            finally:
                os.close(inner)
            os.rmdir(entry.name, dir_fd=fd)
        else:
            os.unlink(entry.name, dir_fd=fd)
