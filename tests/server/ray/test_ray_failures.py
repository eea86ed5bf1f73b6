"""Killing an engine replica mid-run: the request it was streaming fails with a clear 503,
one it had not started is retried once on the other replica, the service keeps serving,
and Ray Serve brings the replica back, which the router then uses again from empty."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from covey.errors import EngineUnavailableError
from covey.llm_backend.sampling_params import SamplingParams
from covey.server.errors import http_error
from covey.server.ray_engine import RayEngine
from covey.server.replica_router import ReplicaRouter, route_key

_key = route_key

PREFIX = "Write a long story about a lighthouse keeper who finds a message in a bottle. " * 4
LONG_PROMPT = " ".join(f"Item {i} of the inventory is a brass lamp." for i in range(200))
REPLACED_TIMEOUT_S = 180


def engine_over(replicas) -> RayEngine:
    """A RayEngine with no report loop running: it learns of a death only from a call."""
    return RayEngine(replicas, ReplicaRouter(list(replicas)), report_interval_s=3600)


async def collect(engine: RayEngine, prompt: str, max_tokens: int, rid: str) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    outs = [out async for out in engine.generate(prompt, params, request_id=rid)]
    return outs[-1].text


def test_a_killed_replica_fails_or_retries_its_requests_and_is_replaced(ray_replicas, ray_server):
    async def scenario() -> None:
        streaming, retrying = engine_over(ray_replicas), engine_over(ray_replicas)
        await streaming.connect()
        await retrying.connect()
        # Both engines start empty and idle: each sends its first call to the same replica.
        victim = streaming.router.choose(_key(PREFIX), remember=False)[0]
        assert retrying.router.choose(_key(PREFIX), remember=False)[0] == victim
        pid = streaming.replicas[victim].pid
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        stream = streaming.generate(PREFIX, long, request_id="long")
        first = await anext(stream)  # it has streamed: it cannot be retried
        assert not first.finished
        # A long prompt still in prefill there when the replica dies: nothing streamed yet.
        unstarted = asyncio.ensure_future(collect(retrying, LONG_PROMPT, 4, "unstarted"))
        await asyncio.sleep(0.5)
        assert not unstarted.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailableError, match=f"{victim} died while serving") as err:
            async for _ in stream:
                pass
        assert http_error(err.value).status == 503
        assert streaming.replicas[victim].failed == 1 and not streaming.replicas[victim].up
        assert streaming.router.views[victim].held_chars == 0  # forgotten
        # Retried once on the other replica; the same greedy answer as a fresh run there.
        answer = await unstarted
        assert retrying.replicas[victim].retries == 1
        assert answer and answer == await collect(streaming, LONG_PROMPT, 4, "again")
        # Ray Serve replaces it; the next report puts it back in the set.
        deadline = time.monotonic() + REPLACED_TIMEOUT_S
        while not streaming.replicas[victim].up:
            assert time.monotonic() < deadline, "the dead replica was not replaced"
            await asyncio.sleep(1.0)
            await streaming.stats()
        assert streaming.replicas[victim].pid != pid
        await streaming.close()
        await retrying.close()

    asyncio.run(scenario())
    # The HTTP service on the same replicas kept serving throughout.
    with ray_server.client() as client:
        model = ray_server.state.engine.model_name
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        metrics = client.get("/metrics").text
    assert "covey_replica_deaths_total" in metrics
