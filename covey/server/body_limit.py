"""`BodyLimit`: refuse request bodies past `max_body_bytes` before reading them whole.

A declared Content-Length past the limit is answered 413 without buffering the body (it is
read and dropped, up to DRAIN_BYTES, so the client gets the answer); a chunked body is counted
as it arrives and cut off at the limit (raising `PayloadTooLargeError`, which every route,
FastAPI's own body parsing included, answers 413), so no caller can make the server buffer
more. Pure ASGI so it also guards routes that read the body themselves.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from covey.server.errors import PayloadTooLargeError

# A refused body up to this size is read (and dropped) before the 413 goes out.
DRAIN_BYTES = 16 << 20


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(receive, min(int(declared), DRAIN_BYTES))
            await _refuse(send, limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLargeError(_message(limit))
            return message

        await self.app(scope, counted, send)


async def _drain(receive: Receive, most: int) -> None:
    """Read and drop up to `most` bytes of a refused body. Closing the connection with the
    client's body still unread makes the kernel reset it, and the client then loses the 413
    (it reads a reset instead); past `most` bytes the reset is the lesser evil."""
    seen = 0
    while seen < most:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _message(limit: int) -> str:
    return f"the request body is larger than this server's limit of {limit} bytes"


async def _refuse(send: Send, limit: int) -> None:
    error = {"type": "PayloadTooLargeError", "category": "invalid", "message": _message(limit)}
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})
