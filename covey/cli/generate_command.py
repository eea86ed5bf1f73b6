"""`covey generate "PROMPT"`: print a completion, streamed, like `ollama run`."""

from __future__ import annotations

import argparse
import sys

from covey.cli.engine_args import add_engine_args, build_engine, sampling_params, stream_to


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
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args)
    engine = build_engine(args)
    if args.chat:
        if engine.tokenizer is None:
            from covey.errors import InvalidRequestError

            raise InvalidRequestError("--chat needs a model with a tokenizer")
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream_to(engine, prompt, params, write)
    sys.stdout.write("\n")
    return 0
