"""Build a server's state: the engine, the index, the runtime and the apps it serves.

`covey serve` loads the model (or connects to a remote OpenAI-compatible engine) and the
Python-docs index (built on first use) with progress shown, then serves the built-in apps
(rag_chatbot, advanced_rag, mapreduce_summary, tool_agent) and any user app given as
`module:obj`. The runtime reaches the engine through `MeteredEngine`, so every generation of
every app lands in the TTFT/TPOT histograms. The chatbot is served with sessions (`chat_app`).
"""

from __future__ import annotations

import asyncio
import importlib
import re
import sys
import time
from pathlib import Path
from typing import Any

from covey.apps.advanced_rag import build_advanced_rag_app
from covey.apps.mapreduce_summary import build_summary_app
from covey.apps.rag_chatbot import build_rag_app
from covey.errors import ConfigError
from covey.graph.app import App
from covey.llm_backend.engine_client import EngineClient
from covey.llm_backend.remote_engine import RemoteAuthError, RemoteEngine, check_base_url
from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
from covey.retrieval.searcher import Searcher
from covey.runtime.executor import Runtime
from covey.server.chat_app import build_served_app
from covey.server.graph_app import GraphServedApp
from covey.server.metered_engine import MeteredEngine
from covey.server.served_app import ServedApp
from covey.server.state import ServerSettings, ServerState

CHATBOT = "rag_chatbot"
# builtin_apps' names, written out so a user app's name is checked before anything is built
# (a test checks the two agree).
BUILTIN_APPS = (CHATBOT, "advanced_rag", "mapreduce_summary", "tool_agent")
# A served name is a path segment (/apps/NAME/invoke): a slash would make it unreachable,
# and other characters would need escaping in every URL.
_SERVABLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
RENAME = "rename it with @cg.app(name=...)"


