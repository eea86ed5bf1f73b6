"""`Runtime.stream`: node events in dependency order, output token deltas, early close."""

from __future__ import annotations

import asyncio

from covey.runtime import NodeFinished, NodeStarted, RunFinished, Runtime, TokenDelta
from tests.graph import shapes

from .fakes import FakeLLM


async def test_events_follow_the_run_and_deltas_add_up_to_the_outputs():
    llm = FakeLLM(reply=lambda p: "q1" if "rewrite" in p else "one two three")
    events = [e async for e in Runtime(llm).stream(shapes.tool_chain(), question="why?")]
    assert isinstance(events[-1], RunFinished)
    assert events[-1].outputs == {"reply": "one two three"}
    order = [
        (type(e).__name__, e.node) for e in events if isinstance(e, NodeStarted | NodeFinished)
    ]
    assert order == [
        ("NodeStarted", "rewrite"),
        ("NodeFinished", "rewrite"),
        ("NodeStarted", "lookup"),
        ("NodeFinished", "lookup"),
        ("NodeStarted", "bullet"),
        ("NodeFinished", "bullet"),
        ("NodeStarted", "reply"),
        ("NodeFinished", "reply"),
    ]
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    # Only app outputs stream: rewrite's query is internal.
    assert {d.var for d in deltas} == {"reply.reply"}
    assert "".join(d.text for d in deltas) == "one two three" and len(deltas) == 3
    started = next(
        i for i, e in enumerate(events) if isinstance(e, NodeStarted) and e.node == "reply"
    )
    finished = next(
        i for i, e in enumerate(events) if isinstance(e, NodeFinished) and e.node == "reply"
    )
    assert all(started < events.index(d) < finished for d in deltas)
    assert events[finished].outputs == {"reply": "one two three"}


async def test_closing_the_stream_early_cancels_the_run():
    llm = FakeLLM(reply=lambda p: " ".join(["w"] * 64), token_delay=0.02)
    stream = Runtime(llm).stream(shapes.branch(), question="q")
    async for event in stream:
        if isinstance(event, TokenDelta):
            break
    await stream.aclose()
    await asyncio.sleep(0)
    assert len(llm.aborted) == 2
    assert sorted(e for e, _, _ in llm.log) == ["finish"] * 2 + ["submit"] * 2
