"""Server-sent events, and work that stops when its client leaves.

Every streaming route (an app's stream, the OpenAI API's `stream: true`) needs the same
things from its response: the run behind it cancelled the moment the client disconnects
(so its engine requests abort and free their KV), its generator closed however the
response ends, and its resources (admission slots, the request's metrics) given back even
when the generator never started (a client gone before the first byte). A plain request
needs the first of these too: `until_disconnect` runs its work unless the client leaves.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # nginx's code for "the client closed the request"; only metrics see it

T = TypeVar("T")
OnClose = Callable[[], Awaitable[None] | None]


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nobody is left to answer."""


def sse_frame(data: Any, event: str | None = None) -> str:
    """One event; `data` is written as ASCII-only JSON, so any text (even a lone surrogate
    from a model's output) encodes."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events from `events` (str frames) that stop as soon as the client
    disconnects, then close `events` and run `on_close` (sync or async), whatever happened.

    Starlette cancels a stream on disconnect through an anyio cancel scope, which skips a
    task whose wake-up is already due; with the engine stepping on the event loop, a
    stream woken by a token every step is always due, so the cancellation never lands and
    the run goes on to the end. A plain task cancel always lands. The event generator is
    closed however the response ends (Starlette would leave one suspended at a `yield`)."""

    def __init__(self, events: AsyncIterator[str], on_close: OnClose | None = None) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._respond(receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels a stream still running when its graceful shutdown times out
            # (Ctrl-C). The run is closed by now and nobody waits for an answer: end here,
            # rather than have the server log the cancellation as a failure.
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                raise
            task.uncancel()

    async def _respond(self, receive: Any, send: Any) -> None:
        try:
            streaming = asyncio.ensure_future(self.stream_response(send))
            watching = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watching.cancel()
                if not streaming.done():
                    streaming.cancel()
                    await asyncio.gather(streaming, return_exceptions=True)
        finally:
            try:
                close = getattr(self._events, "aclose", None)
                if close is not None:
                    await close()
            finally:
                if self._on_close is not None:
                    result = self._on_close()
                    if inspect.isawaitable(result):
                        await result
        error = None if streaming.cancelled() else streaming.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the client left
            raise error


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (aborting its
    engine requests) and `ClientGone` raised. The body must have been read already."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone("the client disconnected")
    return task.result()


async def _disconnected(receive: Any) -> None:
    """Return once the client has gone (the body was read before: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass
