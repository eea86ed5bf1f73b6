"""`covey serve`: the apps over HTTP, with the OpenAI-compatible API and the chat page.

The port is bound first (a port in use fails in a second), then the user's apps are
imported, then the model and the index load with progress shown, and the URL of the chat
page is printed once the server is ready. Ctrl-C stops it: requests in flight get
`GRACEFUL_S` seconds to finish, then are aborted, and the engine is closed.

While the model and the index load, the server already answers: `/healthz` 200, `/readyz`
and every route that needs the engine 503. The loading must happen on the main thread,
the one whose event loop then runs the server: on CPU covey's engine computes on the loop
thread, and torch ops on a second thread (one that loaded the weights next to the one that
computes) slow every decode step (see `covey.llm_backend.async_llm`). So during the load
the same app is served from a helper thread whose loop runs no torch at all (nothing there
reaches the engine before it is ready), on a duplicate of the listening socket; once
loaded, that server stops and the main thread serves, on the same socket (connections
arriving in between wait in its backlog).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from covey.cli.engine_args import (
    add_chunk_store_args,
    add_compile_arg,
    chunk_store_config,
    chunk_store_given,
    flag_list,
    goes_with,
)
from covey.errors import ConfigError

# Options left unset take `ServerSettings`' defaults (read in `run`, not at import: the
# server's modules pull in torch, and `covey --help` should stay quick).

GRACEFUL_S = 5  # how long Ctrl-C lets requests in flight finish before aborting them
# Overrides GRACEFUL_S (seconds): the test of Ctrl-C with a stream in flight waits less.
GRACEFUL_ENV = "COVEY_SERVE_GRACEFUL_S"
START_TIMEOUT_S = 30.0
# uvicorn's log levels, written out: importing uvicorn at parse time would slow `covey --help`
# (a test checks the two agree).
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


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
        "--index",
        default=None,
        help="an index folder (default: the Python docs index, built on first use)",
    )
    p.add_argument(
        "--remote",
        default=None,
        metavar="URL",
        help="run the apps on a remote OpenAI-compatible server (vLLM, SGLang, another "
        "covey) instead of loading a model; features that need KV access are off",
    )
    p.add_argument(
        "--remote-api-key", default=None, help="the bearer token the --remote server needs"
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on every API route (or set COVEY_API_KEY)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    add_compile_arg(p)
    add_chunk_store_args(p)
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
    p.add_argument(
        "--ray",
        action="store_true",
        help="run the engine as replicas on Ray Serve behind a KV-cache-aware router "
        '(needs the ray extra: pip install -e ".[ray]")',
    )
    p.add_argument("--replicas", type=int, default=None, help="with --ray: engine replicas (2)")
    p.add_argument(
        "--address",
        default=None,
        help="with --ray: join the Ray cluster at ADDR (default: start a local one)",
    )
    p.add_argument(
        "--routing",
        default=None,
        help="with --ray: cache_aware (default: KV-cache and load aware), round_robin, "
        "pow2 (covey's router, two random replicas, the shorter queue) or ray_serve (Ray "
        "Serve's own power-of-two-choices router over one deployment of the replicas)",
    )
    p.add_argument(
        "--max-imbalance",
        type=int,
        default=None,
        help="with --ray: send a call to the least-loaded replica instead of its best cache "
        "match when that one's queue is more than this many requests deeper (default 4)",
    )
    p.add_argument(
        "--replica-threads",
        type=int,
        default=None,
        help="with --ray: CPU threads per replica (default 1)",
    )
    p.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="with --ray: GPUs each replica reserves from Ray (default 1 with --device cuda, "
        "else 0; a replica that reserves none runs on CPU)",
    )
    p.add_argument(
        "--replica-health-period",
        type=float,
        default=None,
        help="with --ray: seconds between Ray Serve's health checks of each replica (default 2)",
    )
    p.add_argument(
        "--replica-health-timeout",
        type=float,
        default=None,
        help="with --ray: seconds a replica has to answer a health check; 3 missed in a row "
        "and Serve replaces it (default 30; a long engine step does not delay the answer)",
    )
    p.add_argument(
        "--replica-max-step",
        type=float,
        default=None,
        help="with --ray: seconds one engine step may run before the health check calls the "
        "replica stuck and Serve replaces it (default 600)",
    )
    p.add_argument(
        "--ray-app-prefix",
        default=None,
        help="with --ray: name the replicas' Serve applications PREFIX0, PREFIX1, ... "
        "(default covey-engine-); each front on a shared cluster needs its own",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning",
        help="uvicorn's log level (default warning)",
    )
    p.set_defaults(func=run)


# The --ray options' defaults, filled in once it is known that none was given without --ray.
RAY_DEFAULTS: dict[str, object] = {
    "replicas": 2,
    "routing": "cache_aware",
    "max_imbalance": 4,
    "replica_threads": 1,
    "ray_app_prefix": "covey-engine-",
}


def local_engine_options(args: argparse.Namespace) -> list[str]:
    """The options given that only a model loaded here uses (a remote engine has its own
    device, dtype and caches); `--device auto` and `--dtype auto`, the defaults, are not
    counted."""
    given = [name for name in ("device", "dtype") if getattr(args, name) != "auto"]
    if args.compile is not None:
        given.append("compile")
    return given + list(chunk_store_given(args))


def graceful_seconds() -> float:
    """Ctrl-C's grace for requests in flight: GRACEFUL_ENV when set (checked before anything
    loads, so a bad value is a clear error, not a traceback after the model is up)."""
    text = os.environ.get(GRACEFUL_ENV)
    if text is None:
        return float(GRACEFUL_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{GRACEFUL_ENV} must be a number of seconds >= 0, got {text!r}")
    return seconds


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from covey.server.app_factory import create_app
    from covey.server.server_builder import check_remote_url, load_into, load_user_apps
    from covey.server.state import ServerSettings, ServerState

    graceful_s = graceful_seconds()
    defaults = ServerSettings()
    max_tokens = defaults.max_tokens if args.max_tokens is None else args.max_tokens
    max_in_flight = defaults.max_in_flight if args.max_in_flight is None else args.max_in_flight
    for flag, value in (("--max-tokens", max_tokens), ("--max-in-flight", max_in_flight)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.remote is not None and args.model is not None:
        raise ConfigError("give --model or --remote, not both")
    if args.ray and args.remote is not None:
        raise ConfigError("give --ray or --remote, not both")
    if args.remote is None and args.remote_api_key is not None:
        raise ConfigError(goes_with(["remote_api_key"], "--remote"))
    if args.remote is not None:
        check_remote_url(args.remote)
    local_only = local_engine_options(args)
    if args.remote is not None and local_only:
        raise ConfigError(f"{flag_list(local_only)}: for a local engine only, not with --remote")
    ray_options = {
        **RAY_DEFAULTS,
        "address": None,
        "replica_gpus": None,
        "replica_health_period": None,
        "replica_health_timeout": None,
        "replica_max_step": None,
    }
    given = [name for name in ray_options if getattr(args, name) is not None]
    if not args.ray and given:
        raise ConfigError(goes_with(given, "--ray"))
    for name, default in RAY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.ray:
        from covey.server.ray_cluster import ROUTINGS

        if args.routing not in ROUTINGS:
            choices = ", ".join(ROUTINGS)
            raise ConfigError(f"--routing must be one of {choices}, got {args.routing!r}")
        if args.replicas < 1 or args.replica_threads < 1:
            raise ConfigError("--replicas and --replica-threads must be at least 1")
        if not args.ray_app_prefix.strip():
            raise ConfigError(
                f"--ray-app-prefix needs a prefix, got {args.ray_app_prefix!r}: the replicas' "
                "Serve applications would be named 0, 1, ..., shared by every front doing so"
            )
        if args.max_imbalance < 0:
            raise ConfigError(f"--max-imbalance must be >= 0, got {args.max_imbalance}")
        if args.chunk_store_dir is not None and args.replicas > 1:
            raise ConfigError(
                "--chunk-store-dir with --ray takes --replicas 1: the replicas would share "
                "one folder, and the disk tier does not coordinate two writers"
            )
        from covey.server.ray_deployment import HealthCheck, gpus_per_replica

        gpus_per_replica(args.device, args.replica_gpus)
        health = HealthCheck.of(
            args.replica_health_period, args.replica_health_timeout, args.replica_max_step
        )
    # A replica on a cluster joined by --address checks the folder on its own node.
    chunk_store = chunk_store_config(args, check_dir=not (args.ray and args.address))
    if args.ray and "chunk_store_dir" in chunk_store:  # a replica runs in a folder of Ray's
        chunk_store["chunk_store_dir"] = str(Path(args.chunk_store_dir).expanduser().resolve())
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
    url = page_url(host, port)
    try:
        user_apps = load_user_apps(args.app)
        state = ServerState(settings=settings)
        app = create_app(state)
        with _ServingWhileLoading(app, sock, args.log_level):
            print(f"covey serve: loading; listening on {url} (/readyz: 200 once ready)", flush=True)
            engine_config = (
                {}
                if args.remote
                else {
                    "device": args.device,
                    "dtype": args.dtype,
                    "compile": args.compile,
                    **chunk_store,
                }
            )
            engine = None
            if args.ray:
                from covey.server.ray_cluster import start_ray_engine

                print(f"covey serve: starting {args.replicas} engine replicas on Ray", flush=True)
                engine = start_ray_engine(
                    args.replicas,
                    args.model,
                    address=args.address,
                    policy=args.routing,
                    max_imbalance=args.max_imbalance,
                    threads=args.replica_threads,
                    gpus=args.replica_gpus,
                    app_prefix=args.ray_app_prefix,
                    engine_config=engine_config,
                    health=health,
                )
                engine_config = {}
            try:
                load_into(
                    state,
                    args.model,
                    args.index,
                    user_apps,
                    remote=args.remote,
                    remote_api_key=args.remote_api_key,
                    engine=engine,
                    **engine_config,
                )
                if engine is not None:
                    from covey.server.ray_metrics import register_ray_metrics

                    register_ray_metrics(state.metrics.registry, engine)
            except BaseException:  # a bad --index or app, Ctrl-C: the replicas go too
                if engine is not None:
                    asyncio.run(engine.close())
                raise
        config = uvicorn.Config(
            app,
            log_level=args.log_level,
            loop="asyncio",
            lifespan="on",
            timeout_graceful_shutdown=graceful_s,
        )
        state.ready = True  # no other thread serves it now
        asyncio.run(_serve(uvicorn.Server(config), sock, url))
    finally:
        sock.close()
    return 0


class _ServingWhileLoading:
    """The app served from a helper thread (its own event loop, no lifespan) on a duplicate
    of `sock`, for as long as the `with` block loads the model; see the module docstring."""

    def __init__(self, app: Any, sock: socket.socket, log_level: str) -> None:
        import uvicorn

        config = uvicorn.Config(app, log_level=log_level, loop="asyncio", lifespan="off")
        self.server = uvicorn.Server(config)
        self.sock = sock.dup()
        self.thread = threading.Thread(target=self._run, name="covey-loading", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def __enter__(self) -> _ServingWhileLoading:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started and self.thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=START_TIMEOUT_S)
        self.sock.close()


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
