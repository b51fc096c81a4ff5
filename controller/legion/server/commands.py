"""``legion serve`` and ``legion run``: what the command line does, behind
:mod:`legion.cli` (which only declares the arguments)."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import pkgutil
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from .. import telemetry
from .._api_codec import to_json
from .._results import RunResult
from ..agent import Agent
from ..agent import run as run_agent
from ..client import Client
from ..errors import LegionError, UsageError
from .app import ServerSettings, check_dashboard, check_listen, load_registry
from .app import serve as serve_forever
from .auth import Authenticator, Principal, TokenTable

USAGE_EXIT = 2
_LINES = re.compile(r"[^\n]*\n|[^\n]+")
_OUTPUT_PREFIX = {"stdout": "    | ", "stderr": "    ! ", "reply": "    > "}
"""How `legion run` marks the code's output lines under their step, and the
model's reply (``llm.delta``) as it streams in under "asking the model"."""


def serve(args: argparse.Namespace) -> int:
    """``legion serve``: exit 2 on a bad registry, token file or address;
    0 after a graceful shutdown."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.log_level != "debug":  # a line or two per model request otherwise
        for chatty in ("LiteLLM", "httpx", "httpcore"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        agents = load_registry(args.agents)
        authenticator = authenticator_from(args)
        settings = ServerSettings(
            listen=args.listen,
            authenticator=authenticator,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
            max_message_bytes=args.max_message_bytes,
            grace_seconds=args.grace_seconds,
            max_concurrent_runs=args.max_concurrent_runs,
            pool_size=args.pool_size,
            **images(args.image or []),
            store=None if args.store == "memory" else Path(args.store),
            dashboard=args.dashboard,
        )
        check_listen(settings.listen, authenticated=authenticator is not None)
        if settings.dashboard is not None:
            check_dashboard(settings.dashboard, authenticated=authenticator is not None)
    except UsageError as exc:
        print(f"legion serve: {exc}", file=sys.stderr)
        return USAGE_EXIT

    def listening(address: str) -> None:
        print(f"legion serve: listening on {address}", flush=True)

    def dashboard(url: str) -> None:
        print(f"legion serve: dashboard on {url}", flush=True)

    try:
        asyncio.run(serve_forever(agents, settings, on_listening=listening, on_dashboard=dashboard))
    except UsageError as exc:  # an address it cannot bind
        print(f"legion serve: {exc}", file=sys.stderr)
        return USAGE_EXIT
    return 0


def mcp(args: argparse.Namespace) -> int:
    """``legion mcp``: exit 2 on a bad registry, token or address; 0 after a
    graceful shutdown (or, over stdio, once the client closes stdin)."""
    from .mcp_server import MCPSettings, serve_mcp  # noqa: PLC0415 - the SDK only when asked for

    logging.basicConfig(  # stderr always: over stdio, stdout is the protocol
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.log_level != "debug":
        for chatty in ("LiteLLM", "httpx", "httpcore", "mcp", "uvicorn"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        agents = load_registry(args.agents)
        chosen = images(args.image or [])
        settings = MCPSettings(
            http=args.http,
            authenticator=TokenTable.load(args.tokens),
            token=args.token,
            grace_seconds=args.grace_seconds,
            max_concurrent_runs=args.max_concurrent_runs,
            pool_size=args.pool_size,
            image=chosen["image"],
            agent_images=chosen["agent_images"],
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            tls_client_ca=Path(args.tls_client_ca) if args.tls_client_ca else None,
        )
    except UsageError as exc:
        print(f"legion mcp: {exc}", file=sys.stderr)
        return USAGE_EXIT

    def listening(where: str) -> None:
        if where != "stdio":  # stdout is the protocol over stdio
            print(f"legion mcp: listening on {where}", flush=True)

    try:
        asyncio.run(serve_mcp(agents, settings, on_listening=listening))
    except UsageError as exc:
        print(f"legion mcp: {exc}", file=sys.stderr)
        return USAGE_EXIT
    return 0


# --- identity: --tokens, --auth, --jwt-* -------------------------------------


def authenticator_from(args: argparse.Namespace) -> Authenticator | None:
    """The server's authenticator from ``--tokens`` (and ``LEGION_TOKENS``),
    ``--auth`` and ``--jwt-*``; several are tried in that order, the first to
    accept a token wins. None when none is given."""
    found: list[Authenticator] = []
    table = TokenTable.load(args.tokens)
    if table is not None:
        found.append(table)
    if args.auth:
        found.append(load_authenticator(args.auth))
    jwt_options = {
        "--jwt-issuer": args.jwt_issuer,
        "--jwt-audience": args.jwt_audience,
        "--jwt-principal-defaults": args.jwt_principal_defaults,
        "--jwt-vault-claim": args.jwt_vault_claim,
        "--jwt-algorithm": args.jwt_algorithm,
    }
    if args.jwt_jwks:
        found.append(_jwt_authenticator(args))
    elif given := [flag for flag, value in jwt_options.items() if value]:
        raise UsageError(f"{', '.join(given)} need --jwt-jwks FILE (the keys tokens are signed by)")
    if not found:
        return None
    # a plugin's answers are checked (FirstOf): a wrong type is a server error, not a caller
    return found[0] if len(found) == 1 and not args.auth else FirstOf(found)


def _jwt_authenticator(args: argparse.Namespace) -> Authenticator:
    from .jwt_auth import (  # noqa: PLC0415 - PyJWT only when asked for
        ASYMMETRIC_ALGORITHMS,
        JWTAuthenticator,
        load_principal_defaults,
        parse_vault_claims,
    )

    if not args.jwt_issuer or not args.jwt_audience:
        raise UsageError(
            "--jwt-jwks needs --jwt-issuer and --jwt-audience: a token is accepted only "
            "when it names both"
        )
    defaults = args.jwt_principal_defaults
    return JWTAuthenticator.from_file(
        args.jwt_jwks,
        issuer=args.jwt_issuer,
        audience=args.jwt_audience,
        algorithms=args.jwt_algorithm or ASYMMETRIC_ALGORITHMS,
        principal_claim=args.jwt_principal_claim,
        vault_claims=parse_vault_claims(args.jwt_vault_claim or []),
        principal_defaults=load_principal_defaults(defaults) if defaults else None,
        leeway=args.jwt_leeway,
    )


def load_authenticator(spec: str) -> Authenticator:
    """``--auth module:factory``: the factory (a class or function, called with
    no arguments) makes the authenticator; an authenticator object is taken as
    it is. Raises :class:`legion.UsageError` saying what is wrong."""
    if ":" not in spec or spec.startswith(":") or spec.endswith(":"):
        raise UsageError(f"--auth names the factory as package.module:factory, got {spec!r}")
    try:
        target = pkgutil.resolve_name(spec)
    except Exception as exc:
        raise UsageError(f"--auth {spec}: cannot load it: {type(exc).__name__}: {exc}") from None
    made = target
    if callable(target) and not _is_authenticator(target):
        try:
            made = target()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise UsageError(f"--auth {spec}: the factory raised {problem}") from None
    if not _is_authenticator(made):
        raise UsageError(
            f"--auth {spec} gave {made!r}, not an Authenticator: it needs a method "
            "`async def authenticate(self, token: str) -> Principal | None`"
        )
    authenticator: Authenticator = made
    return authenticator


def _is_authenticator(value: Any) -> bool:
    method = getattr(value, "authenticate", None)
    return not isinstance(value, type) and inspect.iscoroutinefunction(method)


class FirstOf:
    """An authenticator that asks several in turn; the first principal found wins.
    An answer that is neither a Principal nor None raises TypeError (the
    interceptor answers INTERNAL and logs it)."""

    def __init__(self, authenticators: list[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)

    async def authenticate(self, token: str) -> Principal | None:
        for authenticator in self.authenticators:
            principal = await authenticator.authenticate(token)
            if principal is not None and not isinstance(principal, Principal):
                raise TypeError(
                    f"{authenticator!r}.authenticate returned {type(principal).__name__}, "
                    "not a Principal or None"
                )
            if principal is not None:
                return principal
        return None


def images(values: list[str]) -> dict[str, Any]:
    """``--image`` values as ServerSettings fields: ``IMAGE`` is the runtime's,
    ``AGENT=IMAGE`` one agent's."""
    found: dict[str, Any] = {"image": None, "agent_images": {}}
    for value in values:
        agent, sep, image = value.rpartition("=")
        if not image or (sep and not agent):
            raise UsageError(f"--image takes IMAGE or AGENT=IMAGE, got {value!r}")
        if sep:
            found["agent_images"][agent] = image
        elif found["image"] not in (None, image):
            raise UsageError(f"two images for every agent: --image {found['image']} and {image}")
        else:
            found["image"] = image
    return found


