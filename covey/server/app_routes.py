"""The routes every served app gets: invoke, stream (server-sent events), batch, describe.

One set of routes serves every app by name, so an app added to `state.apps` is served with
no new code. Bodies are read and validated here against the app's own input model (422
naming the field), after the body-size limit and before any engine work. Each generating
call holds admission slots while it runs (429 when the server is full). A caller that
goes away cancels its run: the run's engine requests are aborted and their KV freed.

Stream events: `node` {node, kind, status: started|finished}, `token` {node, var, text,
index}, then `result` {outputs, trace}; on a failure after the stream began, `error`
{error: {type, category, message}} ends it instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from covey.errors import EngineUnavailableError, RuntimeExecutionError
from covey.runtime.events import Event, NodeFinished, NodeStarted, RunFinished, TokenDelta, drain
from covey.server.admission import ADMISSION_KEY, Admission, Release
from covey.server.errors import AppNotFoundError, http_error
from covey.server.event_stream import SSE_HEADERS, EventStreamResponse, disconnected
from covey.server.json_encoding import dumps, to_jsonable, trace_summary
from covey.server.served_app import ServedApp
from covey.server.state import ServerState

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's code for "the client closed the request"; only metrics see it


def _body_doc(what: str) -> dict[str, Any]:
    schema = {"type": "object", "description": what}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


INPUTS_DOC = _body_doc("The app's inputs; GET /apps/{name} gives their JSON schema.")
BATCH_DOC = _body_doc('{"inputs": [<the app\'s inputs>, ...]}; one result per input, in order.')


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter(tags=["apps"])

    @router.get("/apps", summary="The served apps")
    async def list_apps() -> dict[str, Any]:
        apps = [
            {"name": name, "description": app.description, "inputs": _field_names(app)}
            for name, app in state.apps.items()
        ]
        return {"apps": apps}

    @router.get("/apps/{name}", summary="An app's input and output schemas and its plan")
    async def describe_app(name: str) -> dict[str, Any]:
        app = _served(state, name)
        return {
            "name": name,
            "description": app.description,
            "input_schema": app.input_model.model_json_schema(),
            "output_schema": app.output_model.model_json_schema(),
            **to_jsonable(app.describe()),
        }

    @router.post("/apps/{name}/invoke", summary="Run an app once", openapi_extra=INPUTS_DOC)
    async def invoke(name: str, request: Request) -> Response:
        with _Observed(state, name) as observed:
            app, inputs = await _prepare(state, name, request)
            with _Admitted(state, 1):
                run = await _unless_gone(request, drain(app.stream(inputs)))
            if run is None:
                observed.status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            return JSONResponse(_result(run))

    @router.post(
        "/apps/{name}/stream",
        summary="Run an app, streaming node and token events (text/event-stream)",
        openapi_extra=INPUTS_DOC,
        response_class=StreamingResponse,
    )
    async def stream(name: str, request: Request) -> Response:
        observed = _Observed(state, name)
        with observed:
            app, inputs = await _prepare(state, name, request)
            release = _admission(state).acquire(1)
            try:
                events = aiter(app.stream(inputs))
                first = await anext(events, None)
            except BaseException:
                release()
                raise
            if first is None:
                release()
                raise RuntimeExecutionError(f"app {name!r} produced no events")
            observed.deferred = True
        body = _sse(first, events, release, observed)
        return EventStreamResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)

    @router.post(
        "/apps/{name}/batch", summary="Run an app on several inputs", openapi_extra=BATCH_DOC
    )
    async def batch(name: str, request: Request) -> Response:
        with _Observed(state, name) as observed:
            app = _served(state, name)
            _check_ready(state)
            data = await _read_json(request)
            items = data.get("inputs") if isinstance(data, dict) else None
            if not isinstance(items, list):
                _invalid(("inputs",), 'the body must be {"inputs": [...]}, a list of inputs')
            if not items:
                _invalid(("inputs",), "give at least one input")
            limit = state.settings.max_batch
            if len(items) > limit:
                _invalid(("inputs",), f"{len(items)} inputs; a batch holds at most {limit}")
            model = app.input_model
            inputs = [_validate(model, item, ("inputs", i)) for i, item in enumerate(items)]
            with _Admitted(state, len(inputs)):
                runs = [_settled(drain(app.stream(x))) for x in inputs]
                results = await _unless_gone(request, asyncio.gather(*runs))
            if results is None:
                observed.status = CLIENT_GONE
                return Response(status_code=CLIENT_GONE)
            return JSONResponse({"results": results})

    return router


def sse_event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {dumps(data)}\n\n"


def event_frame(event: Event) -> str:
    if isinstance(event, TokenDelta):
        data = {"node": event.node, "var": event.var, "text": event.text, "index": event.index}
        return sse_event("token", data)
    if isinstance(event, NodeStarted | NodeFinished):
        status = "started" if isinstance(event, NodeStarted) else "finished"
        return sse_event("node", {"node": event.node, "kind": event.kind, "status": status})
    if isinstance(event, RunFinished):
        return sse_event("result", _result(event))
    return sse_event("event", {"type": type(event).__name__})


async def _sse(
    first: Event, events: AsyncIterator[Event], release: Release, observed: _Observed
) -> AsyncIterator[str]:
    status = CLIENT_GONE  # unless the run ends, the caller left
    try:
        event: Event | None = first
        while event is not None:
            yield event_frame(event)
            if isinstance(event, RunFinished):
                status = 200
                return
            event = await anext(events, None)
        raise RuntimeExecutionError("the run ended without a result")
    except Exception as exc:
        error = http_error(exc)
        status = error.status
        if status >= 500:
            log.error("stream of app %r failed: %s", observed.app, exc, exc_info=exc)
        yield sse_event("error", error.body())
    finally:
        release()
        observed.finish(status)
        await _close(events)


async def _close(events: AsyncIterator[Event]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


def _result(run: RunFinished) -> dict[str, Any]:
    return {"outputs": to_jsonable(run.outputs), "trace": trace_summary(run.trace)}


async def _settled(run: Awaitable[RunFinished]) -> dict[str, Any]:
    """One batch element's result, or its error: one bad input does not fail the batch."""
    try:
        return _result(await run)
    except Exception as exc:
        error = http_error(exc)
        if error.status >= 500:
            log.error("a batch element failed: %s", exc, exc_info=exc)
        return {**error.body(), "status": error.status}


