"""HTTP errors from covey's error tree: the server maps an error's category, never its class.

Every failure a caller can see leaves as one JSON body, `{"error": {"type", "category",
"message"}}`, with the category's status: 4xx for the caller's fault, 429 (with
Retry-After) or 503 when there is no room or a part is down, 500 for a failure inside covey
(a node's failure names the node). A route family with its own error shape (OpenAI's
`/v1`) registers a formatter for its path prefix in `state.error_shapes`, so the same
mapping serves both. A failure inside covey (500) or an unexpected exception is logged with
its traceback and answered with a generic message; a 503 (still loading, engine gone) is
logged as one line. The server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from covey.errors import CoveyError, ErrorCategory, NodeExecutionError
from covey.server.json_encoding import JsonBody

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the caller to wait before trying again


class PayloadTooLargeError(StarletteHTTPException):
    """A request body past the server's size limit (413, not 400: the size is the fault).

    An HTTPException rather than a `CoveyError`, because FastAPI turns any other exception
    raised while it reads a body into a generic 400, and lets only HTTPExceptions through."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


class AppNotFoundError(CoveyError):
    """No served app has that name (404)."""

    category = ErrorCategory.NOT_FOUND


class AuthenticationError(CoveyError):
    """A missing or wrong bearer token (401)."""

    category = ErrorCategory.INVALID
    http_status = 401


@dataclass(frozen=True)
class HttpError:
    """What a failure looks like on the wire, before a route family shapes the body."""

    status: int
    type: str
    category: str
    message: str
    headers: dict[str, str]

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "category": self.category, "message": self.message}}


# A formatter turns an HttpError into the JSON body of a route family (e.g. OpenAI's shape).
ErrorShape = Callable[[HttpError], dict[str, Any]]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def http_error(exc: BaseException) -> HttpError:
    """The status, labels and message a failure is answered with."""
    if isinstance(exc, CoveyError):
        category = exc.category
        status = getattr(exc, "http_status", None) or category.http_status
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
        if isinstance(exc, AuthenticationError):
            headers["WWW-Authenticate"] = "Bearer"
        message = _one_line(str(exc)) or type(exc).__name__
        if isinstance(exc, NodeExecutionError) and exc.node not in message:
            message = f"node {exc.node!r}: {message}"
        label = "unauthorized" if isinstance(exc, AuthenticationError) else category.label
        return HttpError(status, type(exc).__name__, label, message, headers)
    if isinstance(exc, RequestValidationError):
        return HttpError(422, "ValidationError", "invalid", validation_message(exc.errors()), {})
    if isinstance(exc, StarletteHTTPException):
        category = "not_found" if exc.status_code == 404 else "invalid"
        if exc.status_code >= 500:
            category = "internal"
        headers = dict(exc.headers or {})
        kind = "PayloadTooLargeError" if isinstance(exc, PayloadTooLargeError) else "HTTPError"
        return HttpError(exc.status_code, kind, category, str(exc.detail), headers)
    return HttpError(500, "InternalError", "internal", "internal server error (logged)", {})


def validation_message(errors: Any) -> str:
    """`field.path: what is wrong` for each error, so the caller sees which field to fix."""
    parts = []
    for err in list(errors)[:8]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def error_response(request: Request, error: HttpError) -> JsonBody:
    """The JSON response for `error`, in the shape of the route family that was called."""
    state = getattr(request.app.state, "covey", None)
    shapes: dict[str, ErrorShape] = state.error_shapes if state is not None else {}
    body = error.body()
    for prefix, shape in shapes.items():
        if request.url.path.startswith(prefix):
            body = shape(error)
            break
    # ASCII-only JSON: a message may quote what the caller sent, lone surrogates included.
    return JsonBody(body, status_code=error.status, headers=error.headers or None)


def log_failure(what: str, exc: BaseException, error: HttpError) -> None:
    """A failure inside covey (500, or any exception outside the error tree) with its
    traceback; an unavailable or overloaded engine (503) as one line; a caller's mistake
    not at all (the caller is told)."""
    known = CoveyError | StarletteHTTPException | RequestValidationError
    if error.status == 500 or not isinstance(exc, known):
        log.error("%s failed: %s", what, exc, exc_info=exc)
    elif error.status >= 500:
        log.warning("%s: %s", what, error.message)


def install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JsonBody:
        error = http_error(exc)
        if request.url.path != "/readyz":  # its 503 is its answer while loading
            log_failure(f"{request.method} {request.url.path}", exc, error)
        return error_response(request, error)

    for kind in (CoveyError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, on_error)
