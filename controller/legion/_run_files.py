"""Files a run takes in (``legion.run(..., files=...)``) and gives back (what
its code left in ``/data/out``), bounded so a run can never return more than
a caller can hold."""

from __future__ import annotations

from collections.abc import Mapping

from .config import MiB
from .errors import SandboxFileError, UsageError
from .sandbox import Sandbox
from .sandbox.files import OUT_DIR, WORK_DIR, out_name, work_path

MAX_OUT_FILES = 64
"""Files of ``/data/out`` returned by one run; more are listed in the note."""
MAX_OUT_BYTES = 32 * MiB
"""Bytes of ``/data/out`` returned by one run, all files together."""

InputFiles = Mapping[str, bytes | str]


def check_input(files: InputFiles | None) -> dict[str, bytes]:
    """``files`` as work-directory paths and bytes; UsageError for a bad one."""
    checked: dict[str, bytes] = {}
    for name, given in (files or {}).items():
        try:
            path = work_path(name)
        except SandboxFileError as exc:
            raise UsageError(f"files: {exc}") from None
        data = given.encode("utf-8") if isinstance(given, str) else given
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"files[{name!r}] must be bytes or str, not {type(data).__name__}")
        checked[path] = bytes(data)
    return checked


def describe_input(files: Mapping[str, bytes]) -> str:
    """What the model is told of the files it was given."""
    if not files:
        return ""
    listed = ", ".join(f"{name} ({len(data):,} bytes)" for name, data in sorted(files.items()))
    return (
        f"\n\n[Files for this task are in your working directory {WORK_DIR}: {listed}. "
        f"Files you write to {WORK_DIR}/{OUT_DIR}/ are returned to the user.]"
    )


async def put_input(sandbox: Sandbox, files: Mapping[str, bytes]) -> None:
    for path, data in files.items():
        await sandbox.files.write(path, data)


async def collect_output(sandbox: Sandbox) -> tuple[dict[str, bytes], str]:
    """The files the code left in ``/data/out`` (name below ``out/`` ->
    bytes), within the bounds, and a notice of what was left out."""
    try:
        listed = await sandbox.files.list(OUT_DIR, recursive=True)
    except SandboxFileError as exc:
        if exc.kind == "not_found":
            return {}, ""
        return {}, f"the files in {WORK_DIR}/{OUT_DIR} could not be listed: {exc}"
    found: dict[str, bytes] = {}
    left: list[str] = []
    used = 0
    for entry in listed:
        name = out_name(entry.path)
        if entry.is_dir or entry.is_symlink or name is None:
            continue
        if len(found) >= MAX_OUT_FILES or used + entry.size > MAX_OUT_BYTES:
            left.append(name)
            continue
        try:
            data = await sandbox.files.read(entry.path, max_bytes=MAX_OUT_BYTES - used)
        except SandboxFileError as exc:
            left.append(f"{name} ({exc.kind})")
            continue
        found[name] = data
        used += len(data)
    note = ""
    if left:
        shown = ", ".join(left[:20]) + (f" and {len(left) - 20} more" if len(left) > 20 else "")
        note = (
            f"{len(left)} file(s) of {WORK_DIR}/{OUT_DIR} not returned (a run returns at most "
            f"{MAX_OUT_FILES} files and {MAX_OUT_BYTES // MiB} MiB): {shown}"
        )
    return found, note
