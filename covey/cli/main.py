"""`covey` entry point: each subcommand module exposes `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "covey.cli.generate_command",
    "covey.cli.chat_command",
    "covey.cli.retrieval_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covey", description="covey: compound AI runtime")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from covey.errors import CoveyError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CoveyError as exc:
        print(f"covey: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
