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
from covey.server.ray_deployment import running_replicas
from covey.server.ray_engine import RayEngine
from covey.server.replica_router import ReplicaRouter, route_key

_key = route_key

PREFIX = "Write a long story about a lighthouse keeper who finds a message in a bottle. " * 4
LONG_PROMPT = " ".join(f"Item {i} of the inventory is a brass lamp." for i in range(200))
REPLACED_TIMEOUT_S = 180
IDLE_PREFIX = "Describe the daily routine of a harbour pilot guiding ships into port. " * 4
# Well under what a replacement takes to start and load the model, well over the liveness
# check's latency (Serve's health check period, 2 s, plus one liveness round, 1 s).
IDLE_DEATH_BOUND_S = 30


def engine_over(replicas) -> RayEngine:
    """A RayEngine with no report loop running: it learns of a death only from a call."""
    return RayEngine(replicas, ReplicaRouter(list(replicas)), report_interval_s=3600)


async def collect(engine: RayEngine, prompt: str, max_tokens: int, rid: str) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    outs = [out async for out in engine.generate(prompt, params, request_id=rid)]
    return outs[-1].text


def test_a_killed_replica_fails_or_retries_its_requests_and_is_replaced(ray_replicas, ray_server):
    def chat() -> str:
        """One HTTP chat completion through the server on the same replicas: its status,
        and the body too when it failed (which replica, what error)."""
        model = ray_server.state.engine.model_name
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        with ray_server.client() as client:
            reply = client.post("/v1/chat/completions", json=body)
        return "200" if reply.status_code == 200 else f"{reply.status_code} {reply.text}"

    def deaths_of(victim: str) -> float:
        with ray_server.client() as client:
            metrics = client.get("/metrics").text
        line = f'covey_replica_deaths_total{{replica="{victim}"}} '
        (value,) = [ln[len(line) :] for ln in metrics.splitlines() if ln.startswith(line)]
        return float(value)

    async def scenario() -> str:
        streaming, retrying = engine_over(ray_replicas), engine_over(ray_replicas)
        await streaming.connect()
        await retrying.connect()
        # The victim is where `retrying` will send the long prompt (its router, with no
        # report loop, changes only on its own calls); `streaming` is taught that the
        # victim holds its prefix, so its stream lands there too. Costs read from the
        # replicas' profiles may rank a short and a long prompt differently, so the choice
        # for one prompt says nothing of the other's.
        victim = retrying.router.choose(_key(LONG_PROMPT), remember=False)[0]
        streaming.router.views[victim].remember(_key(PREFIX))
        assert streaming.router.choose(_key(PREFIX), remember=False)[0] == victim
        pid = streaming.replicas[victim].pid
        assert await asyncio.to_thread(deaths_of, victim) == 0  # the server's reports run
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
        # The HTTP service on the same replicas keeps serving while the victim is down.
        assert await asyncio.to_thread(chat) == "200"
        assert not streaming.replicas[victim].up
        # Retried once on the other replica; the same greedy answer as a fresh run there.
        answer = await unstarted
        assert retrying.replicas[victim].retries == 1
        assert answer and answer == await collect(streaming, LONG_PROMPT, 4, "again")
        # Ray Serve replaces it; the next report puts it back in the set.
        deadline = time.monotonic() + REPLACED_TIMEOUT_S
        while not streaming.replicas[victim].up:
            assert time.monotonic() < deadline, "the dead replica was not replaced"
            await asyncio.sleep(1.0)
            await streaming.stats(refresh=True)
        assert streaming.replicas[victim].pid != pid
        await streaming.close()
        await retrying.close()
        return victim

    victim = asyncio.run(scenario())
    assert chat() == "200"
    # The server's own engine counted the death (its liveness check or the new pid; its
    # report loop runs on its own, so give it a few rounds).
    deadline = time.monotonic() + 30
    while deaths_of(victim) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert deaths_of(victim) == 1.0


def test_a_replica_killed_while_idle_does_not_hold_calls_until_its_replacement(ray_replicas):
    """Serve queues a call to a dead replica until the replacement has loaded; the liveness
    check (Serve's controller says no replica is running) must give such a call up and
    send it elsewhere instead."""

    async def scenario() -> None:
        engine = RayEngine(
            ray_replicas, ReplicaRouter(list(ray_replicas)), liveness=running_replicas
        )
        await engine.connect()
        await wait_all_up(engine)
        warm = SamplingParams(max_tokens=2, temperature=0)
        async for _ in engine.generate(IDLE_PREFIX, warm, request_id="warm"):
            pass
        victim = engine.router.choose(_key(IDLE_PREFIX), remember=False)[0]
        assert engine.router.views[victim].held_chars > 0  # affinity will send it there
        await engine.stats(refresh=True)
        assert engine.replicas[victim].stats.num_running == 0  # idle: nothing in flight
        pid = engine.replicas[victim].pid
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(
                collect(engine, IDLE_PREFIX, 2, "after"), IDLE_DEATH_BOUND_S
            )
        except EngineUnavailableError:
            answer = None  # a clear 503 is the other acceptable outcome
        elapsed = time.monotonic() - started
        assert not engine.replicas[victim].up or engine.replicas[victim].pid != pid
        assert engine.replicas[victim].deaths == 1
        if answer is not None:  # served by the other replica, not by the replacement
            assert engine.replicas[victim].retries == 1, elapsed
        await wait_all_up(engine)  # the later tests want both replicas
        await engine.close()

    asyncio.run(scenario())


async def wait_all_up(engine: RayEngine) -> None:
    deadline = time.monotonic() + REPLACED_TIMEOUT_S
    while True:
        await engine.check_liveness()
        await engine.stats(refresh=True)
        if all(r.up and r.stats is not None for r in engine.replicas.values()):
            running = await asyncio.to_thread(running_replicas, list(engine.replicas))
            if all(n >= 1 for n in running.values()):
                return
        assert time.monotonic() < deadline, "a replica did not come (back) up"
        await asyncio.sleep(1.0)
