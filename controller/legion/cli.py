"""The ``legion`` command."""

from __future__ import annotations

import argparse
import sys

from .errors import LegionError, UsageError


def _image_build(args: argparse.Namespace) -> int:
    from .sandbox import image  # noqa: PLC0415 - keep `legion --help` fast

    image.build(force=args.force)
    return 0


def _image_name(args: argparse.Namespace) -> int:
    from .sandbox import image  # noqa: PLC0415

    print(image.image_tag())
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="legion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image", help="the sandbox image")
    image_commands = image.add_subparsers(dest="image_command", required=True)
    build = image_commands.add_parser(
        "build", help="build the sandbox image (skipped when this runner's image exists)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.set_defaults(func=_image_build)
    name = image_commands.add_parser("name", help="print the tag this runner's image has")
    name.set_defaults(func=_image_name)
    prompt = commands.add_parser("prompt", help="print an agent's system prompt")
    prompt.add_argument("agent", help="the agent class, as package.module:Class")
    prompt.set_defaults(func=_prompt)
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
