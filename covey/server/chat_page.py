"""The chat page at `/`: a static page that talks to the rag_chatbot stream endpoint.

Plain HTML, JavaScript and CSS from `covey/server/static/`, with no build step, so the page
ships inside the package and works offline. The page streams
`POST /apps/rag_chatbot/stream`, keeps the session id the server returns in localStorage
and forgets it through `POST /apps/rag_chatbot/reset`, which this router also serves (the
generic app routes know nothing of sessions). The page and its assets need no API key;
the endpoints it calls do, and the page asks for one when the server answers 401.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from covey.server.chat_app import NAME, ChatServedApp, ResetInputs
from covey.server.errors import AppNotFoundError
from covey.server.state import ServerState

STATIC_DIR = Path(__file__).parent / "static"
ASSETS = {"chat.js": "text/javascript", "chat.css": "text/css", "favicon.svg": "image/svg+xml"}
NO_CACHE = {"Cache-Control": "no-cache"}  # a new covey version's page is seen at once


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter(tags=["chat page"])

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=NO_CACHE)

    @router.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise AppNotFoundError(f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)

    @router.post(f"/apps/{NAME}/reset", summary="Forget a chat session and release its KV")
    async def reset(body: ResetInputs) -> dict[str, Any]:
        state.require_ready()
        chat = state.apps.get(NAME)
        if not isinstance(chat, ChatServedApp):
            raise AppNotFoundError(f"this server serves no chat sessions (no {NAME!r} with them)")
        existed = await chat.reset(body.session_id)
        return {"session_id": body.session_id, "reset": existed}

    return router
