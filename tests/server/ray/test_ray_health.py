"""A replica busy with a long prefill step is alive: Serve's health checks must reach it
while the step runs, so it is neither killed nor replaced, and the request finishes.

The health checks here are tighter than the default (1 s period, 2 s timeout: Serve kills a
replica after 3 checks in a row time out) and the prompt's prefill is one step of ~3000
tokens on one thread, several seconds even on an idle machine: a replica whose health check
waits for the step fails it. The deployed replica runs `BUSY_MODEL`, random weights of the
embedded model's shape: its steps cost what the embedded model's do, and it starts without
first parsing and dequantizing the GGUF (seconds; the weights do not matter here)."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import ActorDiedError

from covey.cli.main import main
from covey.errors import ConfigError, EngineUnavailableError
from covey.llm_backend.sampling_params import SamplingParams
from covey.server import ray_cluster
from covey.server.errors import http_error
from covey.server.ray_deployment import (
    UNHEALTHY_AFTER,
    EngineReplica,
    HealthCheck,
    delete_replicas,
    deploy_replicas,
    running_replicas,
)
from covey.server.ray_engine import RayEngine
from covey.server.replica_router import ReplicaRouter
from tests.llm_backend.conftest import embedded_model_shared
from tests.server.conftest import Deployed
from tests.server.ray.test_ray_errors import RaisingHandle

PERIOD_S = 1.0
TIMEOUT_S = 2.0
BUSY_PROMPT = " ".join(f"Shelf {i} of the archive holds a bound ledger." for i in range(250))
BUSY_MODEL = "dummy:smollm2-135m"
BUSY_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "kv_cache_tokens": 4096,
    "max_num_batched_tokens": 4096,  # the whole prompt in one step
    "compile": False,  # decode speed is not the point; start faster
}


def test_a_replica_busy_with_a_long_prefill_step_is_not_killed(ray_cluster):
    health = HealthCheck(period_s=PERIOD_S, timeout_s=TIMEOUT_S)
    handles = deploy_replicas(
        1, BUSY_MODEL, BUSY_CONFIG, threads=1, app_prefix="covey-busy-", health=health
    )
    (name,) = handles

    async def scenario() -> float:
        engine = RayEngine(
            handles, ReplicaRouter(list(handles)), report_interval_s=0.5, liveness=running_replicas
        )
        await engine.connect()
        pid = engine.replicas[name].pid
        params = SamplingParams(max_tokens=2, temperature=0)
        started = time.monotonic()
        outs = [out async for out in engine.generate(BUSY_PROMPT, params, request_id="busy")]
        busy_s = time.monotonic() - started
        assert outs[-1].finished and outs[-1].text
        await asyncio.sleep(2 * PERIOD_S)  # a few more rounds of checks
        report = await asyncio.wait_for(handles[name].report.remote(), 30)
        assert report.pid == pid, "the busy replica was killed and replaced"
        assert engine.replicas[name].deaths == 0
        await engine.close()
        return busy_s

    try:
        busy_s = asyncio.run(scenario())
    finally:
        delete_replicas(list(handles))
    needed_s = UNHEALTHY_AFTER * TIMEOUT_S + PERIOD_S
    if busy_s <= needed_s:  # hardware too fast for the step to outlast 3 timed-out checks
        pytest.skip(f"the long step took {busy_s:.1f} s, not over {needed_s:.0f} s: proves nothing")


# Serve's shutdown hook is an async `__del__`: collected outside Serve, it is never awaited.
@pytest.mark.filterwarnings("ignore:coroutine 'EngineReplica.__del__' was never awaited")
def test_a_replica_s_loop_answers_its_health_check_while_a_step_runs():
    """In process, no cluster: the loop Serve runs `check_health` on ticks every 20 ms while
    the engine prefills a long prompt in one step; with the step on the loop, the longest
    gap between ticks was the whole step."""
    with embedded_model_shared():
        replica = EngineReplica(None, BUSY_CONFIG, threads=1)
    prompt = " ".join(f"Row {i} of the table lists a copper kettle." for i in range(80))

    async def scenario() -> tuple[float, float]:
        params = SamplingParams(max_tokens=1, temperature=0)
        started = time.monotonic()
        request = asyncio.ensure_future(
            anext(replica.generate(prompt, params, "long", 0))
        )
        longest, last = 0.0, time.monotonic()
        while not request.done():
            await replica.check_health()
            await asyncio.sleep(0.02)
            now = time.monotonic()
            longest, last = max(longest, now - last), now
        assert (await request).finished
        return time.monotonic() - started, longest

    try:
        busy_s, longest_gap_s = asyncio.run(scenario())
    finally:
        asyncio.run(replica.__del__())
    assert longest_gap_s < busy_s / 3, (longest_gap_s, busy_s)


@pytest.mark.parametrize(
    ("period", "timeout", "max_step", "flag"),
    [
        (0, None, None, "--replica-health-period"),
        (None, -1.0, None, "--replica-health-timeout"),
        (None, float("inf"), None, "--replica-health-timeout"),
        (None, "30", None, "--replica-health-timeout"),
        (None, None, 0, "--replica-max-step"),
        (None, None, float("nan"), "--replica-max-step"),
    ],
)
def test_health_check_timing_is_checked(period, timeout, max_step, flag):
    with pytest.raises(ConfigError, match=f"{flag} must be a positive number of seconds"):
        HealthCheck.of(period, timeout, max_step)


def test_health_check_defaults_and_overrides():
    assert HealthCheck.of() == HealthCheck(period_s=2.0, timeout_s=30.0, max_step_s=600.0)
    assert HealthCheck.of(None, 10) == HealthCheck(period_s=2.0, timeout_s=10)
    assert HealthCheck.of(None, None, 60).max_step_s == 60


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replica-health-timeout", "10"], "--replica-health-timeout goes with --ray"),
        (["--replica-health-period", "1"], "--replica-health-period goes with --ray"),
        (["--ray", "--replica-health-timeout", "0"], "--replica-health-timeout must be a"),
        (["--ray", "--replica-health-period", "nan"], "--replica-health-period must be a"),
        (["--replica-max-step", "60"], "--replica-max-step goes with --ray"),
        (["--ray", "--replica-max-step", "-1"], "--replica-max-step must be a"),
    ],
)
def test_serve_checks_the_health_check_flags_first(capsys, argv, message):
    code = main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err


def test_start_ray_engine_deploys_the_replicas_with_its_health_check(captured_deploys):
    health = HealthCheck(period_s=5.0, timeout_s=60.0)
    with pytest.raises(Deployed):
        ray_cluster.start_ray_engine(
            replicas=2, address="ray://head:10001", engine_config={"device": "cpu"},
            health=health,
        )
    assert [spec.health for spec in captured_deploys.values()] == [health, health]


def test_a_replica_dying_with_no_other_up_fails_its_call_with_a_clear_503():
    """Its request cannot be retried anywhere: the 503 says which replica died and why no
    retry, not the router's bare "no engine replica is available"; so does the next call."""
    engine = RayEngine({"r0": RaisingHandle(ActorDiedError())})

    async def run(rid: str) -> None:
        async for _ in engine.generate("hello", request_id=rid):
            pass

    with pytest.raises(EngineUnavailableError) as err:
        asyncio.run(run("x"))
    assert str(err.value).startswith(
        "engine replica r0 died before streaming request x, and no other replica is up to "
        "retry it on; Ray Serve is replacing it, retry shortly"
    )
    assert http_error(err.value).status == 503
    r0 = engine.replicas["r0"]
    assert not r0.up and r0.failed == 1 and r0.retries == 0
    with pytest.raises(EngineUnavailableError, match=r"no engine replica is up \(down: r0 for"):
        asyncio.run(run("y"))