async def _unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or None once the client has disconnected (the work is cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


class _Observed:
    """Times one app request and records it once with its final status."""

    def __init__(self, state: ServerState, app: str) -> None:
        self.state = state
        self.app = app if app in state.apps else "(unknown)"
        self.status = 200
        self.started = time.perf_counter()
        self.done = False
        self.deferred = False  # a stream records itself when its last event is sent

    def __enter__(self) -> _Observed:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.finish(http_error(exc).status if isinstance(exc, Exception) else CLIENT_GONE)
        elif not self.deferred:
            self.finish(self.status)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        if self.state.metrics is not None:
            self.state.metrics.observe_request(self.app, status, time.perf_counter() - self.started)


class _Admitted:
    """Hold `n` admission slots for a block (429 when the server is full)."""

    def __init__(self, state: ServerState, n: int) -> None:
        self.release = _admission(state).acquire(n)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.release()


def _admission(state: ServerState) -> Admission:
    admission = state.extras.get(ADMISSION_KEY)
    if admission is None:
        admission = state.extras[ADMISSION_KEY] = Admission(state.settings.max_in_flight)
    return admission


def _served(state: ServerState, name: str) -> ServedApp:
    app = state.apps.get(name)
    if app is None:
        listing = ", ".join(state.apps) or "none"
        raise AppNotFoundError(f"no app named {name!r} (apps: {listing})")
    return app


def _check_ready(state: ServerState) -> None:
    if not state.ready:
        raise EngineUnavailableError("the server is still loading its model and index")


async def _prepare(state: ServerState, name: str, request: Request) -> tuple[ServedApp, BaseModel]:
    app = _served(state, name)
    _check_ready(state)
    data = await _read_json(request)
    return app, _validate(app.input_model, data, ())


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _invalid((), f"the body is not valid JSON ({exc})", kind="json_invalid")


def _validate(model: type[BaseModel], data: Any, loc: tuple[Any, ...]) -> BaseModel:
    if not isinstance(data, dict):
        _invalid(loc, f"expected a JSON object of inputs, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": (*loc, *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _invalid(loc: tuple[Any, ...], message: str, kind: str = "value_error") -> Any:
    raise RequestValidationError([{"type": kind, "loc": loc, "msg": message}])


def _field_names(app: ServedApp) -> list[str]:
    return list(app.input_model.model_fields)
