"""`covey chat`: an interactive multi-turn chat on the engine, streamed token by token."""

from __future__ import annotations

import argparse
import sys

from covey.cli.engine_args import add_engine_args, build_engine, sampling_params, stream_to

HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits."


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="interactive chat with the model")
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    add_engine_args(p)
    p.set_defaults(func=run, max_tokens=512, temperature=0.7, top_p=0.9)  # like ollama: varied


def run(args: argparse.Namespace) -> int:
    from covey.errors import InvalidRequestError

    print("covey chat: loading the model...", file=sys.stderr, flush=True)
    engine = build_engine(args)
    if engine.tokenizer is None:
        raise InvalidRequestError("covey chat needs a model with a tokenizer")
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    interactive = sys.stdin.isatty()
    print(f"covey chat with {engine.model_name}. {HELP}", file=sys.stderr, flush=True)
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            history = list(system)
            print("(conversation cleared)", flush=True)
            continue
        history.append({"role": "user", "content": message})
        prompt = engine.tokenizer.apply_chat_template(history)
        try:
            answer = stream_to(engine, prompt, params, _write)
        except InvalidRequestError as exc:  # e.g. the history outgrew the context window
            history.pop()
            print(f"\n(error: {exc}; /reset to start over)", flush=True)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