class Progress:
    """Prints a run's events as short lines, the model's reply and the code's
    output as they come (each line indented under its request or step, the
    reply's marked with ``>``, stderr's with ``!``; a retried request's reply
    starts a new line), and a reminder while a step takes long (every
    ``every`` seconds)."""

    def __init__(self, out: TextIO, *, every: float = 10.0) -> None:
        self.out = out
        self.every = every
        self._doing: tuple[str, float] | None = None
        self._open_line = ""
        """The stream whose last output line has not ended yet (empty: none)."""
        self._attempt: object = None
        """The model request attempt whose reply is streaming in."""

    def say(self, text: str) -> None:
        print(self._end_line() + text, file=self.out, flush=True)

    def output(self, stream: str, text: str) -> None:
        """A chunk of the code's output, a prefix per line, written in one go."""
        prefix = _OUTPUT_PREFIX.get(stream, _OUTPUT_PREFIX["stdout"])
        parts = [self._end_line()] if self._open_line != stream else []
        for line in _LINES.findall(text):
            if not self._open_line:
                parts.append(prefix)
            parts.append(line)
            self._open_line = "" if line.endswith("\n") else stream
        self.out.write("".join(parts))
        self.out.flush()

    def _end_line(self) -> str:
        """What ends an output line left open (before other lines)."""
        if not self._open_line:
            return ""
        self._open_line = ""
        return "\n"

    def live_text(self, event: telemetry.Event) -> bool:
        """Print the text of a ``sandbox.output`` or ``llm.delta`` event; False for others."""
        d = event.data
        if event.name == telemetry.SANDBOX_OUTPUT:
            self.output(str(d.get("stream", "")), str(d.get("text", "")))
        elif event.name == telemetry.LLM_DELTA:
            if d.get("attempt") != self._attempt:
                self._attempt = d.get("attempt")
                self.out.write(self._end_line())
            self.output("reply", str(d.get("text", "")))
        else:
            return False
        return True

    def __call__(self, event: telemetry.Event) -> None:
        d = event.data
        name = event.name
        if self.live_text(event):
            return
        took = f" in {d['duration']:.1f}s" if isinstance(d.get("duration"), (int, float)) else ""
        line, doing = None, None
        if name == telemetry.RUN_START:
            line = f"run {d.get('agent', '')} started (run {(event.run_id or '')[:8]})"
        elif name in (telemetry.RUN_STOP, telemetry.RUN_EXCEPTION):
            outcome = "finished" if name == telemetry.RUN_STOP else "failed"
            line = f"run {d.get('agent', '')} {outcome}{took}"
        elif name == telemetry.LLM_REQUEST_START:
            line, doing = f"  asking the model ({d.get('model', '?')})", "waiting for the model"
            self._attempt = None
        elif name == telemetry.LLM_REQUEST_STOP:
            line = f"  the model answered{took}"
        elif name == telemetry.ITERATION_START:
            line, doing = f"  step {d.get('index', '?')}: running code", "running code"
        elif name in (telemetry.ITERATION_STOP, telemetry.ITERATION_EXCEPTION):
            line = f"  step {d.get('index', '?')} done{took}"
        elif name == telemetry.TOOL_CALL_START:
            line = f"    tool {d.get('tool', '?')}.{d.get('function', '?')}"
        elif name == telemetry.HUMAN_REQUEST:
            line = f"  the agent asks: {d.get('question', '')} (ref {d.get('ref', '')})"
            doing = "waiting for a human"
        if name.endswith((".stop", ".exception")):
            self._doing = None
        if doing is not None:
            self._doing = (doing, time.monotonic())
        if line is not None:
            self.say(line)

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            if self._doing is not None:
                what, since = self._doing
                self.say(f"  ... still {what} ({time.monotonic() - since:.0f}s)")


