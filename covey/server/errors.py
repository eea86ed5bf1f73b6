"""HTTP errors from covey's error tree: the server maps an error's category, never its class.

Every failure a caller can see leaves as one JSON body, `{"error": {"type", "category",
"message"}}`, with the category's status: 4xx for the caller's fault, 429 (with
Retry-After) or 503 when there is no room or a part is down, 500 for a failure inside covey
(a node's failure names the node). A route family with its own error shape (OpenAI's
`/v1`) registers a formatter for its path prefix in `state.extras["error_shapes"]`, so the
same mapping serves both. An unexpected exception is logged and answered 500 with a
generic message; the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from covey.errors import CoveyError, ErrorCategory, InvalidRequestError, NodeExecutionError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the caller to wait before trying again
ERROR_SHAPES_KEY = "error_shapes"


class PayloadTooLargeError(InvalidRequestError):
    """A request body past the server's size limit (413, not 400: the size is the fault)."""

    http_status = 413


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
        return HttpError(exc.status_code, "HTTPError", category, str(exc.detail), headers)
    return HttpError(500, "InternalError", "internal", "internal server error (logged)", {})


def validation_message(errors: Any) -> str:
    """`field.path: what is wrong` for each error, so the caller sees which field to fix."""
    parts = []
    for err in list(errors)[:8]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def error_response(request: Request, error: HttpError) -> JSONResponse:
    """The JSON response for `error`, in the shape of the route family that was called."""
    shapes: dict[str, ErrorShape] = {}
    state = getattr(request.app.state, "covey", None)
    if state is not None:
        shapes = state.extras.get(ERROR_SHAPES_KEY, {})
    body = error.body()
    for prefix, shape in shapes.items():
        if request.url.path.startswith(prefix):
            body = shape(error)
            break
    return JSONResponse(body, status_code=error.status, headers=error.headers or None)


def install_error_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        error = http_error(exc)
        if error.status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error_response(request, error)

    for kind in (CoveyError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, on_error)
