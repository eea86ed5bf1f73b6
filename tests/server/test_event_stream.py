"""`EventStreamResponse` gives a stream's resources back however its response ends, even
when the client is gone before the first byte (so its generator never starts)."""

from __future__ import annotations

import asyncio

from covey.server.event_stream import EventStreamResponse


async def test_on_close_runs_when_the_stream_never_starts():
    started, closed = [], []

    async def events():
        started.append(True)
        yield "data: 1\n\n"

    async def send(message):
        raise OSError("the client is gone")  # the response start cannot be sent

    async def receive():
        await asyncio.Event().wait()  # no disconnect message: the send fails first

    async def on_close():
        closed.append(True)

    await EventStreamResponse(events(), on_close=on_close)({"type": "http"}, receive, send)
    assert started == [] and closed == [True]


async def test_on_close_runs_once_a_client_disconnects_mid_stream():
    sent, closed = [], []
    more = asyncio.Event()

    async def events():
        yield "data: 1\n\n"
        await more.wait()  # the run would go on; the client leaves instead
        yield "data: 2\n\n"

    async def send(message):
        sent.append(message)

    async def receive():
        while len(sent) < 2:  # the start and the first event went out
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    await EventStreamResponse(events(), on_close=lambda: closed.append(True))(
        {"type": "http"}, receive, send
    )
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n"] and closed == [True]
