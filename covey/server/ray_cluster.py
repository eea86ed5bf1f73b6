"""`covey serve --ray`: start (or join) a Ray cluster, deploy the engine replicas, and hand
back the `RayEngine` the server's runtime and routes use in place of an in-process engine.

The front (this process: uvicorn, the runtime, the index, the router) stays one process:
it is where the router's view of every replica's cache lives, and a second front would
route blind to the first one's decisions. What it costs per request is measured in
`benchmarks/scale.py` and discussed in docs/scale.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from covey.errors import ConfigError
from covey.server.ray_deployment import (
    APP_PREFIX,
    HealthCheck,
    ReplicaSpec,
    app_name,
    delete_replicas,
    deploy_replicas,
    deploy_specs,
    gpus_per_replica,
    require_ray,
    running_replicas,
)
from covey.server.ray_engine import RayEngine
from covey.server.replica_router import POLICIES, ReplicaRouter

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 1024 * 1024  # prompts and outputs only: KV never crosses Ray
# `--routing ray_serve`: Ray Serve's own router (power of two choices over queue lengths)
# picks among the replicas of one deployment; covey's router only sees that one handle.
RAY_SERVE_ROUTING = "ray_serve"
ROUTINGS: tuple[str, ...] = (*POLICIES, RAY_SERVE_ROUTING)
POOL_SUFFIX = "pool"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to the cluster at `address`, or start a local one; True if this call
    started it (then `shutdown_ray` stops it)."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(
        address="local",  # not whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster names
        num_cpus=num_cpus or os.cpu_count() or 1,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )
    return True


def cluster_cpus() -> float:
    """The CPUs of the Ray cluster this process is connected to (all of them, used or not):
    a replica reserves one per thread, so more than this can never be placed."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _check_cpus(replicas: int, threads: int, cpus: float, where: str) -> None:
    if replicas * threads > cpus:
        # Each replica reserves a Ray CPU per thread: Serve would wait for CPUs forever.
        raise ConfigError(
            f"{replicas} replicas x {threads} threads need {replicas * threads} CPUs; "
            f"{where} has {cpus:g}: lower --replicas or --replica-threads"
        )


def start_ray_engine(
    replicas: int = 2,
    model: str | None = None,
    *,
    address: str | None = None,
    policy: str = "cache_aware",
    max_imbalance: int = 4,
    threads: int = 1,
    gpus: float | None = None,
    app_prefix: str = APP_PREFIX,
    engine_config: dict[str, Any] | None = None,
    tokenizer: Any = "auto",
    health: HealthCheck | None = None,
) -> RayEngine:
    """Deploy `replicas` engines and return a connected `RayEngine` over them; closing it
    deletes the replicas (each drains first) and stops a cluster this call started.
    `health`: how Serve checks the replicas are alive (default `HealthCheck()`)."""
    health = health or HealthCheck()
    if policy not in ROUTINGS:
        raise ConfigError(f"--routing must be one of {', '.join(ROUTINGS)}, got {policy!r}")
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    config = dict(engine_config or {})
    num_gpus = gpus_per_replica(str(config.get("device", "auto")), gpus, config)
    if address is None and not _ray_running():  # refused before a local cluster starts
        _check_cpus(replicas, threads, os.cpu_count() or 1, "this machine")
    started = init_ray(address)
    try:  # what the cluster joined (or already running here) really has
        _check_cpus(replicas, threads, cluster_cpus(), "the Ray cluster")
    except ConfigError:
        _teardown_quietly([], started)
        raise
    if num_gpus == 0 and _replicas_compile(config):
        log.warning(
            "covey: each replica compiles its decode step as it starts (minutes on a cold "
            "cache, seconds once cached; 2-3.5 GB of memory each while it compiles); "
            "--no-compile skips it"
        )
    pooled = policy == RAY_SERVE_ROUTING
    if pooled:  # one application of `replicas` replicas, among which Serve routes
        names = [app_prefix + POOL_SUFFIX]
        spec = ReplicaSpec(
            model, config, threads, num_gpus=num_gpus, num_replicas=replicas, health=health
        )
    else:
        names = [app_name(i, app_prefix) for i in range(replicas)]
    try:
        if pooled:
            handles = deploy_specs({names[0]: spec})
        else:
            handles = deploy_replicas(
                replicas, model, config, threads=threads, num_gpus=num_gpus,
                app_prefix=app_prefix, health=health,
            )
    except ConfigError:  # refused before deploying: the names may be another front's
        _teardown_quietly([], started)
        raise
    except BaseException:  # some replicas may be up (Serve apps outlive this process)
        _teardown_quietly(names, started)
        raise
    try:
        _log_compile_warnings(handles)
        # The mirror's size is each replica's real KV pool, set from its reports.
        # With Ray Serve routing, the router has one handle to send to (its trivial pick
        # runs as pow2; `/metrics` labels those decisions ray_serve).
        router = ReplicaRouter(
            list(handles), policy="pow2" if pooled else policy, max_imbalance=max_imbalance
        )
        if tokenizer == "auto":
            from covey.llm_backend.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model)
        engine = RayEngine(
            handles, router, tokenizer=tokenizer, liveness=running_replicas, pooled=pooled,
            pool_size=replicas,
        )
        engine.on_close = lambda: _teardown(list(handles), started)
        asyncio.run(engine.connect())
    except BaseException:  # Ctrl-C included: never leave replicas behind on a cluster
        _teardown_quietly(list(handles), started)
        raise
    return engine


def _replicas_compile(config: dict[str, Any]) -> bool:
    """Whether CPU replicas with this engine config compile their decode step (the
    default's test, COVEY_COMPILE, is the front's: `replica_runtime_env` passes it on)."""
    setting = config.get("compile")
    if setting is not None:
        return bool(setting)
    import torch

    from covey.llm_backend.compiled_decode import compile_by_default

    return compile_by_default(torch.device("cpu"))


def _log_compile_warnings(handles: dict[str, Any]) -> None:
    """Log, here in the front, a replica's compile warnings (its fallback to eager): Ray
    does not forward the replicas' logs (log_to_driver=False)."""
    for name, handle in handles.items():
        for line in handle.compile_warning_lines.remote().result():
            log.warning("replica %s: %s", name, line)


def _teardown(names: list[str], stop_cluster: bool) -> None:
    delete_replicas(names)
    if stop_cluster:
        import ray

        ray.shutdown()


def _teardown_quietly(names: list[str], stop_cluster: bool) -> None:
    """`_teardown` on a failed start: its own error must not hide the one that failed it."""
    try:
        _teardown(names, stop_cluster)
    except Exception as exc:
        log.warning("could not delete the replicas %s: %s", ", ".join(names), exc)