def builtin_apps(
    max_tokens: int | None = None, docs: Searcher | None = None, python_docs: bool = True
) -> dict[str, App]:
    """The built-in apps; `max_tokens` caps every gen of each (small demos, tests); `docs`
    is what the tool agent's docs tool searches (None: the default index, on first use).
    `python_docs=False` (an index of the user's own) words the RAG apps' and the tool
    agent's prompts (and its docs tool) without naming Python."""

    def cap(n: int) -> int:
        return n if max_tokens is None else min(n, max_tokens)

    from covey.apps import advanced_rag, mapreduce_summary, rag_chatbot, tool_agent

    apps = [
        build_rag_app(max_tokens=cap(rag_chatbot.ANSWER_MAX_TOKENS), python_docs=python_docs),
        build_advanced_rag_app(
            subquery_max_tokens=cap(advanced_rag.SUBQUERY_MAX_TOKENS),
            answer_max_tokens=cap(advanced_rag.ANSWER_MAX_TOKENS),
            python_docs=python_docs,
        ),
        build_summary_app(
            piece_max_tokens=cap(mapreduce_summary.PIECE_MAX_TOKENS),
            summary_max_tokens=cap(mapreduce_summary.SUMMARY_MAX_TOKENS),
        ),
        tool_agent.build_tool_agent_app(
            docs, max_tokens=cap(tool_agent.ANSWER_MAX_TOKENS), python_docs=python_docs
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
    except (Exception, SystemExit) as exc:  # broken: a SyntaxError, a raise, an exit at import
        raise ConfigError(
            f"--app {spec!r}: importing {module_name!r} failed: {_described(exc)}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--app {spec!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, (App, ServedApp)) and not isinstance(obj, type):
        try:
            obj = obj()
        except (Exception, SystemExit) as exc:  # a factory that fails or exits, or needs args
            raise ConfigError(
                f"--app {spec!r}: calling {attr}() failed: {_described(exc)}; give an App, "
                "a ServedApp or a function of no arguments returning one"
            ) from exc
    if not isinstance(obj, (App, ServedApp)):
        raise ConfigError(
            f"--app {spec!r} is a {type(obj).__name__}; it must be an App (made with @app) "
            "or a ServedApp"
        )
    return obj


def load_user_apps(specs: list[str] | tuple[str, ...]) -> list[App | ServedApp]:
    """`load_user_app` of each spec, their names checked as `serve_apps` will (before the
    model loads), each error naming the spec."""
    loaded: list[App | ServedApp] = []
    for spec in specs:
        app = load_user_app(spec)
        try:
            check_app_names([*loaded, app])
        except ConfigError as exc:
            raise ConfigError(f"--app {spec!r}: {exc}") from None
        loaded.append(app)
    return loaded


def check_app_names(
    user_apps: list[App | ServedApp] | tuple[App | ServedApp, ...],
    taken: tuple[str, ...] = BUILTIN_APPS,
) -> None:
    """Each user app's name can be served, and no other app (built-in, `taken`, or an
    earlier user app) has it: the later one would silently replace it (the chat page needs
    rag_chatbot)."""
    seen: set[str] = set()
    for app in user_apps:
        name = app.name
        if not _SERVABLE_NAME.fullmatch(name):
            raise ConfigError(
                f"app name {name!r} cannot be served: it is a URL path segment "
                f"(/apps/NAME), so letters, digits, _, - and . only; {RENAME}"
            )
        if name in taken:
            served = ", ".join(taken)
            raise ConfigError(f"app name {name!r} is taken (served already: {served}); {RENAME}")
        if name in seen:
            raise ConfigError(f"app name {name!r} is given to two apps; {RENAME}")
        seen.add(name)


def _described(exc: BaseException) -> str:
    """`Type: message` on one line, as a traceback's last line reads."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


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
    `sessions=False` serves the chatbot as its plain graph."""
    state = ServerState(settings=settings or ServerSettings())
    serve_apps(state, engine, index, apps, user_apps, sessions)
    state.ready = True
    return state


def serve_apps(
    state: ServerState,
    engine: EngineClient,
    index: Searcher | None,
    apps: dict[str, App] | None = None,
    user_apps: list[App | ServedApp] | tuple[App | ServedApp, ...] = (),
    sessions: bool = True,
) -> None:
    """Put the engine, the runtime and the apps into `state`; it is not made ready here
    (`covey serve` says when: once no other thread serves it)."""
    retrievers = {DEFAULT_INDEX_NAME: index} if index is not None else {}
    state.runtime = Runtime(MeteredEngine(engine, state.metrics), retrievers=retrievers)
    state.engine = engine
    apps = builtin_apps(docs=index) if apps is None else apps
    check_app_names(user_apps, tuple(apps))
    served: dict[str, ServedApp] = {}
    for name, app in apps.items():
        served[name] = _serve_graph(state, app, name)
    if sessions and CHATBOT in apps:
        served[CHATBOT] = build_served_app(state, apps[CHATBOT])
    for app in user_apps:
        one = _serve_graph(state, app, app.name) if isinstance(app, App) else app
        served[one.name] = one
    state.apps.update(served)


def _serve_graph(state: ServerState, app: App, name: str) -> ServedApp:
    if app.name != name:
        raise ConfigError(f"app {app.name!r} registered under another name {name!r}")
    return GraphServedApp(app, lambda: state.runtime, max_tokens=state.settings.max_tokens)


def check_remote_url(url: str) -> None:
    """`--remote` is an http(s) URL: RemoteEngine's rule, said in the option's name."""
    check_base_url(url, "--remote", "http://gpu-box:8000")


def connect_remote(url: str, api_key: str | None = None) -> RemoteEngine:
    """A `RemoteEngine` on `url`'s first listed model; fails now (one line) if the server
    cannot be reached, not on the first request. It is `covey serve --remote URL
    --remote-api-key KEY`'s engine, so its errors name those options."""
    check_remote_url(url)

    async def first_model() -> str:
        async with RemoteEngine(url, api_key=api_key, tokenizer=None) as probe:
            await probe.connect()
            return probe.model_name

    try:
        model = asyncio.run(first_model())
    except RemoteAuthError as exc:
        hint = "check --remote-api-key" if api_key else "give the key with --remote-api-key"
        raise ConfigError(f"--remote {url}: {exc.refused} ({hint})") from exc
    return RemoteEngine(url, model=model, api_key=api_key)


def load_into(
    state: ServerState,
    model: str | None = None,
    index_dir: str | Path | None = None,
    user_apps: list[App | ServedApp] | tuple[App | ServedApp, ...] = (),
    remote: str | None = None,
    remote_api_key: str | None = None,
    progress: bool = True,
    engine: EngineClient | None = None,
    **engine_config: Any,
) -> None:
    """What `covey serve` loads: the model (or the remote engine at `remote`, or `engine`
    when given: `--ray`'s replicas), then the index, then the apps, into `state` (left not
    ready)."""
    from covey.llm_backend.async_llm import AsyncLLM

    def say(message: str) -> None:
        if progress:
            print(f"covey serve: {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    if engine is not None:
        say(f"engine {engine.model_name} ready")
    elif remote is not None:
        say(f"connecting to the remote engine at {remote}...")
        engine = connect_remote(remote, remote_api_key)
        say(f"remote model {engine.model_name} answers")
    else:
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
    apps = builtin_apps(state.settings.max_tokens, index, python_docs=index_dir is None)
    serve_apps(state, engine, index, apps, user_apps)


def load_state(
    settings: ServerSettings,
    model: str | None = None,
    index_dir: str | Path | None = None,
    app_specs: list[str] | tuple[str, ...] = (),
    progress: bool = True,
    **engine_config: Any,
) -> ServerState:
    """A ready state loaded as `covey serve` loads it: the user's apps imported first (a
    typo fails in a second, not after the model loaded), then the model and the index."""
    user_apps = load_user_apps(app_specs)
    state = ServerState(settings=settings)
    load_into(state, model, index_dir, user_apps, progress=progress, **engine_config)
    state.ready = True
    return state
