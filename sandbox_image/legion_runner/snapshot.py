"""Namespace snapshots, made and read only inside a sandbox.

A snapshot is an opaque blob: a header, then one record per saved name, each
its value pickled and zlib-compressed on its own. The controller stores the
blob and sends it back; it never unpickles it. Pickling entry by entry means
one value that cannot be saved (or loaded) costs only itself, at the price of
shared references: two names bound to one list come back as two equal lists.

What cannot be saved, and why, is reported name by name: functions, classes
and their instances defined in sandbox code (pickle stores those by reference
to a module, and sandbox code has none), generators, open files, and anything
else pickle refuses. Modules are saved by name and imported again on load;
tools are saved as references to the tool of that name in the new sandbox.

Imports only the standard library.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import stat
import struct
import sys
import types
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"legion-namespace-snapshot/1\n"
_COUNT = struct.Struct(">I")
_RECORD = struct.Struct(">II")  # name length, data length
_HEADER_BYTES = len(MAGIC) + _COUNT.size
# Names and reasons travel in channel messages: keep each one short.
MAX_NAME = 200
MAX_REASON = 300
# The module name sandbox code runs under (the namespace's __name__).
SANDBOX_MODULE = "__main__"
WORK_DIR_RECORD = "/data"
"""The record that holds the work directory (a gzipped tar), when asked for."""

Reference = tuple[str, ...]


class SnapshotFormatError(ValueError):
    """The blob is not a snapshot this runner can read; nothing was loaded."""


@dataclass
class Saved:
    """What :func:`save` made: the blob, the names in it, and what it left out."""

    blob: bytes
    names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Loaded:
    names: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def encodable(text: str) -> str:
    """``text`` with any lone surrogate replaced: sandbox code can put one in
    any string, and protobuf refuses to encode a message that holds one."""
    return text.encode("utf-8", "replace").decode("utf-8")


def clean(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters and made :func:`encodable`."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return encodable(text)


def size_text(size: int) -> str:
    """A byte count for people: ``512 bytes``, ``3.0 KiB``, ``20.1 MiB``."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _limit_text(size: int) -> str:
    mib = size / (1024 * 1024)
    return f"{mib:g} MiB" if size >= 1024 * 1024 and mib == int(mib) else size_text(size)


# --- saving -------------------------------------------------------------------


class _Unsaveable(Exception):
    """Raised while pickling an object that cannot be saved, with the reason."""

    def __init__(self, what: str, advice: str) -> None:
        super().__init__(what)
        self.what = what
        self.advice = advice


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _CompressedSink:
    """A file for the pickler: compresses what it is given as it comes. Past
    ``limit`` compressed bytes it keeps counting but holds nothing more, so
    saving a value too large to keep never holds more than the limit."""

    def __init__(self, limit: int) -> None:
        self._zlib = zlib.compressobj(6)
        self._parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def write(self, data: Any) -> int:
        out = self._zlib.compress(data)
        self._take(out)
        return len(memoryview(data))

    def _take(self, out: bytes) -> None:
        self.size += len(out)
        if self.size > self.limit:
            self._parts = []
        elif out:
            self._parts.append(out)

    def finish(self) -> bytes:
        self._take(self._zlib.flush())
        if self.size > self.limit:
            raise _TooLarge(self.size)
        return b"".join(self._parts)


def _ref(*reference: str) -> Any:
    """Stands in, inside a saved value, for an object of the runner (a tool).
    Only :class:`_Unpickler` resolves it, through the loading runner."""
    raise pickle.UnpicklingError("a runner reference can only be loaded from a snapshot")


