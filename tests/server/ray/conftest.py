"""A local Ray cluster for the whole test session: 2 engine replicas on Ray Serve (the
embedded SmolLM2 in float32, one CPU thread each, a small KV pool), and a real uvicorn
server whose engine is a `RayEngine` over them. Skipped, saying why, without the `ray`
extra (`make test` installs it)."""

from __future__ import annotations

import asyncio
import os

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
pytest.importorskip("ray.serve", reason="ray is installed without serve: pip install 'ray[serve]'")

from covey.llm_backend.tokenizer import load_tokenizer  # noqa: E402
from covey.server.ray_deployment import (  # noqa: E402
    delete_replicas,
    deploy_replicas,
    running_replicas,
)
from covey.server.ray_engine import RayEngine  # noqa: E402
from covey.server.ray_metrics import register_ray_metrics  # noqa: E402
from covey.server.replica_router import ReplicaRouter  # noqa: E402
from covey.server.server_builder import build_state, builtin_apps  # noqa: E402
from tests.server.conftest import APP_MAX_TOKENS, LiveServer  # noqa: E402

REPLICAS = 2
REPLICA_KV_TOKENS = 4096


@pytest.fixture(scope="session")
def ray_cluster():
    """The local Ray cluster, with Serve's controller; torn down after the last test."""
    from ray import serve

    # Ray kills workers once the node's memory is 95% used, by any process: on a shared
    # test machine that takes replicas (and Serve's controller) down at random. Off here;
    # the failure test kills a replica on purpose.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(
        address="local",  # never a cluster found via RAY_ADDRESS or /tmp/ray
        # A replica reserves a Ray CPU per thread: the 2 replicas, and room for the one a
        # deploy test starts beside them (Ray's CPUs are counts, not cores).
        num_cpus=REPLICAS + 1,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_replicas(ray_cluster):
    """Application name -> Serve handle of each engine replica."""
    config = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": REPLICA_KV_TOKENS}
    handles = deploy_replicas(REPLICAS, None, config, threads=1)
    yield handles
    delete_replicas(list(handles))


@pytest.fixture(scope="session")
def ray_server(ray_replicas, server_index):
    """A real uvicorn server serving the built-in apps on the Ray replicas."""
    router = ReplicaRouter(list(ray_replicas))  # sized from the replicas' reports
    engine = RayEngine(
        ray_replicas,
        router,
        tokenizer=load_tokenizer(None),
        report_interval_s=0.5,
        liveness=running_replicas,
    )
    asyncio.run(engine.connect())
    state = build_state(engine, server_index, apps=builtin_apps(APP_MAX_TOKENS))
    register_ray_metrics(state.metrics.registry, engine)
    server = LiveServer(state)
    yield server
    server.stop()
