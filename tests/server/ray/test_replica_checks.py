"""A replica's own checks, in process (no cluster): its health check sees an engine stuck
in one call or a step loop that died, not only a closed engine; a report cancelled while
it tokenizes leaves that work to the next report instead of doing it twice; and the
OpenMP wait a replica with a team of threads is given."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from covey.errors import EngineUnavailableError
from covey.llm_backend.compiled_decode import COMPILE_ENV
from covey.llm_backend.sampling_params import SamplingParams
from covey.server import ray_deployment
from covey.server.ray_deployment import EngineReplica, HealthCheck, replica_runtime_env
from tests.llm_backend.conftest import embedded_model_shared

CONFIG = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 2048, "compile": False}
MAX_STEP_S = 0.5
PARAMS = SamplingParams(max_tokens=2, temperature=0)

# Serve's shutdown hook is an async `__del__`: collected outside Serve, it is never awaited.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine 'EngineReplica.__del__' was never awaited"
)


@pytest.fixture(scope="module")
def replica():
    with embedded_model_shared():
        replica = EngineReplica(None, CONFIG, threads=1, max_step_s=MAX_STEP_S)
    yield replica
    asyncio.run(replica.__del__())


async def _finish(replica: EngineReplica, prompt: str, rid: str):
    return [out async for out in replica.generate(prompt, PARAMS, rid, 0)][-1]


def test_a_step_stuck_past_max_step_fails_the_health_check_and_passes_once_it_returns(replica):
    engine = replica.llm.engine
    release = threading.Event()
    step = engine.step

    def hung_step():  # a deadlock or a hung disk read, until released
        release.wait(30)
        return step()

    async def scenario() -> None:
        await replica.check_health()
        engine.step = hung_step
        request = asyncio.ensure_future(_finish(replica, "A stuck step:", "stuck"))
        try:
            await asyncio.sleep(MAX_STEP_S / 2)
            await replica.check_health()  # running, within the bound: busy, not stuck
            await asyncio.sleep(MAX_STEP_S)
            with pytest.raises(EngineUnavailableError, match="an engine call has run for .* stuck"):
                await replica.check_health()
        finally:
            release.set()
            del engine.step
        assert (await request).finished
        await replica.check_health()

    asyncio.run(scenario())


def test_a_step_loop_that_died_fails_the_health_check(replica):
    engine = replica.llm.engine

    def broken() -> bool:
        raise RuntimeError("scheduler bug")

    async def scenario() -> None:
        engine.has_unfinished_requests = broken
        request = asyncio.ensure_future(_finish(replica, "Nobody steps this:", "orphan"))
        try:
            for _ in range(100):
                if replica.llm.step_loop_error() is not None:
                    break
                await asyncio.sleep(0.02)
            with pytest.raises(EngineUnavailableError, match="step loop died.*scheduler bug"):
                await replica.check_health()
        finally:
            del engine.has_unfinished_requests
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        # The next request starts a new step loop: healthy again.
        assert (await _finish(replica, "Stepping again:", "again")).finished
        await replica.check_health()

    asyncio.run(scenario())


def test_a_cancelled_report_s_tokenizing_is_awaited_not_repeated(replica, monkeypatch):
    calls = []
    questions = replica._questions

    def slow_questions():
        calls.append(time.monotonic())
        time.sleep(0.5)  # a long tokenizing, on its own thread
        return questions()

    monkeypatch.setattr(replica, "_questions", slow_questions)

    async def scenario():
        replica.ledger.record("A prompt still to tokenize for the router.")
        first = asyncio.ensure_future(replica.report())
        await asyncio.sleep(0.1)
        first.cancel()  # the router gave up on it
        await asyncio.gather(first, return_exceptions=True)
        return await replica.report()

    report = asyncio.run(scenario())
    assert report.model and len(calls) == 1, calls


def test_health_check_takes_max_step_from_its_spec():
    assert HealthCheck.of(max_step_s=30).max_step_s == 30
    assert HealthCheck().max_step_s == 600.0


@pytest.mark.parametrize(
    ("environ", "threads", "expected"),
    [
        ({}, 1, {}),
        ({}, 2, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
        # covey serve's own default for the governor, not the user's choice: overridden
        ({"GOMP_SPINCOUNT": "20000"}, 2, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
        ({"GOMP_SPINCOUNT": "1000"}, 2, {}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 4, {}),
        ({COMPILE_ENV: "0"}, 1, {COMPILE_ENV: "0"}),
        ({COMPILE_ENV: "0"}, 2, {COMPILE_ENV: "0", "OMP_WAIT_POLICY": "PASSIVE",
                                 "GOMP_SPINCOUNT": "0"}),
    ],
)
def test_a_replica_with_a_team_of_threads_waits_passively(monkeypatch, environ, threads, expected):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", COMPILE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    options = replica_runtime_env(threads)
    assert options.get("runtime_env", {}).get("env_vars", {}) == expected


def test_deploy_specs_gives_each_replica_its_wait_and_max_step(monkeypatch):
    """The options Serve is given, recorded by a stand-in for Serve's module (the cluster
    tests deploy for real with one thread; this is the 2-thread spec's wiring)."""
    seen = {}

    class Deployment:
        def __init__(self, options):
            self.options = options

        def bind(self, *args):
            seen["bind"] = args
            return args

    class Serve:
        RunTarget = staticmethod(lambda bound, name, route_prefix: name)

        def start(self, **_):
            pass

        def status(self):
            return type("Status", (), {"applications": {}})()

        def deployment(self, cls, **options):
            seen["options"] = options
            return Deployment(options)

        def run_many(self, targets):
            return [f"handle:{t}" for t in targets]

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(ray_deployment, "require_ray", Serve)
    spec = ray_deployment.ReplicaSpec(None, {}, threads=2, health=HealthCheck(max_step_s=42))
    assert ray_deployment.deploy_specs({"one": spec}) == {"one": "handle:one"}
    env = seen["options"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["GOMP_SPINCOUNT"] == "0"
    assert seen["bind"] == (None, {}, 2, 0.0, 42)