def _describe(obj: Any) -> tuple[str, str] | None:
    """(what it is, what to do) for objects that cannot be saved, else None."""
    if isinstance(obj, (types.FunctionType, type)) and (
        getattr(obj, "__module__", None) == SANDBOX_MODULE
    ):
        kind = "class" if isinstance(obj, type) else "function"
        return f"a {kind} defined in sandbox code", "define it again"
    if isinstance(obj, (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)):
        return f"a {type(obj).__name__}", "create it again (its progress cannot be saved)"
    if isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
        return "an open file", "open it again"
    cls = type(obj)
    if getattr(cls, "__module__", None) == SANDBOX_MODULE:
        return (
            f"an instance of {cls.__qualname__}, a class defined in sandbox code",
            "define the class and create it again",
        )
    return None


class _Pickler(pickle.Pickler):
    def __init__(self, file: _CompressedSink, refs: Mapping[int, Reference]) -> None:
        super().__init__(file, protocol=5)
        self._refs = refs

    def reducer_override(self, obj: Any) -> Any:
        # Not called for None, bools, ints, floats, str, bytes and plain
        # containers, so cheap on data.
        ref = self._refs.get(id(obj))
        if ref is not None:
            return _ref, ref
        if isinstance(obj, types.ModuleType):
            name = getattr(obj, "__name__", None)
            if not isinstance(name, str) or sys.modules.get(name) is not obj:
                raise _Unsaveable("a module made in sandbox code", "create it again")
            return importlib.import_module, (name,)
        problem = _describe(obj)
        if problem is not None:
            raise _Unsaveable(*problem)
        return NotImplemented


def _pickle_entry(value: Any, refs: Mapping[int, Reference], limit: int) -> bytes:
    sink = _CompressedSink(limit)
    _Pickler(sink, refs).dump(value)
    return sink.finish()


def _entry_size(name: str, data: bytes) -> int:
    return _RECORD.size + len(name.encode("utf-8")) + len(data)


def _name_problem(name: str) -> str | None:
    if not name.isidentifier():
        return "not a Python identifier"
    if len(name) > MAX_NAME:
        return "the name is too long"
    return None


def _shown(name: str) -> str:
    """How a name is listed: itself, or a cut, encodable repr when odd."""
    if name.isidentifier() and len(name) <= MAX_NAME:
        return name
    return clean(repr(name), MAX_NAME)


def save(
    namespace: Mapping[Any, Any],
    *,
    max_bytes: int,
    exclude: Mapping[str, Any] | None = None,
    refs: Mapping[int, Reference] | None = None,
    work_dir: str | None = None,
) -> Saved:
    """Pickle ``namespace`` entry by entry into a blob of at most ``max_bytes``.

    Dunder names are left out, and so is a name bound to the very object
    ``exclude`` has for it (what the runner puts there itself: tool stubs,
    error classes). ``refs`` maps ``id(obj)`` to a reference the loading
    runner resolves (a tool used under another name). With ``work_dir``, the
    files below it are one more entry (``/data``). When the entries do not
    fit, the largest are dropped first, each with a "too large" reason.
    """
    exclude = exclude or {}
    refs = refs or {}
    budget = max(0, max_bytes - _HEADER_BYTES)
    kept: dict[str, bytes] = {}
    total = 0
    skipped: dict[str, str] = {}
    for key, value in list(namespace.items()):
        if not isinstance(key, str) or (key.startswith("__") and key.endswith("__")):
            continue
        if key in exclude and exclude[key] is value:
            continue
        problem = _name_problem(key)
        if problem is not None:
            skipped[_shown(key)] = problem
            continue
        try:
            data = _pickle_entry(value, refs, budget)
        except _TooLarge as exc:
            skipped[key] = f"too large: {size_text(exc.size)} (limit {_limit_text(max_bytes)})"
            continue
        except _Unsaveable as exc:
            skipped[key] = _unsaveable_reason(value, exc)
            continue
        except BaseException as exc:  # pickle's refusals, recursion, memory, odd __reduce__s
            skipped[key] = clean(f"cannot be saved: {type(exc).__name__}: {exc}", MAX_REASON)
            continue
        kept[key] = data
        total = _keep_within(kept, total + _entry_size(key, data), budget, skipped, max_bytes)
    if work_dir is not None:
        _save_work_dir(
            work_dir, kept, total=total, budget=budget, skipped=skipped, max_bytes=max_bytes
        )
    # Reasons stay in namespace order, whenever they were found.
    order = {k: i for i, k in enumerate(k for k in namespace if isinstance(k, str))}
    skipped = dict(sorted(skipped.items(), key=lambda kv: order.get(kv[0], len(order))))
    return Saved(blob=pack(kept), names=list(kept), skipped=skipped)


