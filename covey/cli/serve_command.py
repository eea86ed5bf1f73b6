"""`covey serve`: the apps over HTTP, with the OpenAI-compatible API and the chat page.

The port is bound first (a port in use fails in a second), then the user's apps are
imported, then the model and the index load with progress shown; only then does the server
listen, and the URL of the chat page is printed once it answers. Ctrl-C stops it: requests
in flight are aborted and the engine closed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from covey.errors import ConfigError

# Options left unset take `ServerSettings`' defaults (read in `run`, not at import: the
# server's modules pull in torch, and `covey --help` should stay quick).


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve the apps over HTTP: REST per app, OpenAI API, metrics, chat page"
    )
    p.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="MODULE:OBJ",
        help="also serve this app (an App made with @app, or a ServedApp); repeatable",
    )
    p.add_argument("--host", default=None, help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 8000; 0 picks a free one")
    p.add_argument(
        "--model",
        default=None,
        help="a .gguf file, a Hugging Face folder or dummy:PRESET "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--index", default=None, help="an index folder (default: the Python docs index, built "
        "on first use)"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on every API route (or set COVEY_API_KEY)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="the most output tokens one request may ask for (default 1024)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="requests running at once before answering 429 (default 64)",
    )
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from covey.server.app_factory import create_app
    from covey.server.server_builder import load_state
    from covey.server.state import ServerSettings

    defaults = ServerSettings()
    max_tokens = defaults.max_tokens if args.max_tokens is None else args.max_tokens
    max_in_flight = defaults.max_in_flight if args.max_in_flight is None else args.max_in_flight
    for flag, value in (("--max-tokens", max_tokens), ("--max-in-flight", max_in_flight)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    host = defaults.host if args.host is None else args.host
    sock = bind(host, defaults.port if args.port is None else args.port)
    port = sock.getsockname()[1]
    settings = ServerSettings(
        host=host,
        port=port,
        api_key=args.api_key,
        max_tokens=max_tokens,
        max_in_flight=max_in_flight,
    )
    try:
        state = load_state(
            settings, args.model, args.index, args.app, device=args.device, dtype=args.dtype
        )
        app = create_app(state)
        config = uvicorn.Config(app, log_level=args.log_level, loop="asyncio", lifespan="on")
        asyncio.run(_serve(uvicorn.Server(config), sock, page_url(host, port)))
    finally:
        sock.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so a taken port fails before minutes of loading."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def page_url(host: str, port: int) -> str:
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/"


async def _serve(server, sock: socket.socket, url: str) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"covey serve: ready. Chat page: {url}  (API docs: {url}docs)", flush=True)
    await serving
    if not server.started:
        print("covey serve: the server did not start (see the log above)", file=sys.stderr)
