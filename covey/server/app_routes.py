"""The routes every served app gets: invoke, stream (server-sent events), batch, describe.

One set of routes serves every app by name, so an app added to `state.apps` is served with
no new code. Bodies are read and validated here against the app's own input model (422
naming the field; text that is not valid Unicode, such as a lone UTF-16 surrogate, and
bodies nested too deep to parse are refused the same way), after the body-size limit and
before any engine work. Each generating call holds admission slots while it runs (429 when
the server is full; a batch larger than the bound is a 422, as no retry could admit it).
A caller that goes away cancels its run: the run's engine requests are aborted and their
KV freed.

Stream events: `node` {node, kind, status: started|finished}, `token` {node, var, text,
index}, then `result` {outputs, trace}; on a failure after the stream began, `error`
{error: {type, category, message}} ends it instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from covey.errors import RuntimeExecutionError
from covey.runtime.events import Event, NodeFinished, NodeStarted, RunFinished, TokenDelta, drain
from covey.server.errors import AppNotFoundError, http_error, log_failure
from covey.server.event_stream import (
    CLIENT_GONE,
    ClientGone,
    EventStreamResponse,
    sse_frame,
    until_disconnect,
)
from covey.server.json_encoding import JsonBody, to_jsonable, trace_summary
from covey.server.metrics import ObservedRequest
from covey.server.served_app import ServedApp
from covey.server.state import ServerState

log = logging.getLogger(__name__)


def _body_doc(what: str) -> dict[str, Any]:
    schema = {"type": "object", "description": what}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


INPUTS_DOC = _body_doc("The app's inputs; GET /apps/{name} gives their JSON schema.")
BATCH_DOC = _body_doc('{"inputs": [<the app\'s inputs>, ...]}; one result per input, in order.')


def build_router(state: ServerState) -> APIRouter:
    router = APIRouter(tags=["apps"])

    @router.get("/apps", summary="The served apps")
    async def list_apps() -> dict[str, Any]:
        state.require_ready()  # 503 while loading, like every route the apps need
        apps = [
            {"name": name, "description": app.description, "inputs": _field_names(app)}
            for name, app in state.apps.items()
        ]
        return {"apps": apps}

    @router.get("/apps/{name}", summary="An app's input and output schemas and its plan")
    async def describe_app(name: str) -> dict[str, Any]:
        state.require_ready()  # while loading no app is served yet: 503, not a 404
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
        with _observed(state, name) as observed:
            app, inputs = await _prepare(state, name, request)
            with state.admission.slots(1):
                try:
                    run = await until_disconnect(request, drain(app.stream(inputs)))
                except ClientGone:
                    observed.status = CLIENT_GONE
                    return Response(status_code=CLIENT_GONE)  # nobody is left to read it
            return JsonBody(_result(run))

    @router.post(
        "/apps/{name}/stream",
        summary="Run an app, streaming node and token events (text/event-stream)",
        openapi_extra=INPUTS_DOC,
        response_class=StreamingResponse,
    )
    async def stream(name: str, request: Request) -> Response:
        with _observed(state, name) as observed:
            app, inputs = await _prepare(state, name, request)
            release = state.admission.acquire(1)
            events = aiter(app.stream(inputs))
            try:
                first = await until_disconnect(request, anext(events, None))
                if first is None:
                    raise RuntimeExecutionError(f"app {name!r} produced no events")
            except BaseException as exc:
                release()
                await _close(events)
                if isinstance(exc, ClientGone):
                    observed.status = CLIENT_GONE
                    return Response(status_code=CLIENT_GONE)
                raise
            observed.deferred = True
        run = _StreamRun(first, events, observed)

        async def on_close() -> None:  # however the response ends, even if it never began
            release()
            observed.finish(run.status)
            await _close(events)

        return EventStreamResponse(run.frames(), on_close=on_close)

    @router.post(
        "/apps/{name}/batch", summary="Run an app on several inputs", openapi_extra=BATCH_DOC
    )
    async def batch(name: str, request: Request) -> Response:
        with _observed(state, name) as observed:
            state.require_ready()
            app = _served(state, name)
            data = await _read_json(request)
            items = data.get("inputs") if isinstance(data, dict) else None
            if not isinstance(items, list):
                _invalid(("inputs",), 'the body must be {"inputs": [...]}, a list of inputs')
            if not items:
                _invalid(("inputs",), "give at least one input")
            limit = state.settings.max_fan_out
            if len(items) > limit:
                _invalid(("inputs",), f"{len(items)} inputs; a batch holds at most {limit}")
            model = app.input_model
            inputs = [_validate(model, item, ("inputs", i)) for i, item in enumerate(items)]
            with state.admission.slots(len(inputs)):
                runs = [_settled(drain(app.stream(x))) for x in inputs]
                try:
                    results = await until_disconnect(request, asyncio.gather(*runs))
                except ClientGone:
                    observed.status = CLIENT_GONE
                    return Response(status_code=CLIENT_GONE)
            return JsonBody({"results": results})

    return router


def event_frame(event: Event) -> str:
    if isinstance(event, TokenDelta):
        data = {"node": event.node, "var": event.var, "text": event.text, "index": event.index}
        return sse_frame(data, "token")
    if isinstance(event, NodeStarted | NodeFinished):
        status = "started" if isinstance(event, NodeStarted) else "finished"
        return sse_frame({"node": event.node, "kind": event.kind, "status": status}, "node")
    if isinstance(event, RunFinished):
        return sse_frame(_result(event), "result")
    return sse_frame({"type": type(event).__name__}, "event")


class _StreamRun:
    """One app stream's frames; `status` is what the request is recorded with (the client
    left, unless the run ended)."""

    def __init__(self, first: Event, events: AsyncIterator[Event], observed: ObservedRequest):
        self.first, self.events, self.observed = first, events, observed
        self.status = CLIENT_GONE

    async def frames(self) -> AsyncIterator[str]:
        try:
            event: Event | None = self.first
            while event is not None:
                yield event_frame(event)
                if isinstance(event, RunFinished):
                    self.status = 200
                    return
                event = await anext(self.events, None)
            raise RuntimeExecutionError("the run ended without a result")
        except Exception as exc:
            error = http_error(exc)
            self.status = error.status
            log_failure(f"stream of app {self.observed.app!r}", exc, error)
            yield sse_frame(error.body(), "error")


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
        log_failure("a batch element", exc, error)
        return {**error.body(), "status": error.status}


def _observed(state: ServerState, name: str) -> ObservedRequest:
    return ObservedRequest(state.metrics, name if name in state.apps else "(unknown)")


def _served(state: ServerState, name: str) -> ServedApp:
    app = state.apps.get(name)
    if app is None:
        listing = ", ".join(state.apps) or "none"
        raise AppNotFoundError(f"no app named {name!r} (apps: {listing})")
    return app


async def _prepare(state: ServerState, name: str, request: Request) -> tuple[ServedApp, BaseModel]:
    state.require_ready()
    app = _served(state, name)
    data = await _read_json(request)
    return app, _validate(app.input_model, data, ())


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _invalid((), f"the body is not valid JSON ({exc})", kind="json_invalid")
    except RecursionError:
        _invalid((), "the body is not valid JSON (nested too deep)", kind="json_invalid")
    if b"\\u" in body:  # only an escape can smuggle in a lone surrogate
        _check_unicode(data)
    return data


def _check_unicode(data: Any) -> None:
    """422 naming the first field whose text (key or value) is not valid Unicode: a lone
    UTF-16 surrogate (`"\\ud800"`) parses as JSON but can be neither tokenized nor
    written back as UTF-8. Walked without recursion: the body may be deeply nested."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, str):
            _encodable(loc, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _encodable((*loc, key), key)
                stack.append(((*loc, key), item))
        elif isinstance(value, list):
            stack.extend(((*loc, i), item) for i, item in enumerate(value))


def _encodable(loc: tuple[Any, ...], text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        _invalid(loc, f"not valid Unicode text ({exc.reason} at position {exc.start})")


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
