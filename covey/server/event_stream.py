"""`EventStreamResponse`: server-sent events that stop their work when the client leaves.

Every streaming route (an app's stream, the OpenAI API's `stream: true`) needs the same
two things from its response: the run behind it cancelled the moment the client
disconnects (so its engine requests abort and free their KV), and its generator closed
however the response ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that stops its run as soon as the client disconnects.

    Starlette cancels a stream on disconnect through an anyio cancel scope, which skips a
    task whose wake-up is already due; with the engine stepping on the event loop, a
    stream woken by a token every step is always due, so the cancellation never lands and
    the run goes on to the end. A plain task cancel always lands. The event generator is
    closed however the response ends (Starlette would leave one suspended at a `yield`)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not streaming.done():
                streaming.cancel()
                await asyncio.gather(streaming, return_exceptions=True)
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()
        error = None if streaming.cancelled() else streaming.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the client left
            raise error


async def disconnected(receive: Any) -> None:
    """Return once the client has gone (the body was read before: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass
