"""`covey serve --ray`'s options are checked before anything starts (no Ray needed)."""

from __future__ import annotations

import pytest

from covey.cli.main import main
from covey.server.ray_deployment import gpus_per_replica
from tests.server.conftest import Deployed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "3"], "--replicas goes with --ray"),
        (["--replicas", "2"], "--replicas goes with --ray"),  # the default, still refused
        (["--address", "ray://head:10001"], "--address goes with --ray"),
        (["--routing", "pow2", "--max-imbalance", "2"], "--routing, --max-imbalance go with"),
        (["--replica-threads", "2"], "--replica-threads goes with --ray"),
        (["--replica-gpus", "1"], "--replica-gpus goes with --ray"),
        (["--ray-app-prefix", "mine-"], "--ray-app-prefix goes with --ray"),
        (["--ray", "--ray-app-prefix", ""], "--ray-app-prefix needs a prefix, got ''"),
        (["--ray", "--ray-app-prefix", " "], "--ray-app-prefix needs a prefix"),
        (["--ray", "--max-imbalance", "-1"], "--max-imbalance must be >= 0"),
        (["--ray", "--replica-threads", "0"], "--replica-threads must be at least 1"),
        (["--ray", "--routing", "random"], "--routing must be one of cache_aware"),
        (["--ray", "--routing", "random"], "pow2, ray_serve"),
        (["--ray", "--replicas", "0"], "must be at least 1"),
        (["--ray", "--remote", "http://127.0.0.1:9"], "give --ray or --remote, not both"),
        (["--ray", "--device", "cuda:1"], "give --device cuda, not cuda:1"),
        (["--ray", "--device", "cuda", "--replica-gpus", "0"], "needs --replica-gpus above 0"),
        (["--ray", "--device", "cuda", "--replica-gpus", "0.5"], "shares a GPU between"),
        (["--ray", "--device", "cpu", "--replica-gpus", "1"], "goes with --device cuda or auto"),
        (["--ray", "--replica-gpus", "-1"], "--replica-gpus must be >= 0"),
    ],
)
def test_serve_ray_options_are_checked_first(capsys, argv, message):
    code = main(["serve", "--port", "0", *argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err


def test_a_replica_reserves_the_gpu_it_computes_on():
    # One whole GPU per replica on CUDA; none (so CPU, `auto` included) otherwise.
    assert gpus_per_replica("cuda", None) == 1.0
    assert gpus_per_replica("auto", None) == gpus_per_replica("cpu", None) == 0.0
    assert gpus_per_replica("auto", 2) == 2.0
    # A shared GPU only with a KV pool sized up front (no race on the free memory).
    assert gpus_per_replica("cuda", 0.5, {"kv_cache_tokens": 4096}) == 0.5


def test_a_local_cluster_refuses_more_replica_threads_than_it_has_cores(monkeypatch):
    # Each replica reserves one Ray CPU per thread, so Ray never stacks compute threads
    # past the cores; asking for more than a local cluster has fails at once, not hangs.
    import os

    from covey.errors import ConfigError
    from covey.server.ray_cluster import start_ray_engine

    cores = os.cpu_count() or 1
    from covey.server import ray_cluster

    def never(*args, **kwargs):
        raise AssertionError("started a cluster past the CPU check")

    monkeypatch.setattr(ray_cluster, "init_ray", never)  # a missing check fails, not hangs
    # No cluster in this process yet (an earlier Ray test may have left one connected).
    monkeypatch.setattr(ray_cluster, "_ray_running", lambda: False)
    with pytest.raises(ConfigError, match=f"need {2 * cores} CPUs; this machine has {cores}"):
        start_ray_engine(replicas=2, threads=cores, engine_config={"device": "cpu"})


def test_a_cluster_joined_is_checked_for_the_cpus_it_has(monkeypatch):
    # Joined (--address) or already running in this process, the cluster's own CPU count
    # decides, not this machine's: a remote cluster of 3 CPUs cannot place 2 x 2 threads.
    from covey.errors import ConfigError
    from covey.server import ray_cluster

    def never(*args, **kwargs):
        raise AssertionError("deployed past the CPU check")

    monkeypatch.setattr(ray_cluster, "init_ray", lambda address=None: False)
    monkeypatch.setattr(ray_cluster, "cluster_cpus", lambda: 3.0)
    monkeypatch.setattr(ray_cluster, "deploy_replicas", never)
    with pytest.raises(ConfigError, match="need 4 CPUs; the Ray cluster has 3"):
        ray_cluster.start_ray_engine(
            replicas=2, threads=2, address="ray://head:10001", engine_config={"device": "cpu"}
        )


def test_ray_serve_routing_deploys_one_pool_that_serve_routes_among(captured_deploys):
    # `--routing ray_serve`: one Serve application of N replicas (Serve's own power of two
    # choices picks among them), not N applications that covey's router addresses.
    from covey.server import ray_cluster

    deployed = captured_deploys
    with pytest.raises(Deployed):
        ray_cluster.start_ray_engine(
            replicas=3, policy="ray_serve", address="ray://head:10001",
            engine_config={"device": "cpu"},
        )
    assert list(deployed) == ["covey-engine-pool"]
    assert deployed["covey-engine-pool"].num_replicas == 3
