"""Deploying engine replicas: a second front must not replace the first one's replicas (nor
later delete them on its close), and a start that fails after the deploy leaves none
behind (Serve applications outlive the process that deployed them).

The replicas these tests deploy beside the session's run `DUMMY` (random weights of a tiny
shape, the embedded tokenizer): what is checked is the deploy and the replica's process,
not the model, and a replica over the embedded model spends seconds reading it first."""

from __future__ import annotations

import pytest
from ray import serve

from covey.errors import ConfigError, EngineUnavailableError
from covey.server.ray_cluster import start_ray_engine
from covey.server.ray_deployment import (
    ReplicaSpec,
    delete_replicas,
    deploy_replicas,
    deploy_specs,
)
from covey.server.ray_engine import RayEngine
from tests.server.ray.conftest import REPLICA_KV_TOKENS

DUMMY = "dummy:tiny"


def test_a_second_front_cannot_deploy_over_the_replicas_of_the_first(ray_replicas):
    before = {name: app.last_deployed_time_s for name, app in _apps().items()}
    names = ", ".join(sorted(ray_replicas))
    with pytest.raises(ConfigError, match=f"Ray Serve already runs {names}"):
        deploy_replicas(len(ray_replicas), None, {"device": "cpu"}, threads=1)
    after = {name: app.last_deployed_time_s for name, app in _apps().items()}
    assert after == before  # nothing was redeployed


def test_a_start_that_fails_after_the_deploy_deletes_its_replicas(ray_replicas, monkeypatch):
    async def nobody_answers(self: RayEngine) -> RayEngine:
        # The failure injected: what `connect` raises when no replica reports in time.
        raise EngineUnavailableError("no engine replica answered")

    monkeypatch.setattr(RayEngine, "connect", nobody_answers)
    config = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 1024}
    with pytest.raises(EngineUnavailableError, match="no engine replica answered"):
        start_ray_engine(1, DUMMY, app_prefix="covey-failed-start-", engine_config=config)
    assert not [name for name in _apps() if name.startswith("covey-failed-start-")]
    assert set(ray_replicas) <= set(_apps())  # the session's own replicas are untouched


def _apps():
    return serve.status().applications


def test_a_two_thread_replica_computes_on_two_threads_and_waits_passively(
    ray_cluster, monkeypatch
):
    """What the replica's process really got, asked of it: Ray applies the passive wait
    before torch loads (a fixed team that spins collapses on a loaded node), and its engine
    runs 2 threads. It reserves 1 Ray CPU, so it fits beside the session's replicas."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    config = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": 1024, "compile": False}
    spec = ReplicaSpec(DUMMY, config, threads=2, num_cpus=1)
    handles = deploy_specs({"covey-two-threads-0": spec})
    try:
        (handle,) = handles.values()
        env = handle.openmp_env.remote().result(timeout_s=60)
        stats = handle.stats.remote().result(timeout_s=60)
    finally:
        delete_replicas(list(handles))
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["GOMP_SPINCOUNT"] == "0", env
    assert stats.num_threads == 2


def test_the_router_s_mirror_is_the_size_of_each_replica_s_kv_pool(ray_server):
    engine = ray_server.state.engine
    ray_server.wait_idle()
    for r in engine.replica_states():
        pool_tokens = r.stats.kv_blocks_total * r.stats.block_size
        assert pool_tokens >= REPLICA_KV_TOKENS
        assert engine.router.views[r.name].capacity_chars == 4 * pool_tokens
