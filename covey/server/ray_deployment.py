"""Engine replicas on Ray Serve: each one an `AsyncLLM` in its own Ray actor.

Each replica is its own Serve application (`covey-engine-<i>`, one replica each) so the
front's router can address a replica by name: Ray Serve's handles route among the
replicas of one deployment by their own policy (power of two choices), which knows nothing
of KV caches. Serve still does what it is for: it starts the actors, health-checks them
(`check_health`), replaces a replica that dies under the same name, and on shutdown lets
requests in flight finish (`graceful_shutdown_*`) before the actor goes: replicas drain.

Serve's health check (`check_health`) runs on the replica's event loop, the one its calls
run on; so the engine steps on a thread of its own (`AsyncLLM(worker_thread=True)`), on
CPU too: a prefill step of thousands of tokens on a loaded machine takes tens of seconds,
and a check waiting behind it timed out 3 times in a row, so Serve killed a replica that
was only busy. With the loop free the check answers in milliseconds whatever the engine
is doing; its timing is `HealthCheck` (`covey serve --ray --replica-health-timeout`).

Everything crossing to a replica is plain data (prompts, `Segment`, `SamplingParams`,
`RequestOutput`); `generate` is an async generator, streamed through Serve's streaming
handles. `ray` is imported here only: the rest of covey runs without the `ray` extra.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from covey.errors import ConfigError, EngineUnavailableError
from covey.server.replica_cache_report import ReplicaCacheLedger

APP_PREFIX = "covey-engine-"
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30.0
UNHEALTHY_AFTER = 3  # checks in a row that fail (Serve's REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD)


@dataclass(frozen=True)
class HealthCheck:
    """How Serve's controller checks each replica: it calls `check_health` every `period_s`
    and fails a call not answered within `timeout_s`; `UNHEALTHY_AFTER` failures in a row
    and it replaces the replica (its requests in flight then fail or are retried).

    What a check detects (`EngineReplica.check_health`): a replica process that died or
    cannot run its event loop for `timeout_s` (the call is not answered), an engine closed,
    a step loop that died of an error, and an engine call (a step, a report's cache read)
    that has run longer than `max_step_s`: a deadlock or a hung disk read, which leaves the
    loop free and its requests waiting forever. A long step within `max_step_s` is busy, not
    dead: the check does not wait for it (the step runs on the engine's own thread).

    Defaults: a 2 s period, so a replica that crashed (its check fails at once) is
    replaced, and the front's liveness check (docs/scale.md) gives up calls waiting on it,
    within seconds; Serve's own default is 10 s. The timeout is Serve's default, 30 s: only
    a process that cannot run at all for 30 s misses it. Ray Serve's LLM deployment uses
    10 s for both, with vLLM's engine in a process of its own; a shorter timeout replaces a
    dead replica sooner and risks killing one on a machine so loaded it is not scheduled for
    that long. `max_step_s` is 600 s: a prefill step of a few thousand tokens takes tens of
    seconds on a loaded CPU, and killing a replica that was only slow loses every request
    it held; so a stuck step is replaced after 600 s plus 3 periods."""

    period_s: float = 2.0
    timeout_s: float = 30.0
    max_step_s: float = 600.0

    def __post_init__(self) -> None:
        for flag, value in (
            ("--replica-health-period", self.period_s),
            ("--replica-health-timeout", self.timeout_s),
            ("--replica-max-step", self.max_step_s),
        ):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{flag} must be a positive number of seconds, got {value!r}")

    @classmethod
    def of(
        cls,
        period_s: float | None = None,
        timeout_s: float | None = None,
        max_step_s: float | None = None,
    ) -> HealthCheck:
        """The defaults, with what was given in place of them (CLI flags left out are None)."""
        default = cls()
        return cls(
            default.period_s if period_s is None else period_s,
            default.timeout_s if timeout_s is None else timeout_s,
            default.max_step_s if max_step_s is None else max_step_s,
        )


def require_ray() -> Any:
    """`ray.serve`, or a one-line error saying how to install it."""
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise ConfigError(
            "covey serve --ray needs Ray Serve: pip install -e \".[ray]\" (ray[serve]>=2.60)"
        ) from None
    return serve


def gpus_per_replica(
    device: str, requested: float | None, engine_config: dict[str, Any] | None = None
) -> float:
    """The GPUs each replica reserves from Ray for `device` (`--replica-gpus`), or a
    one-line error. Ray no longer hides GPUs from an actor that reserves none, so a replica
    must reserve the GPU it computes on: unreserved, every replica would load onto cuda:0
    unknown to Ray's scheduler, each sizing its KV pool from the memory free at that
    moment. A reserved GPU is the replica's `cuda` (Ray sets CUDA_VISIBLE_DEVICES)."""
    cuda = device.startswith("cuda")
    if cuda and device not in ("cuda", "cuda:0"):
        raise ConfigError(
            f"with --ray give --device cuda, not {device}: Ray assigns each replica its GPU"
        )
    gpus = (1.0 if cuda else 0.0) if requested is None else requested
    if gpus < 0:
        raise ConfigError(f"--replica-gpus must be >= 0, got {gpus}")
    if cuda and gpus == 0:
        raise ConfigError("--device cuda with --ray needs --replica-gpus above 0")
    if gpus > 0 and device != "auto" and not cuda:
        raise ConfigError(f"--replica-gpus goes with --device cuda or auto, not {device}")
    config = engine_config or {}
    sized = config.get("kv_cache_tokens") is not None or config.get("kv_cache_bytes") is not None
    if 0 < gpus < 1 and not sized:
        raise ConfigError(
            f"--replica-gpus {gpus} shares a GPU between replicas, and each would size its "
            "KV pool from the memory free when it loads: give whole GPUs, or an explicit "
            "kv_cache_tokens in the engine config"
        )
    return gpus


class EngineReplica:
    """One engine replica: an `AsyncLLM` over `model` with `engine_config`, computing on
    `threads` CPU threads (torch's pool is per thread: the engine's own, which builds and
    steps it), on the GPU Ray gave it when it reserved `num_gpus`, on CPU otherwise (`auto`
    included: a GPU the replica did not reserve is not its to use). `max_step_s`: an engine
    call running longer fails the health check (`HealthCheck.max_step_s`)."""

    def __init__(
        self,
        model: str | None,
        engine_config: dict[str, Any],
        threads: int,
        num_gpus: float = 0.0,
        max_step_s: float = HealthCheck.max_step_s,
    ) -> None:
        from covey.llm_backend.async_llm import AsyncLLM

        config = dict(engine_config)
        if threads > 0:  # the engine sets its thread count at start: tell it, not torch
            config["num_threads"] = threads
        if num_gpus == 0 and config.get("device", "auto") == "auto":
            config["device"] = "cpu"
        elif num_gpus > 0 and config.get("device", "auto") in ("auto", "cuda:0"):
            config["device"] = "cuda"
        with _CompileWarnings() as caught:
            # Stepped (and built) on its own thread: this loop must answer Serve's health
            # checks while a long step runs (module docstring).
            self.llm = AsyncLLM(model, worker_thread=True, **config)
        # Ray starts with log_to_driver=False: the front asks for these (`compile_warning_lines`)
        # and logs them, or a replica that fell back to eager would do so out of sight.
        self.compile_warnings = caught.messages
        self.ledger = ReplicaCacheLedger(self.llm.tokenizer)
        # One report at a time: the router asks again when a slow one times out, and two
        # overlapping reports would tokenize (and walk) the same prompts twice.
        self._report_lock = asyncio.Lock()
        # The tokenizing of a report's questions, kept: a report cancelled while it runs (the
        # router gave up) leaves its thread working, and the next report awaits that one
        # instead of tokenizing the same prompts again beside it.
        self._preparing: asyncio.Future[Any] | None = None
        self.max_step_s = max_step_s
        self.draining = False

    async def generate(
        self, prompt: Any, params: Any, request_id: str | None, priority: int
    ) -> AsyncIterator[Any]:
        if self.draining:
            raise EngineUnavailableError("this replica is shutting down")
        ticket = self.ledger.record(prompt)
        try:
            async for out in self.llm.generate(prompt, params, request_id, priority):
                yield out
        finally:
            self.ledger.finished(ticket)

    async def prefill(self, prompt: Any, priority: int, pin: str | None, request_id: Any):
        ticket = self.ledger.record(prompt)
        try:
            return await self.llm.prefill(prompt, priority, pin, request_id)
        finally:
            self.ledger.finished(ticket)

    async def unpin(self, pin: str) -> bool:
        return await self.llm.unpin(pin)

    async def pinned(self) -> dict[str, int]:
        return await self.llm.pinned()

    async def warm_chunks(self, chunks: list[Any], compute: bool = False) -> int:
        self.ledger.finished(self.ledger.record(chunks))  # the report checks the store
        return await self.llm.warm_chunks(chunks, compute)

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    async def pause(self, request_id: str) -> None:
        await self.llm.pause(request_id)

    async def resume(self, request_id: str, extra: Any, params: Any = None) -> None:
        await self.llm.resume(request_id, extra, params)

    async def stats(self) -> Any:
        return await self.llm.stats()

    async def compile_warning_lines(self) -> list[str]:
        """What the decode step's compile warned at start (a fallback to eager), if any."""
        return list(self.compile_warnings)

    async def report(self) -> ReplicaReport:
        """What the router needs from this replica: its load, pins, what its prefix cache
        and chunk store hold (in the router's units), and its identity."""
        async with self._report_lock:
            return await self._report()

    async def _report(self) -> ReplicaReport:
        # New prompts are tokenized on a thread of their own, not on the loop that streams
        # outputs; the engine answers for its caches on its own thread (`cache_report`),
        # read-only.
        if self._preparing is None or self._preparing.done():
            self._preparing = asyncio.ensure_future(asyncio.to_thread(self._questions))
        asked = await asyncio.shield(self._preparing)
        cache = await self.llm.cache_report(asked.prompts, asked.chunks)
        units, chunks = self.ledger.answer(asked, cache.cached_tokens, cache.chunks_stored)
        return ReplicaReport(
            pid=os.getpid(),
            stats=await self.llm.stats(),
            pins=await self.llm.pinned(),
            model=self.llm.model_name,
            capabilities=self.llm.capabilities,
            units=units,
            chunks=chunks,
            queued_prefill_tokens=cache.queued_prefill_tokens,
            prefill_profile=(cache.prefill_fixed_s, cache.prefill_per_token_s),
        )

    def _questions(self) -> Any:
        """The ledger's questions, every prompt tokenized here (those that finished since
        `pending` included); on a worker thread: the ledger locks what it shares."""
        self.ledger.prepare(self.ledger.pending())
        return self.ledger.questions()

    async def check_health(self) -> None:
        """Serve's liveness probe (what it detects: `HealthCheck`). It must not wait for the
        engine: it answers from this loop while a step runs on the engine's thread, and
        judges that step by how long it has run."""
        if self.llm.closed:
            raise EngineUnavailableError("the engine is closed")
        error = self.llm.step_loop_error()
        if error is not None:
            raise EngineUnavailableError(f"the engine's step loop died: {error!r}")
        running_s = self.llm.engine_call_s()
        if running_s > self.max_step_s:
            raise EngineUnavailableError(
                f"an engine call has run for {running_s:.0f} s, more than --replica-max-step "
                f"{self.max_step_s:g} s: the engine is stuck"
            )

    async def openmp_env(self) -> dict[str, str | None]:
        """This replica's OpenMP settings (`OPENMP_VARS`), as its process got them."""
        return {name: os.environ.get(name) for name in OPENMP_VARS}

    async def __del__(self) -> None:
        """Serve calls this once in-flight requests drained (or the graceful timeout)."""
        self.draining = True
        await self.llm.close()


class _CompileWarnings(logging.Handler):
    """Collects the compiled decode step's warnings while the engine starts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._logger = logging.getLogger("covey.llm_backend.compiled_decode")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _CompileWarnings:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)


def replica_runtime_env(threads: int = 1) -> dict[str, Any]:
    """Ray actor options that set a replica's environment, applied when its worker starts,
    before torch loads:
    - this process's COVEY_COMPILE, when set: a local cluster inherits the front's
      environment, one joined with --address does not;
    - with `threads` >= 2, OpenMP's passive wait, unless the user chose a wait
      (`user_chose_openmp_wait`). The replica fixes its thread count (no governor), and
      a fixed team that spins collapses on a loaded node (cpu_threads.py): 2 threads
      measured at 14-25 s mean TTFT spinning, 6-8 s passive, 4-6 s with 1 thread.
      GOMP_SPINCOUNT is set to 0 with it: libgomp lets an explicit spin count override
      the policy, and `covey serve` put its default spin count (for the governor) in the
      front's environment, which a local cluster passes on."""
    from covey.llm_backend.compiled_decode import COMPILE_ENV

    env: dict[str, str] = {}
    value = os.environ.get(COMPILE_ENV)
    if value is not None:
        env[COMPILE_ENV] = value
    if threads >= 2 and not user_chose_openmp_wait():
        env.update(PASSIVE_OPENMP)
    return {"runtime_env": {"env_vars": env}} if env else {}


OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
PASSIVE_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


def user_chose_openmp_wait(environ: dict[str, str] | None = None) -> bool:
    """True when the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT, not counting the spin count
    `configure_openmp_env` sets itself when the user set neither."""
    from covey.llm_backend.cpu_threads import OPENMP_DEFAULTS

    env = os.environ if environ is None else environ
    spin = env.get("GOMP_SPINCOUNT")
    return "OMP_WAIT_POLICY" in env or (
        spin is not None and spin != OPENMP_DEFAULTS["GOMP_SPINCOUNT"]
    )


@dataclass(frozen=True)
class ReplicaReport:
    pid: int
    stats: Any  # EngineStats
    pins: dict[str, int]
    model: str
    capabilities: Any  # EngineCapabilities
    units: dict[str, int]  # router unit hash -> characters, of what its prefix cache holds
    chunks: dict[str, int]  # chunk id -> characters, of what its chunk store holds
    queued_prefill_tokens: int = 0  # prompt tokens waiting or running, still to prefill
    prefill_profile: tuple[float, float] | None = None  # (fixed s, s per token), measured


def app_name(index: int, prefix: str = APP_PREFIX) -> str:
    return f"{prefix}{index}"


def deploy_replicas(
    replicas: int,
    model: str | None = None,
    engine_config: dict[str, Any] | None = None,
    threads: int = 1,
    num_cpus: float | None = None,
    app_prefix: str = APP_PREFIX,
    num_gpus: float = 0.0,
    health: HealthCheck | None = None,
) -> dict[str, Any]:
    """Deploy `replicas` engine replicas on the connected Ray cluster (`ray.init` first);
    returns application name -> its `DeploymentHandle`. Each reserves `num_cpus` Ray CPUs
    (default: its `threads`, so Ray places no more compute threads on a node than it has
    cores)."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    config = dict(engine_config or {})
    spec = ReplicaSpec(model, config, threads, num_cpus, num_gpus, health=health or HealthCheck())
    return deploy_specs({app_name(i, app_prefix): spec for i in range(replicas)})


@dataclass(frozen=True)
class ReplicaSpec:
    model: str | None
    engine_config: dict[str, Any]
    threads: int = 1
    num_cpus: float | None = None  # Ray CPUs it reserves; None: one per thread
    num_gpus: float = 0.0  # see gpus_per_replica
    # Serve replicas behind this one application: more than one, and Serve's own router
    # (power of two choices) picks among them, not covey's (see `RayEngine(pooled=True)`).
    num_replicas: int = 1
    health: HealthCheck = HealthCheck()

    @property
    def cpus(self) -> float:
        return float(self.threads) if self.num_cpus is None else self.num_cpus


def deploy_specs(specs: dict[str, ReplicaSpec]) -> dict[str, Any]:
    """Deploy one application per name (one replica, unless its spec says more), all at
    once (they load in parallel); returns name -> `DeploymentHandle`. Refuses names Serve
    already runs: deploying over them would replace another front's replicas, and its
    close would later delete ours."""
    serve = require_ray()
    serve.start(proxy_location="Disabled")
    taken = sorted(set(specs) & set(serve.status().applications))
    if taken:
        raise ConfigError(
            f"Ray Serve already runs {', '.join(taken)} (another covey front on this cluster?): "
            "give another --ray-app-prefix, or stop that front first"
        )
    targets = []
    for name, spec in specs.items():
        deployment = serve.deployment(
            EngineReplica,
            name="engine",
            num_replicas=spec.num_replicas,
            ray_actor_options={
                "num_cpus": spec.cpus,
                "num_gpus": spec.num_gpus,
                **replica_runtime_env(spec.threads),
            },
            max_ongoing_requests=1024,  # the engine batches; the router bounds imbalance
            health_check_period_s=spec.health.period_s,
            health_check_timeout_s=spec.health.timeout_s,
            graceful_shutdown_wait_loop_s=0.5,
            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        )
        bound = deployment.bind(
            spec.model,
            dict(spec.engine_config),
            spec.threads,
            spec.num_gpus,
            spec.health.max_step_s,
        )
        targets.append(serve.RunTarget(bound, name=name, route_prefix=None))
    return dict(zip(specs, serve.run_many(targets)))


def running_replicas(names: list[str]) -> dict[str, int]:
    """name -> how many replicas Serve's controller has RUNNING for that application (0
    while a dead one is being replaced, or when the application is gone)."""
    serve = require_ray()
    apps = serve.status().applications
    running: dict[str, int] = {}
    for name in names:
        app = apps.get(name)
        deployments = app.deployments.values() if app is not None else ()
        running[name] = sum(d.replica_states.get("RUNNING", 0) for d in deployments)
    return running


def delete_replicas(names: list[str]) -> None:
    """Shut the replicas down; each drains its requests in flight first."""
    serve = require_ray()
    for name in names:
        serve.delete(name)
