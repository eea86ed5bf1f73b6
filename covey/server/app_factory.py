"""`create_app`: the FastAPI application around one `ServerState`.

The route families (apps, operations, the OpenAI API, the chat page) live in their own
modules, each a `build_router(state)`, and none imports another. Every route gets the
API-key dependency, error handlers map covey's error tree to statuses, and bodies are capped
before they are read. On shutdown the served apps that keep state are closed (the chatbot's
pinned sessions and their idle timers), then the engine (its requests aborted).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

import covey
from covey.server import app_routes, chat_page, openai_routes, ops_routes
from covey.server.auth import api_key, require_api_key
from covey.server.body_limit import BodyLimit
from covey.server.errors import install_error_handlers
from covey.server.state import ServerState

log = logging.getLogger(__name__)

ROUTE_FAMILIES = (ops_routes, app_routes, openai_routes, chat_page)


def create_app(state: ServerState) -> FastAPI:
    state.api_key = api_key(state.settings)

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
    for family in ROUTE_FAMILIES:
        app.include_router(family.build_router(state))
    return app


async def _shutdown(state: ServerState) -> None:
    state.ready = False
    for name, served in state.apps.items():
        close = getattr(served, "close", None)  # a ServedApp that keeps state has one
        if close is not None:
            try:
                await close()
            except Exception as exc:  # shutting down anyway
                log.warning("could not close app %r: %s", name, exc)
    if state.runtime is not None:
        try:
            await state.runtime.unpin_all()
        except Exception as exc:  # the engine may already be gone; shutting down anyway
            log.warning("could not unpin the runtime's prefixes: %s", exc)
    if state.engine is not None:
        await state.engine.close()
