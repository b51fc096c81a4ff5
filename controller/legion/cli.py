"""The ``legion`` command."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import __version__
from .errors import LegionError, UsageError
from .store import default_store_path


def _environment_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The environment the image options ask for; None: the runner image."""
    if args.requirements is None and args.recipe is None:
        if args.name is not None or args.preload is not None:
            raise UsageError("--name and --preload go with --requirements (or --recipe)")
        return None
    preload = None if args.preload is None else [m for m in args.preload.split(",") if m]
    return {
        "requirements": args.requirements,
        "name": args.name,
        "recipe": args.recipe,
        "preload": preload,
    }


def _image_build(args: argparse.Namespace) -> int:
    from .sandbox import environment, image  # noqa: PLC0415 - keep `legion --help` fast

    options = _environment_options(args)
    if options is None:
        image.build(force=args.force)
    else:
        environment.build_environment(force=args.force, **options)
    return 0


def _image_name(args: argparse.Namespace) -> int:
    from .sandbox import environment, image  # noqa: PLC0415

    options = _environment_options(args)
    print(image.image_tag() if options is None else environment.environment_tag(**options))
    return 0


def _add_environment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requirements",
        metavar="FILE|DIR",
        help="an environment: the runner image plus these packages (a pip requirements file, "
        "or a directory of wheels for hosts without a package index)",
    )
    parser.add_argument("--name", help="the environment's name, which sandboxes select it by")
    parser.add_argument("--recipe", help="a shipped environment instead: data (numpy, pandas, ...)")
    parser.add_argument(
        "--preload",
        metavar="MODULES",
        help="comma-separated modules warm containers import ahead of the first run "
        "(default: the requirements file's `# legion-preload:` line)",
    )