def _config(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError('--config must be a JSON object, e.g. {"max_iterations": 3}')
    return config


def _import_agent(spec: str) -> type[Agent]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(
            f"name the agent as module:Class (or give --remote ADDR to use a server's), "
            f"got {spec!r}"
        )
    registry = load_registry(spec)
    if len(registry) != 1:
        raise UsageError(f"{spec} names {len(registry)} agents; name one class")
    return next(iter(registry.values()))


async def _with_progress(
    progress: Progress | None, work: Callable[[], Awaitable[RunResult]]
) -> RunResult:
    ticker = asyncio.create_task(progress.tick()) if progress is not None else None
    try:
        return await work()
    finally:
        if ticker is not None:
            ticker.cancel()


def run(args: argparse.Namespace) -> int:
    """``legion run``: the answer as JSON on stdout, progress on stderr; a
    one-line error and exit 1 on failure."""
    progress = None if args.quiet else Progress(sys.stderr)
    try:
        config = _config(args.config)
        files = _input_files(args.file)
        if args.remote:
            result = asyncio.run(_remote(args, config, files, progress))
        else:
            agent = _import_agent(args.agent)
            unsubscribe = telemetry.subscribe(progress) if progress is not None else None
            try:
                result = asyncio.run(
                    _with_progress(
                        progress, lambda: run_agent(agent, args.task, files=files, **config)
                    )
                )
            finally:
                if unsubscribe is not None:
                    unsubscribe()
        written = _write_out(args.out, result)
    except LegionError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"legion run: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    for path in written:
        print(f"legion run: wrote {path}", file=sys.stderr)
    if result.files and args.out is None:
        print(
            f"legion run: the run left {len(result.files)} file(s) in /data/out; "
            "give --out DIR to keep them",
            file=sys.stderr,
        )
    if result.files_note:
        print(f"legion run: {result.files_note}", file=sys.stderr)
    print(to_json(result.output), flush=True)
    return 0


def _input_files(specs: list[str]) -> dict[str, bytes]:
    """``--file [NAME=]PATH`` options as name -> bytes."""
    files: dict[str, bytes] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        try:
            files[name] = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"--file {spec}: cannot read {path}: {exc.strerror}") from None
    return files


def _write_out(out: str | None, result: RunResult) -> list[Path]:
    """Write the run's files below ``out``; never outside it."""
    if out is None or not result.files:
        return []
    root = Path(out).resolve()
    written = []
    for name, data in sorted(result.files.items()):
        target = (root / name).resolve()
        if not target.is_relative_to(root):
            raise UsageError(f"the run returned a file named {name!r}, outside --out; not written")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written.append(target)
    return written


async def _remote(
    args: argparse.Namespace,
    config: dict[str, Any],
    files: dict[str, bytes],
    progress: Progress | None,
) -> RunResult:
    async with Client(
        args.remote, token=args.token, tls=args.tls, root_certificates=args.ca_cert
    ) as client:
        return await _with_progress(
            progress,
            lambda: client.run(args.agent, args.task, on_event=progress, files=files, **config),
        )
