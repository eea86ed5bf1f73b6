"""Apps called like functions: sync, awaited from another loop, streamed."""

from __future__ import annotations

import asyncio

import pytest

from covey.errors import InvalidRequestError
from covey.runtime import BackgroundRuntime, RunFinished, TokenDelta, set_default_runtime
from tests.runtime.test_real_model import naming

from .conftest import make_cpu_engine


@pytest.fixture(scope="module")
def background():
    runtime = BackgroundRuntime(engine=make_cpu_engine())
    previous = set_default_runtime(runtime)
    yield runtime
    set_default_runtime(previous)
    runtime.close()


def test_sync_call_equals_awaited_call_and_stream(background):
    out = naming(thing="a red bicycle")
    assert set(out) == {"name", "text"} and all(out.values())

    async def other_loop():
        awaited = await naming.acall(thing="a red bicycle")
        events = [e async for e in naming.stream(thing="a red bicycle")]
        return awaited, events

    awaited, events = asyncio.run(other_loop())
    assert awaited == out
    assert isinstance(events[-1], RunFinished) and events[-1].outputs == out
    text = "".join(e.text for e in events if isinstance(e, TokenDelta) and e.var == "describe.text")
    assert text == out["text"]


def test_errors_reach_the_caller_and_the_runtime_keeps_serving(background):
    with pytest.raises(InvalidRequestError, match="missing"):
        naming()
    assert naming(thing="a kite")["name"]


def test_a_closed_runtime_refuses_calls():
    runtime = BackgroundRuntime(engine=make_cpu_engine())
    runtime.close()
    with pytest.raises(Exception, match="closed"):
        runtime.run(naming, thing="x")