def _prompt(args: argparse.Namespace) -> int:
    import importlib  # noqa: PLC0415

    from .agent import prompt_for  # noqa: PLC0415

    module_name, _, attr = args.agent.partition(":")
    if not attr:
        raise UsageError(f"name the agent as module:Class, got {args.agent!r}")
    try:
        agent = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {args.agent}: {exc}") from None
    sys.stdout.write(prompt_for(agent))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from . import doctor  # noqa: PLC0415

    return doctor.main(agents=args.agents)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _memory(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def _ps_remote(args: argparse.Namespace) -> list[dict[str, Any]]:
    import asyncio  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415

    from .client import Client  # noqa: PLC0415
    from .errors import RemoteError  # noqa: PLC0415

    async def ask() -> list[dict[str, Any]]:
        async with Client(
            args.remote, token=args.token, tls=args.tls, root_certificates=args.ca_cert
        ) as client:
            return [dataclasses.asdict(s) for s in await client.list_sandboxes()]

    try:
        rows = asyncio.run(ask())
    except RemoteError as exc:
        hint = {
            "UNAVAILABLE": " (is `legion serve` running there?)",
            "UNAUTHENTICATED": " (pass --token, or set LEGION_SERVER_TOKEN)",
        }.get(exc.code, "")
        raise type(exc)(f"{args.remote} answered {exc.code}: {exc}{hint}", code=exc.code) from None
    for row in rows:  # the API's empty values: a warm sandbox, or memory unknown
        row["run_id"] = row["run_id"] or None
        row["agent"] = row["agent"] or None
        row["memory_bytes"] = row["memory_bytes"] or None
    return rows


def _ps(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415
    import json  # noqa: PLC0415

    from .sandbox.runtime import host_sandboxes  # noqa: PLC0415

    if args.remote:
        rows = _ps_remote(args)
        header = ["CONTAINER", "RUN", "AGENT", "AGE", "MEMORY"]
        cells = [
            [
                str(r["container_id"])[:12],
                str(r["run_id"] or "(warm)"),
                str(r["agent"] or "-"),
                _age(r["age_seconds"]),
                _memory(r["memory_bytes"]),
            ]
            for r in rows
        ]
    else:
        found = asyncio.run(host_sandboxes(memory=True))
        rows = [dataclasses.asdict(sandbox) for sandbox in found]
        header = ["CONTAINER", "NAME", "STATE", "AGE", "MEMORY", "OWNER PID", "OWNER"]
        cells = [
            [
                s.container_id[:12],
                s.name,
                s.state,
                _age(s.age_seconds),
                _memory(s.memory_bytes),
                str(s.owner_pid or "?"),
                "alive" if s.owner_alive else "gone (removed at the next start)",
            ]
            for s in found
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no live Legion sandboxes" + (f" on {args.remote}" if args.remote else ""))
    else:
        print(_table(header, cells))
    return 0


def _add_remote_options(parser: argparse.ArgumentParser, remote_help: str) -> None:
    """--remote and how to reach it: token and TLS."""
    parser.add_argument("--remote", metavar="ADDR", help=remote_help)
    parser.add_argument(
        "--token",
        default=os.environ.get("LEGION_SERVER_TOKEN"),
        help="bearer token for --remote (default: $LEGION_SERVER_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with --remote")
    parser.add_argument("--ca-cert", metavar="PEM", help="CA of the server's certificate (TLS)")


def _add_doctor_and_ps(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check that this machine can run sandboxes; print the fix for each problem",
    )
    doctor.add_argument(
        "--agents",
        metavar="MODULE:REGISTRY",
        help="also connect to every MCP server these agents use and list its tools",
    )
    doctor.set_defaults(func=_doctor)
    ps = commands.add_parser(
        "ps",
        help="list live sandboxes: this machine's, or a `legion serve`'s with --remote",
    )
    _add_remote_options(ps, "ask a running `legion serve` (HOST:PORT or unix:/path)")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ps.set_defaults(func=_ps)


def _serve(args: argparse.Namespace) -> int:
    from .server import commands  # noqa: PLC0415 - keep `legion --help` fast

    return commands.serve(args)


def _run(args: argparse.Namespace) -> int:
    from .server import commands  # noqa: PLC0415

    return commands.run(args)


def _add_identity_options(serve: argparse.ArgumentParser) -> None:
    """`legion serve`'s --auth and --jwt-* options (README: "Identity")."""
    serve.add_argument(
        "--auth",
        metavar="MODULE:FACTORY",
        help="your own Authenticator: FACTORY() returns an object with "
        "`async def authenticate(token) -> Principal | None`",
    )
    serve.add_argument(
        "--jwt-jwks", metavar="FILE", help="accept JWTs signed by the keys of this JWKS file"
    )
    serve.add_argument("--jwt-issuer", metavar="ISS", help="the issuer JWTs must name (iss)")
    serve.add_argument("--jwt-audience", metavar="AUD", help="the audience JWTs must name (aud)")
    serve.add_argument(
        "--jwt-principal-claim",
        default="sub",
        metavar="CLAIM",
        help="the claim naming the principal (default: %(default)s)",
    )
    serve.add_argument(
        "--jwt-vault-claim",
        action="append",
        metavar="CLAIM[=KEY]",
        help="put a claim into the principal's vault (under KEY); repeatable",
    )
    serve.add_argument(
        "--jwt-principal-defaults",
        metavar="JSON|FILE",
        help="Principal fields for every JWT principal, e.g. "
        "'{\"max_concurrent_runs\": 2}' (JSON, or a .json/.toml file)",
    )
    serve.add_argument(
        "--jwt-algorithm",
        action="append",
        metavar="ALG",
        help="allow only these algorithms (repeatable; default: every asymmetric one)",
    )
    serve.add_argument(
        "--jwt-leeway",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="clock skew allowed for exp and nbf (default: 0)",
    )


def _add_serve_and_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve", help="serve a registry of agents over gRPC (the controller service)"
    )
    serve.add_argument(
        "--agents",
        required=True,
        metavar="MODULE:REGISTRY",
        help="a dict {name: Agent}, a list of Agent classes, or a function returning one",
    )
    serve.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="ADDR",
        help="HOST:PORT (port 0: any free one) or unix:/path (default: %(default)s)",
    )
    serve.add_argument(
        "--tokens",
        metavar="FILE",
        help="token file (TOML or JSON): token -> principal; LEGION_TOKENS adds name=token pairs",
    )
    _add_identity_options(serve)
    serve.add_argument("--tls-cert", metavar="PEM", help="the server's certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the server's private key")
    serve.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    serve.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM, how long runs may take to finish before they are cancelled",
    )
    serve.add_argument(
        "--max-concurrent-runs", type=int, default=4, help="per principal (default: 4)"
    )
    serve.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request accepted (default: 4 MiB)",
    )
    serve.add_argument(
        "--pool-size", type=int, help="warm sandboxes kept ready (default: $LEGION_POOL_SIZE or 2)"
    )
    serve.add_argument(
        "--image",
        action="append",
        metavar="IMAGE|AGENT=IMAGE",
        help="the environment sandboxes run in (e.g. data, built with `legion image build "
        "--recipe data`): IMAGE for every agent whose config names none (the warm pool holds "
        "it), AGENT=IMAGE for one agent; repeatable",
    )
    serve.add_argument(
        "--store",
        metavar="PATH",
        default=str(default_store_path()),
        help="SQLite file keeping long-lived agents' conversations across restarts "
        "(default: %(default)s); 'memory' keeps them only while the server runs",
    )
    serve.add_argument(
        "--dashboard",
        metavar="HOST:PORT",
        help="also serve the web dashboard there (port 0: any free one; loopback only "
        "without tokens); sign in with a token",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)
    run = commands.add_parser(
        "run", help="run an agent once: embedded (module:Class) or on a server (--remote)"
    )
    run.add_argument("agent", help="module:Class, or the agent's name on the server with --remote")
    run.add_argument("task", help="what to do")
    _add_remote_options(run, "a `legion serve` (HOST:PORT or unix:/path)")
    run.add_argument(
        "--config", metavar="JSON", help='AgentConfig keys as a JSON object: {"max_iterations": 3}'
    )
    run.add_argument(
        "--file",
        metavar="[NAME=]PATH",
        action="append",
        default=[],
        help="put a file in the run's work directory /data (as NAME, or its own name); repeat",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        help="write the files the run left in /data/out into DIR (made if missing)",
    )
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    run.set_defaults(func=_run)