def _keep_within(
    kept: dict[str, bytes], total: int, budget: int, skipped: dict[str, str], max_bytes: int
) -> int:
    """Drop the largest entries until ``total`` fits ``budget``; the new total.
    Dropping as soon as the total is over gives the same result as dropping
    largest-first at the end, holding less meanwhile."""
    while total > budget:
        largest = max(kept, key=lambda k: len(kept[k]))
        size = _entry_size(largest, kept.pop(largest))
        total -= size
        skipped[largest] = clean(
            f"too large: {size_text(size)} (limit {_limit_text(max_bytes)} for the whole snapshot)",
            MAX_REASON,
        )
    return total


def _save_work_dir(
    root: str,
    kept: dict[str, bytes],
    *,
    total: int,
    budget: int,
    skipped: dict[str, str],
    max_bytes: int,
) -> None:
    try:
        data = pack_dir(root, budget)
    except _TooLarge as exc:
        skipped[WORK_DIR_RECORD] = (
            f"too large: {size_text(exc.size)} (limit {_limit_text(max_bytes)})"
        )
    except OSError as exc:
        skipped[WORK_DIR_RECORD] = clean(f"cannot be saved: {exc}", MAX_REASON)
    else:
        kept[WORK_DIR_RECORD] = data
        _keep_within(kept, total + _entry_size(WORK_DIR_RECORD, data), budget, skipped, max_bytes)


def _unsaveable_reason(value: Any, exc: _Unsaveable) -> str:
    top = _describe(value)
    if top is not None and top[0] == exc.what:
        return clean(f"{exc.what}: {exc.advice}", MAX_REASON)
    if isinstance(value, types.ModuleType):
        return clean(f"{exc.what}: {exc.advice}", MAX_REASON)
    return clean(f"it holds {exc.what}: {exc.advice}", MAX_REASON)


def pack(entries: Mapping[str, bytes]) -> bytes:
    """The blob: header, count, then (name, data) records."""
    parts = [MAGIC, _COUNT.pack(len(entries))]
    for name, data in entries.items():
        encoded = name.encode("utf-8")
        parts += [_RECORD.pack(len(encoded), len(data)), encoded, data]
    return b"".join(parts)


# --- loading ------------------------------------------------------------------


