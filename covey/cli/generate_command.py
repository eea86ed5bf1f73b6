"""`covey generate "PROMPT"`: print a completion, streamed, like `ollama run`."""

from __future__ import annotations

import argparse
import sys

from covey.cli.engine_args import add_engine_args, build_engine, sampling_params, stream_to
from covey.errors import InvalidRequestError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt with the engine")
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    if not prompt and not args.chat:  # the engine refuses it too, but after the model load
        raise InvalidRequestError("the prompt is empty")
    params = sampling_params(args)
    engine = build_engine(args)
    if args.chat:
        if engine.tokenizer is None:
            raise InvalidRequestError("--chat needs a model with a tokenizer")
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream_to(engine, prompt, params, write)
    sys.stdout.write("\n")
    return 0


def _read_stdin() -> str:
    """The prompt piped in, as UTF-8: other bytes get a clear error before the model loads."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"the prompt on stdin is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