def _mcp(args: argparse.Namespace) -> int:
    from .server import commands  # noqa: PLC0415

    return commands.mcp(args)


def _add_mcp(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mcp = commands.add_parser(
        "mcp",
        help="serve a registry of agents as MCP tools (task in, answer out): over stdio, "
        "or streamable HTTP with --http",
    )
    mcp.add_argument(
        "--agents",
        required=True,
        metavar="MODULE:REGISTRY",
        help="a dict {name: Agent}, a list of Agent classes, or a function returning one",
    )
    mcp.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio (port 0: any "
        "free one; loopback only without tokens)",
    )
    mcp.add_argument(
        "--tokens",
        metavar="FILE",
        help="token file (TOML or JSON): token -> principal; LEGION_TOKENS adds name=token pairs",
    )
    mcp.add_argument(
        "--token",
        default=os.environ.get("LEGION_SERVER_TOKEN"),
        help="over stdio with a token table: the token of the principal whose runs these are "
        "(default: $LEGION_SERVER_TOKEN)",
    )
    mcp.add_argument("--tls-cert", metavar="PEM", help="with --http: serve HTTPS with this chain")
    mcp.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    mcp.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    mcp.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM, how long runs may take to finish before they are cancelled",
    )
    mcp.add_argument(
        "--max-concurrent-runs", type=int, default=4, help="per principal (default: 4)"
    )
    mcp.add_argument(
        "--pool-size", type=int, help="warm sandboxes kept ready (default: $LEGION_POOL_SIZE or 2)"
    )
    mcp.add_argument(
        "--image",
        action="append",
        metavar="IMAGE|AGENT=IMAGE",
        help="the environment sandboxes run in, as for `legion serve`; repeatable",
    )
    mcp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    mcp.set_defaults(func=_mcp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="legion", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"legion {__version__}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image", help="the sandbox image")
    image_commands = image.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser(
        "build",
        help="build the sandbox image, or an environment with packages (skipped when an "
        "image with this content exists)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    _add_environment_options(build)
    build.set_defaults(func=_image_build)
    name = image_commands.add_parser(
        "name", help="print the tag this runner's image (or an environment) has"
    )
    _add_environment_options(name)
    name.set_defaults(func=_image_name)
    prompt = commands.add_parser("prompt", help="print an agent's system prompt")
    prompt.add_argument("agent", help="the agent class, as package.module:Class")
    prompt.set_defaults(func=_prompt)
    _add_doctor_and_ps(commands)
    _add_serve_and_run(commands)
    _add_mcp(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LegionError as exc:
        print(f"legion: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