def unpack(blob: bytes) -> list[tuple[str, bytes]]:
    """The records of a blob; :class:`SnapshotFormatError` if it is not a
    whole snapshot (so nothing is loaded from a damaged one)."""
    view = memoryview(blob)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise SnapshotFormatError(
            "this is not a Legion namespace snapshot (the header is missing); pass the "
            "blob of a Snapshot taken by Sandbox.snapshot(), unchanged"
        )
    offset = len(MAGIC)
    damaged = SnapshotFormatError(
        "the snapshot is truncated or damaged; pass the blob of a Snapshot taken by "
        "Sandbox.snapshot(), unchanged"
    )
    if len(view) < offset + _COUNT.size:
        raise damaged
    (count,) = _COUNT.unpack_from(view, offset)
    offset += _COUNT.size
    records: list[tuple[str, bytes]] = []
    for _ in range(count):
        if len(view) < offset + _RECORD.size:
            raise damaged
        name_len, data_len = _RECORD.unpack_from(view, offset)
        offset += _RECORD.size
        end = offset + name_len + data_len
        if len(view) < end:
            raise damaged
        try:
            name = bytes(view[offset : offset + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise damaged from None
        records.append((name, bytes(view[offset + name_len : end])))
        offset = end
    if offset != len(view):
        raise damaged
    return records


def load(
    blob: bytes,
    namespace: dict[str, Any],
    *,
    resolve: Callable[[Reference], Any],
    work_dir: str | None = None,
) -> Loaded:
    """Unpickle each entry of ``blob`` into ``namespace``. An entry that fails
    goes to ``failed`` with the reason; the others are loaded regardless.
    Raises :class:`SnapshotFormatError` (loading nothing) for a blob that is
    not a whole snapshot."""
    records = unpack(blob)
    loaded = Loaded()
    for name, data in records:
        if name == WORK_DIR_RECORD and work_dir is not None:
            try:
                unpack_dir(data, work_dir)
            except BaseException as exc:
                loaded.failed[name] = clean(
                    f"cannot be loaded: {type(exc).__name__}: {exc}", MAX_REASON
                )
            else:
                loaded.names.append(name)
            continue
        problem = _name_problem(name)
        if problem is None and name.startswith("__") and name.endswith("__"):
            problem = "a reserved name"
        if problem is not None:
            loaded.failed[_shown(name)] = problem
            continue
        try:
            value = _Unpickler(io.BytesIO(zlib.decompress(data)), resolve).load()
        except BaseException as exc:  # a hostile payload may raise anything
            loaded.failed[name] = clean(
                f"cannot be loaded: {type(exc).__name__}: {exc}", MAX_REASON
            )
            continue
        namespace[name] = value
        loaded.names.append(name)
    return loaded


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, resolve: Callable[[Reference], Any]) -> None:
        super().__init__(file)
        self._resolve = resolve

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == _ref.__name__:
            return self._load_ref
        return super().find_class(module, name)

    def _load_ref(self, *reference: str) -> Any:
        return self._resolve(reference)


def chunks(data: bytes, size: int) -> Iterable[bytes]:
    """``data`` in pieces of at most ``size`` bytes (one empty piece for none)."""
    if not data:
        yield b""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# --- the work directory -----------------------------------------------------------


def pack_dir(root: str, limit: int) -> bytes:
    """The files below ``root`` as a gzipped tar of at most ``limit`` bytes
    (:class:`_TooLarge` past it). Links are kept as links, never followed."""
    sink = io.BytesIO()
    import tarfile  # noqa: PLC0415 - only for snapshots with files, not at start

    with tarfile.open(fileobj=sink, mode="w:gz", compresslevel=6) as tar:
        for name in sorted(os.listdir(root)):
            if name.startswith(".legion-upload-"):
                continue
            tar.add(os.path.join(root, name), arcname=name, recursive=True)
            if sink.tell() > limit:
                raise _TooLarge(sink.tell())
    data = sink.getvalue()
    if len(data) > limit:
        raise _TooLarge(len(data))
    return data


def unpack_dir(data: bytes, root: str) -> None:
    """Extract a :func:`pack_dir` tar into ``root``: regular files,
    directories and links only, every name inside ``root``, nothing written
    through a link."""
    links: set[str] = set()
    import tarfile  # noqa: PLC0415

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = os.path.normpath(member.name)
            parts = name.split(os.sep)
            if name.startswith("/") or ".." in parts:
                continue
            if any(os.sep.join(parts[:i]) in links for i in range(1, len(parts))):
                continue
            target = os.path.join(root, name)
            if member.isdir():
                os.makedirs(target, exist_ok=True)
            elif member.issym():
                links.add(name)
                if os.path.lexists(target):
                    os.unlink(target)
                os.symlink(member.linkname, target)
            elif member.isfile():
                source = tar.extractfile(member)
                if source is None:
                    continue
                os.makedirs(os.path.dirname(target) or root, exist_ok=True)
                if os.path.islink(target):
                    os.unlink(target)
                with open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                os.chmod(target, stat.S_IMODE(member.mode) & 0o755)
