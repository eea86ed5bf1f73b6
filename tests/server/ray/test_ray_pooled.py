"""`RayEngine(pooled=True)` (`--routing ray_serve`) when one Serve replica behind the pool's
handle dies: the call is retried through the same handle, the pool stays up, and calls on
the healthy replicas go on. A scripted handle stands for Serve (no cluster): which replica
Serve picks is its business, and the death is Ray's real `ActorDiedError`."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError

from covey.errors import EngineUnavailableError
from covey.llm_backend.engine_client import EngineCapabilities, EngineStats
from covey.llm_backend.outputs import RequestMetrics, RequestOutput
from covey.server.ray_deployment import ReplicaReport
from covey.server.ray_engine import RayEngine
from covey.server.ray_metrics import RayMetricsCollector
from covey.server.replica_router import ReplicaRouter

POOL = "covey-engine-pool"


def output(request_id: str, text: str, finished: bool) -> RequestOutput:
    metrics = RequestMetrics(None, None, None, None, 1, len(text), 0, 0)
    return RequestOutput(
        request_id, text, [], text, [], finished, "stop" if finished else None, metrics
    )


class Stream:
    """One streamed call on one Serve replica: a dead one raises, a live one streams two
    outputs once `go` is set."""

    def __init__(self, request_id: str, dead: bool, go: asyncio.Event) -> None:
        self.request_id, self.dead, self.go = request_id, dead, go
        self.sent = 0
        self._cancelled = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> RequestOutput:
        await asyncio.sleep(0.01)
        if self.dead:
            raise ActorDiedError()
        await self.go.wait()
        if self.sent == 2:
            raise StopAsyncIteration
        self.sent += 1
        return output(self.request_id, "ok" * self.sent, self.sent == 2)

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


class Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def options(self, **_: object) -> Method:
        return self

    def remote(self, *args: object):
        return self.fn(*args)


class PoolHandle:
    """Serve's handle for the pool: the call numbered `dead_call` lands on the replica that
    died; reports land there too (Serve has not dropped it yet)."""

    def __init__(self, dead_call: int) -> None:
        self.dead_call = dead_call
        self.calls = 0
        self.aborted: list[str] = []
        self.go = asyncio.Event()
        self.generate = Method(self._generate)
        self.report = Method(self._report)
        self.abort = Method(self._abort)

    def _generate(self, prompt, params, request_id, priority) -> Stream:
        self.calls += 1
        return Stream(request_id, self.calls == self.dead_call, self.go)

    async def _report(self):
        raise ActorDiedError()

    async def _abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


async def collect(engine: RayEngine, prompt: str, request_id: str) -> str:
    text = ""
    async for out in engine.generate(prompt, None, request_id):
        text = out.text
    return text


def test_one_dead_serve_replica_does_not_take_the_pool_down():
    async def scenario() -> None:
        handle = PoolHandle(dead_call=2)
        engine = RayEngine(
            {POOL: handle}, ReplicaRouter([POOL], policy="pow2"), pooled=True,
            report_interval_s=0.05,
        )
        try:
            # Call 1 waits on a healthy replica; call 2 lands on the dead one.
            waiting = asyncio.create_task(collect(engine, "hello", "a"))
            await asyncio.sleep(0.05)
            retried = asyncio.create_task(collect(engine, "hello again", "b"))
            await asyncio.sleep(0.3)  # the death is seen, reports fail meanwhile
            await engine.abort("a")  # the waiting call is still known
            assert handle.aborted == ["a"]
            handle.go.set()
            assert await asyncio.wait_for(waiting, 5) == "okok"
            assert await asyncio.wait_for(retried, 5) == "okok"
            state = engine.replicas[POOL]
            assert state.up and state.deaths == 0 and state.retries == 1 and state.failed == 0
            assert handle.calls == 3  # the retry went through the same handle
            assert await asyncio.wait_for(collect(engine, "next", "c"), 5) == "okok"
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_pooled_call_that_dies_twice_fails_with_503_and_the_pool_stays_up():
    async def scenario() -> None:
        handle = PoolHandle(dead_call=1)
        handle.go.set()
        original = handle._generate

        def always_dead(prompt, params, request_id, priority) -> Stream:
            stream = original(prompt, params, request_id, priority)
            stream.dead = handle.calls <= 2
            return stream

        handle.generate = Method(always_dead)
        engine = RayEngine({POOL: handle}, ReplicaRouter([POOL], policy="pow2"), pooled=True)
        try:
            with pytest.raises(EngineUnavailableError, match="died while serving request x"):
                await collect(engine, "hello", "x")
            assert engine.replicas[POOL].up
            assert await collect(engine, "hello", "y") == "okok"
        finally:
            await engine.close()

    asyncio.run(scenario())


class ReportingPool(PoolHandle):
    """Serve spreads concurrent reports over the pool's replicas (pids 101, 102, 103),
    each with its own load; every 4th report lands on one replica twice."""

    def __init__(self) -> None:
        super().__init__(dead_call=0)
        self.reports = 0

    async def _report(self) -> ReplicaReport:
        self.reports += 1
        pid = 101 + (self.reports % 4) % 3
        stats = EngineStats(
            model="m", block_size=16, kv_blocks_total=100, kv_blocks_used=10,
            kv_blocks_cached=0, kv_blocks_pinned=0, prefix_cache_queried_tokens=0,
            prefix_cache_hit_tokens=0, num_waiting=pid - 100, num_running=1, num_paused=0,
        )
        return ReplicaReport(pid, stats, {}, "m", EngineCapabilities(), {}, {})


def test_a_pool_reports_each_serve_replica_not_one_at_random():
    """Review M2: stats and `/metrics` under --routing ray_serve cover every Serve replica
    behind the pool (told apart by pid), and the decisions say Serve routed them."""

    async def scenario() -> None:
        handle = ReportingPool()
        engine = RayEngine(
            {POOL: handle}, ReplicaRouter([POOL], policy="pow2"), pooled=True, pool_size=3,
            report_interval_s=60,
        )
        try:
            await engine.connect()
            stats = await engine.stats(refresh=True)
            assert stats.kv_blocks_total == 300 and stats.num_waiting == 1 + 2 + 3
            handle.go.set()
            assert await collect(engine, "hello", "a") == "okok"
            families = {m.name: m for m in RayMetricsCollector(engine).collect()}
            queue = {
                s.labels["replica"]: s.value
                for s in families["covey_replica_queue_depth"].samples
            }
            assert queue == {f"{POOL}/pid101": 1, f"{POOL}/pid102": 2, f"{POOL}/pid103": 3}
            decisions = {
                (s.labels["policy"], s.labels["decision"])
                for s in families["covey_router_decisions"].samples
            }
            assert decisions == {("ray_serve", "ray_serve")}
        finally:
            await engine.close()

    asyncio.run(scenario())
