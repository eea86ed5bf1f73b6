"""Operations: liveness, readiness and Prometheus metrics.

`/healthz` answers as long as the process serves HTTP, model loading included; `/readyz`
only once the model and index are loaded (503 before, so a load balancer holds traffic
back); `/metrics` reads the engine's load when scraped (once it is loaded), then renders
every counter.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from covey.server.metrics import CONTENT_TYPE
from covey.server.state import ServerState


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: the server answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: the model and index are loaded (503 before)")
    async def readyz() -> dict[str, Any]:
        engine = state.require_ready()
        return {"status": "ready", "model": engine.model_name, "apps": list(state.apps)}

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}}},
    )
    async def metrics() -> Response:
        if state.ready and state.engine is not None:
            await state.metrics.refresh(state.engine)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return router
