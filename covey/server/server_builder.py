"""Build a server's state: the engine, the index, the runtime and the apps it serves.

`covey serve` loads the model and the Python-docs index (built on first use) with progress
shown, then serves the built-in apps (rag_chatbot, advanced_rag, mapreduce_summary) and any
user app given as `module:obj`. The runtime reaches the engine through `MeteredEngine`, so
every generation of every app lands in the TTFT/TPOT histograms. The chatbot is served
with sessions by `covey.server.chat_app` when that module is installed (its
`build_served_app(state, app)` wraps the graph app); otherwise as its plain graph.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covey.apps.advanced_rag import build_advanced_rag_app
from covey.apps.mapreduce_summary import build_summary_app
from covey.apps.rag_chatbot import build_rag_app
from covey.errors import ConfigError
from covey.graph.app import App
from covey.llm_backend.engine_client import EngineClient
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.retrieval.searcher import Searcher
from covey.runtime.executor import Runtime
from covey.server.graph_app import GraphServedApp
from covey.server.metered_engine import MeteredEngine
from covey.server.metrics import ServerMetrics
from covey.server.served_app import ServedApp
from covey.server.state import ServerSettings, ServerState

CHAT_APP_MODULE = "covey.server.chat_app"
CHATBOT = "rag_chatbot"


def builtin_apps(max_tokens: int | None = None) -> dict[str, App]:
    """The built-in apps; `max_tokens` caps every gen of each (small demos, tests)."""

    def cap(n: int) -> int:
        return n if max_tokens is None else min(n, max_tokens)

    from covey.apps import advanced_rag, mapreduce_summary, rag_chatbot

    apps = [
        build_rag_app(max_tokens=cap(rag_chatbot.ANSWER_MAX_TOKENS)),
        build_advanced_rag_app(
            subquery_max_tokens=cap(advanced_rag.SUBQUERY_MAX_TOKENS),
            answer_max_tokens=cap(advanced_rag.ANSWER_MAX_TOKENS),
        ),
        build_summary_app(
            piece_max_tokens=cap(mapreduce_summary.PIECE_MAX_TOKENS),
            summary_max_tokens=cap(mapreduce_summary.SUMMARY_MAX_TOKENS),
        ),
    ]
    return {app.name: app for app in apps}


def load_user_app(spec: str) -> App | ServedApp:
    """`module:obj`: an `App`, a `ServedApp`, or a function of no arguments returning one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--app {spec!r}: give it as module:object, e.g. myapps:qa_app")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--app {spec!r}: cannot import {module_name!r} ({exc})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--app {spec!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, (App, ServedApp)) and not isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, (App, ServedApp)):
        raise ConfigError(
            f"--app {spec!r} is a {type(obj).__name__}; it must be an App (made with @app) "
            "or a ServedApp"
        )
    return obj


def build_state(
    engine: EngineClient,
    index: Searcher | None,
    settings: ServerSettings | None = None,
    apps: dict[str, App] | None = None,
    user_apps: list[App | ServedApp] | tuple[App | ServedApp, ...] = (),
    sessions: bool = True,
) -> ServerState:
    """A ready state serving `apps` (default: the built-in apps) and `user_apps` on
    `engine`, the retrieving apps searching `index` under the built-in index name.
    `sessions=False` serves the chatbot as its plain graph even when sessions exist."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    state = ServerState(settings=settings, engine=engine, metrics=metrics)
    retrievers = {DEFAULT_INDEX_NAME: index} if index is not None else {}
    state.runtime = Runtime(MeteredEngine(engine, metrics), retrievers=retrievers)
    apps = builtin_apps() if apps is None else apps
    for name, app in apps.items():
        state.apps[name] = _serve_graph(state, app, name)
    if sessions and CHATBOT in apps:
        chat = _chat_builder()
        if chat is not None:
            state.apps[CHATBOT] = chat(state, apps[CHATBOT])
    for app in user_apps:
        served = _serve_graph(state, app, app.name) if isinstance(app, App) else app
        state.apps[served.name] = served
    state.ready = True
    return state


def _serve_graph(state: ServerState, app: App, name: str) -> ServedApp:
    if app.name != name:
        raise ConfigError(f"app {app.name!r} registered under another name {name!r}")
    return GraphServedApp(app, lambda: state.runtime, max_tokens=state.settings.max_tokens)


def _chat_builder() -> Callable[[ServerState, App], ServedApp] | None:
    try:
        module = importlib.import_module(CHAT_APP_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name == CHAT_APP_MODULE:
            return None
        raise
    return module.build_served_app


def load_state(
    settings: ServerSettings,
    model: str | None = None,
    index_dir: str | Path | None = None,
    app_specs: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    **engine_config: Any,
) -> ServerState:
    """What `covey serve` runs before it listens: import the user's apps first (a typo
    fails in a second, not after the model loaded), then the model, then the index."""
    from covey.llm_backend.async_llm import AsyncLLM

    user_apps = [load_user_app(spec) for spec in app_specs]

    def say(message: str) -> None:
        if progress:
            print(f"covey serve: {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    say(f"loading the model ({model or 'embedded SmolLM2-135M-Instruct'})...")
    engine = AsyncLLM(model, **engine_config)
    say(f"model {engine.model_name} loaded in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    if index_dir is not None:  # an index the user built: open it, never build one there
        from covey.retrieval.document_index import DocumentIndex

        say(f"opening the index at {index_dir}...")
        index = DocumentIndex.open(index_dir)
    else:
        from covey.retrieval.default_corpus import default_index_dir, ensure_default_index

        say(f"opening the Python docs index at {default_index_dir()} (built on first use)...")
        index = ensure_default_index(progress=progress)
    index.search("warm up", k=1)  # loads the embedder now, not on the first request
    say(f"index ready in {time.perf_counter() - started:.1f}s")
    # The built-in apps' gens fit any --max-tokens (capped to it); a user app must fit it.
    apps = builtin_apps(settings.max_tokens)
    return build_state(engine, index, settings, apps, user_apps=user_apps)
