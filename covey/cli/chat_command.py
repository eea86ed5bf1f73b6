"""`covey chat`: an interactive multi-turn chat on the engine, streamed token by token.

`--docs` chats with the default app instead: the RAG chatbot over the Python docs, which
answers from retrieved passages and lists the sources it cites.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from typing import Any

from covey.cli.engine_args import (
    add_chunk_store_args,
    add_engine_args,
    build_engine,
    chunk_store_given,
    engine_config,
    goes_with,
    sampling_params,
    stream_to,
)

HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits."


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="interactive chat with the model")
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    p.add_argument(
        "--docs",
        action="store_true",
        help="answer from the Python docs with citations (the default RAG app, greedy; builds "
        "the docs index on first use)",
    )
    p.add_argument(
        "--index", default=None, help="with --docs: an index folder (default: the pydocs index)"
    )
    add_engine_args(p)
    add_chunk_store_args(p)  # for --docs: plain chat sends no retrieved chunks
    # like ollama: varied answers; --docs keeps its app's own (greedy) sampling
    p.set_defaults(func=run, max_tokens=None, temperature=0.7, top_p=0.9)


def run(args: argparse.Namespace) -> int:
    from covey.errors import EngineError, InvalidRequestError

    if args.docs:
        if args.system is not None:
            raise InvalidRequestError(
                "--system does not apply with --docs: the docs chatbot has its own instructions"
            )
        return asyncio.run(_docs_chat(args))
    docs_flags = [*(["index"] if args.index is not None else []), *chunk_store_given(args)]
    if docs_flags:
        raise InvalidRequestError(
            f"{goes_with(docs_flags, '--docs')}: plain chat retrieves nothing (no index to "
            "search, no chunks to reuse)"
        )
    if args.max_tokens is None:
        args.max_tokens = 512

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
        message = _read_line(interactive)
        if message is None:
            return 0
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
        except (InvalidRequestError, EngineError) as exc:  # e.g. history past the context
            history.pop()
            print(f"\n(error: {exc}; /reset to start over)", flush=True)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


def describe_index(index: Any, default: bool) -> str:
    """What the docs chat answers from, for its banner: the user's own index by its folder,
    size and a few of its sources, so nobody is told to ask about Python over their docs."""
    m = index.manifest
    sources = sorted(index.sources)
    chunks = m.get("num_chunks", len(index.chunks))
    size = f"{chunks} chunks from {m.get('num_sources', len(sources))} sources"
    if default:
        return f"the Python docs ({size}); ask about Python"
    if not sources:
        return f"the index {index.root} (empty)"
    shown = ", ".join(sources[:3]) + (", ..." if len(sources) > 3 else "")
    return f"the index {index.root} ({size}: {shown})"


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_line(interactive: bool) -> str | None:
    """The next message; None at end of input or /exit."""
    if interactive:
        sys.stdout.write(">>> ")
        sys.stdout.flush()
    line = sys.stdin.readline()
    if not line or line.strip() == "/exit":
        return None
    return line.strip()


async def _read_line_async(interactive: bool) -> str | None:
    """`_read_line` off the loop, on a daemon thread: Ctrl-C then quits at once instead of
    waiting for a worker thread stuck in `readline` to be joined."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str | None] = loop.create_future()

    def read() -> None:
        try:
            result: str | None = _read_line(interactive)
        except (OSError, ValueError):
            result = None
        loop.call_soon_threadsafe(lambda: line.done() or line.set_result(result))

    threading.Thread(target=read, name="covey-stdin", daemon=True).start()
    return await line


async def _docs_chat(args: argparse.Namespace) -> int:
    from covey.apps.rag_chatbot import (
        ANSWER_MAX_TOKENS,
        RagChatbot,
        build_rag_app,
        open_pydocs_index,
    )
    from covey.errors import InvalidRequestError, NodeExecutionError
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
    from covey.runtime import Runtime

    config = engine_config(args)  # a bad option fails here, before the index or model loads
    print("covey chat --docs: loading the model and the docs index...", file=sys.stderr)
    if args.index is not None:  # an index the user built: open it, never build one there
        from covey.retrieval.document_index import DocumentIndex

        index = DocumentIndex.open(args.index)
    else:
        index = open_pydocs_index()
    # An index of the user's own may not be about Python: its prompt does not say so.
    app = build_rag_app(
        max_tokens=args.max_tokens or ANSWER_MAX_TOKENS, python_docs=args.index is None
    )
    engine = LLMEngine(config)
    try:
        async with AsyncLLM(engine=engine) as llm:
            bot = RagChatbot(Runtime(llm, retrievers={DEFAULT_INDEX_NAME: index}), app)
            interactive = sys.stdin.isatty()
            about = describe_index(index, default=args.index is None)
            print(f"covey chat --docs: answering from {about}. {HELP}", file=sys.stderr, flush=True)
            while (message := await _read_line_async(interactive)) is not None:
                if not message:
                    continue
                if message == "/reset":
                    bot.reset("cli")
                    print("(conversation cleared)", flush=True)
                    continue
                try:
                    reply = await bot.ask("cli", message, on_token=_write)
                except (InvalidRequestError, NodeExecutionError) as exc:
                    print(f"\n(error: {exc}; /reset to start over)", flush=True)
                    continue
                print(flush=True)
                label = "Sources" if reply.cited else "Retrieved (none cited)"
                sources = ", ".join(f"[{c.number}] {c.source}" for c in reply.citations)
                print(f"{label}: {sources}", flush=True)
    finally:
        # AsyncLLM closes only an engine it built. Closing this one's chunk store writes its
        # host entries to --chunk-store-dir, where the next chat finds them.
        engine.close()
    return 0
