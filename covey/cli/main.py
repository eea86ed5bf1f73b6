"""`covey` entry point: each subcommand module exposes `register(subparsers)`.

Errors reach the user by category, never as a traceback: a `CoveyError` prints one line,
`covey: error: <message>`, and exits with its category's code (2 for bad input, 3 for
something not found, 4 overloaded, 5 unavailable, 1 internal). Ctrl-C exits 130 quietly.
argparse keeps its own usage errors (exit 2). Any other exception is a bug in covey, so its
traceback stays.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMAND_MODULES = (
    "covey.cli.generate_command",
    "covey.cli.chat_command",
    "covey.cli.retrieval_commands",
    "covey.cli.serve_command",
)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covey", description="covey: compound AI runtime")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from covey.llm_backend.cpu_threads import configure_openmp_env

    configure_openmp_env()  # before anything imports torch: OpenMP reads it once, at load
    from covey.errors import CoveyError

    try:
        args = build_parser().parse_args(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the try, not at exit
        return code
    except CoveyError as exc:
        print(f"covey: error: {_one_line(exc)}", file=sys.stderr)
        return exc.category.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line ^C was echoed on
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `covey search ... | head`: the reader left; nothing to report
        _silence_stdout()
        return 1


def _one_line(exc: BaseException) -> str:
    """The message on one line: a multi-line one would read as several errors."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
