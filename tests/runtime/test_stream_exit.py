"""Leaving `app.stream(...)` early, on the embedded model: the run is cancelled, its KV is
freed by the time the stream is closed, and nothing is printed or warned about.

`long_story` ignores EOS for 2000 tokens, minutes on CPU: a run still holding KV when the
checks run was not cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from contextlib import aclosing

import pytest

from covey.llm_backend.engine_client import EngineStats
from covey.runtime import BackgroundRuntime, NodeStarted, TokenDelta, set_default_runtime
from tests.runtime.test_background import long_story

from .conftest import make_cpu_engine

NOISE = ("never retrieved", "Event loop is closed", "was destroyed", "Traceback")


@pytest.fixture(scope="module")
def background():
    runtime = BackgroundRuntime(engine=make_cpu_engine())
    previous = set_default_runtime(runtime)
    yield runtime
    set_default_runtime(previous)
    runtime.close()


def _stats(runtime: BackgroundRuntime) -> EngineStats:
    return runtime._submit(runtime.llm.stats()).result()


def _assert_idle(runtime: BackgroundRuntime, before: EngineStats) -> None:
    after = _stats(runtime)
    assert after.num_running == after.num_waiting == 0
    assert after.kv_blocks_used == before.kv_blocks_used == 0
    assert not runtime.llm._streams  # every engine stream of the run has ended


def _assert_quiet(caught, caplog, capfd) -> None:
    gc.collect()  # anything left unfinished would complain now
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    err = capfd.readouterr().err
    assert not [n for n in NOISE if n in err], err


def test_break_then_asyncio_run_ends_frees_the_kv_at_once_and_is_quiet(
    background, caplog, capfd
):
    before = _stats(background)

    async def first_token() -> str:
        async for event in long_story.stream("rivers"):  # positional, like a function
            if isinstance(event, TokenDelta):
                return event.text  # leaves the loop; asyncio.run then closes the stream
        raise AssertionError("no token")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert asyncio.run(first_token())
        _assert_idle(background, before)  # no sleep: closing waited for the cleanup
        _assert_quiet(caught, caplog, capfd)


def test_aclose_and_a_cancelled_caller_both_free_the_kv_before_returning(
    background, caplog, capfd
):
    before = _stats(background)

    async def leave_with_aclose() -> None:
        async with aclosing(long_story.stream(topic="rivers")) as events:
            async for event in events:
                if isinstance(event, TokenDelta):
                    break
        _assert_idle(background, before)  # still inside the caller's loop

    async def cancelled_caller() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for event in long_story.stream(topic="lakes"):
                if isinstance(event, NodeStarted):
                    started.set()

        task = asyncio.ensure_future(consume())
        await started.wait()
        await asyncio.sleep(0.2)  # decoding by now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        _assert_idle(background, before)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(leave_with_aclose())
        asyncio.run(cancelled_caller())
        _assert_quiet(caught, caplog, capfd)
