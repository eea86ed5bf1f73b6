"""`create_app`: the FastAPI application around one `ServerState`.

Routes come from `ROUTER_BUILDERS`, each a `build_router(state) -> APIRouter` named by
import path, so the route families (apps, operations, the OpenAI API, the chat page) stay
in their own modules and none imports another. A family whose module is not part of this
install is skipped; an error inside one that is, is not. Every route gets the API-key
dependency, error handlers map covey's error tree to statuses, and bodies are capped before
they are read. On shutdown the engine is closed (its requests aborted).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI

import covey
from covey.server.admission import ADMISSION_KEY, Admission
from covey.server.auth import api_key, require_api_key
from covey.server.body_limit import BodyLimit
from covey.server.errors import install_error_handlers
from covey.server.metrics import ServerMetrics
from covey.server.state import ServerState

log = logging.getLogger(__name__)

ROUTER_BUILDERS: tuple[str, ...] = (
    "covey.server.ops_routes:build_router",
    "covey.server.app_routes:build_router",
    "covey.server.openai_routes:build_router",
    "covey.server.chat_page:build_router",
)

RouterBuilder = Callable[[ServerState], APIRouter]


def router_builder(spec: str) -> RouterBuilder | None:
    """The `build_router` named by `module:function`; None when the module is absent."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, attr)


def create_app(state: ServerState) -> FastAPI:
    if state.metrics is None:
        state.metrics = ServerMetrics()
    state.extras.setdefault(ADMISSION_KEY, Admission(state.settings.max_in_flight))
    state.extras["api_key"] = api_key(state.settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await _shutdown(state)

    app = FastAPI(
        title="covey",
        version=getattr(covey, "__version__", "0.1.0"),
        description="covey's apps over HTTP: a REST endpoint per app, an OpenAI-compatible "
        "API, metrics and the RAG chatbot's chat page.",
        lifespan=lifespan,
        dependencies=[Depends(require_api_key)],
    )
    app.state.covey = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_body_bytes=state.settings.max_body_bytes)
    for spec in ROUTER_BUILDERS:
        build = router_builder(spec)
        if build is not None:
            app.include_router(build(state))
    return app


async def _shutdown(state: ServerState) -> None:
    state.ready = False
    if state.runtime is not None:
        try:
            await state.runtime.unpin_all()
        except Exception as exc:  # the engine may already be gone; shutting down anyway
            log.warning("could not unpin the runtime's prefixes: %s", exc)
    if state.engine is not None:
        await state.engine.close()
