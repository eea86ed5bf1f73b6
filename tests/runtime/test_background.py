"""Apps called like functions: sync, awaited from another loop, streamed."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

import covey.graph as cg
from covey.errors import InvalidRequestError, ModelLoadError
from covey.llm_backend.engine_client import EngineStats
from covey.llm_backend.sampling_params import SamplingParams
from covey.runtime import BackgroundRuntime, RunFinished, TokenDelta, set_default_runtime
from tests.runtime.test_real_model import name_it as naming_fn
from tests.runtime.test_real_model import naming

from .conftest import make_cpu_engine

PONDERING = threading.Event()  # set once a run is inside `ponder`


@cg.function
async def ponder(thing: str) -> str:
    PONDERING.set()
    await asyncio.sleep(60)
    return thing


@cg.app
def slow_naming(thing: str):
    return naming_fn(thing=ponder(thing=thing))


@cg.semantic_function(params=SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))
def ramble(topic: str):
    """Write at length about {{topic}}.{{gen text}}"""


@cg.app
def long_story(topic: str):
    return ramble(topic=topic)


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


def test_closing_with_a_run_in_flight_fails_that_run_instead_of_hanging():
    runtime = BackgroundRuntime(engine=make_cpu_engine())
    errors: list[Exception] = []

    def call() -> None:
        try:
            runtime.run(slow_naming, thing="a river")
        except Exception as exc:
            errors.append(exc)

    PONDERING.clear()
    caller = threading.Thread(target=call)
    caller.start()
    # In flight: waiting in `ponder` (a fixed sleep could end before a loaded machine got
    # the run there, and a close before the call is a different refusal).
    assert PONDERING.wait(60), "the run never reached ponder"
    runtime.close()
    caller.join(timeout=10)
    assert not caller.is_alive()
    assert len(errors) == 1 and "closed while this run was in flight" in str(errors[0])


def test_a_model_that_fails_to_load_leaves_no_thread_behind():
    before = threading.active_count()
    with pytest.raises(ModelLoadError):
        BackgroundRuntime("/no/such/model.gguf")
    assert threading.active_count() == before


def test_ctrl_c_during_a_call_cancels_the_run_and_frees_its_kv(background):
    """A real SIGINT, sent to the main thread once the run's request is decoding, lands in
    the call's wait, as Ctrl-C would. (A process started in the background by a
    non-interactive shell ignores SIGINT: the test installs Python's usual handler.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_a_call(background)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_a_call(background) -> None:
    def stats() -> EngineStats:
        return background._submit(background.llm.stats()).result()

    def interrupt_when_decoding(main: int) -> None:
        while stats().num_running == 0:
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)

    before = stats()
    threading.Thread(
        target=interrupt_when_decoding, args=(threading.get_ident(),), daemon=True
    ).start()
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        long_story(topic="rivers")
    assert time.perf_counter() - started < 60  # 2000 tokens would take minutes on CPU
    after = stats()
    assert after.num_running == after.num_waiting == 0
    assert after.kv_blocks_used == before.kv_blocks_used  # the request's KV is freed
    assert naming(thing="a kite")["name"]  # and the runtime keeps serving
