"""`ServerMetrics`: what `GET /metrics` exposes in Prometheus' text format.

Requests and latency per app, time to first token and time per output token per engine
request, and the engine's load read from `EngineStats` when scraped: KV pool use, prefix
and chunk cache hit rates, queue depth, running and paused requests, and what the pause
policy did with paused requests' KV (bytes kept and swapped, recompute, per-tool times),
and the CPU threads the engine runs on with the thread governor's changes.
Each server owns its own registry, so two servers in one process (tests) never share
counters.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from covey.llm_backend.engine_client import EngineClient
from covey.llm_backend.outputs import RequestMetrics
from covey.server.errors import http_error
from covey.server.event_stream import CLIENT_GONE, ClientGone

__all__ = ["CONTENT_TYPE", "ObservedRequest", "ServerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# `*_created` timestamps per series double the output and tell a scraper nothing it needs.
disable_created_metrics()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "covey_requests", "Requests answered, per app and HTTP status", ["app", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "covey_request_seconds", "Request latency per app (streams: until the last event)",
            ["app"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "covey_ttft_seconds", "Time to first token of engine requests",
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "covey_tpot_seconds", "Time per output token after the first, per engine request",
            buckets=TPOT_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "covey_prompt_tokens", "Prompt tokens of finished engine requests", registry=r
        )
        self.output_tokens = Counter(
            "covey_output_tokens", "Output tokens of finished engine requests", registry=r
        )
        self.cached_tokens = Counter(
            "covey_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
            registry=r,
        )

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r)

        self.kv_blocks = gauge(
            "covey_kv_blocks", "KV pool blocks by state (used, cached, pinned, free, total)",
            ("state",),
        )
        self.kv_usage = gauge("covey_kv_usage_ratio", "Share of the KV pool live requests hold")
        self.prefix_hit_rate = gauge(
            "covey_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / queried"
        )
        self.chunk_hit_rate = gauge(
            "covey_chunk_cache_hit_rate", "Chunk KV store hits / lookups, per tier", ("tier",)
        )
        self.queue_depth = gauge("covey_queue_depth", "Engine requests waiting to be scheduled")
        self.running = gauge("covey_requests_running", "Engine requests running")
        self.paused = gauge("covey_requests_paused", "Engine requests paused (tool calls)")
        self.paused_bytes = gauge(
            "covey_paused_kv_bytes", "KV of paused requests, in the pool or swapped to host",
            ("where",),
        )
        self.pause_swap_bytes = gauge(
            "covey_pause_swap_bytes", "Paused KV copied to host (out) and back (in) since start",
            ("direction",),
        )
        self.pause_recompute = gauge(
            "covey_pause_recompute_tokens", "Tokens recomputed on resume after a discard"
        )
        self.pause_decisions = gauge(
            "covey_pause_decisions", "Pause-policy choices under memory pressure since start",
            ("action",),
        )
        self.tool_seconds = gauge(
            "covey_tool_seconds_estimate", "Mean pause-to-resume seconds per tool", ("tool",)
        )
        self.threads = gauge("covey_engine_threads", "CPU threads the engine's steps run on")
        self.thread_decisions = gauge(
            "covey_thread_decisions", "Thread-count changes by the thread governor since start",
            ("direction",),
        )

    def observe_request(self, app: str, status: int, seconds: float) -> None:
        self.requests.labels(app=app, status=str(status)).inc()
        self.latency.labels(app=app).observe(seconds)

    def observe_generation(self, metrics: RequestMetrics) -> None:
        """One finished engine request."""
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        if metrics.tpot is not None:
            self.tpot.observe(metrics.tpot)
        self.prompt_tokens.inc(metrics.num_prompt_tokens)
        self.output_tokens.inc(metrics.num_output_tokens)
        self.cached_tokens.inc(metrics.num_cached_tokens)

    async def refresh(self, engine: EngineClient) -> None:
        """Read the engine's load into the gauges (on each scrape)."""
        s = await engine.stats()
        free = s.kv_blocks_total - s.kv_blocks_used - s.kv_blocks_cached - s.kv_blocks_pinned
        for state, value in (
            ("total", s.kv_blocks_total),
            ("used", s.kv_blocks_used),
            ("cached", s.kv_blocks_cached),
            ("pinned", s.kv_blocks_pinned),
            ("free", max(free, 0)),
        ):
            self.kv_blocks.labels(state=state).set(value)
        self.kv_usage.set(s.kv_usage)
        self.prefix_hit_rate.set(s.prefix_cache_hit_rate)
        for tier, counters in s.chunk_cache.items():
            hits, misses = counters.get("hits", 0), counters.get("misses", 0)
            rate = hits / (hits + misses) if hits + misses else 0.0
            self.chunk_hit_rate.labels(tier=tier).set(rate)
        self.queue_depth.set(s.queue_depth)
        self.running.set(s.num_running)
        self.paused.set(s.num_paused)
        self.paused_bytes.labels(where="pool").set(s.paused_bytes_preserved)
        self.paused_bytes.labels(where="host").set(s.paused_bytes_swapped)
        self.pause_swap_bytes.labels(direction="out").set(s.swap_out_bytes)
        self.pause_swap_bytes.labels(direction="in").set(s.swap_in_bytes)
        self.pause_recompute.set(s.pause_recompute_tokens)
        for action, count in s.pause_decisions.items():
            self.pause_decisions.labels(action=action).set(count)
        for tool, seconds in s.tool_seconds.items():
            self.tool_seconds.labels(tool=tool or "(any)").set(seconds)
        self.threads.set(s.num_threads)
        for direction, count in s.thread_decisions.items():
            self.thread_decisions.labels(direction=direction).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ObservedRequest:
    """Times one request and records it in `metrics` once, with its final status; every
    route family (apps, `/v1`) records its requests through this one class. As a context
    manager it records the status of the exception that leaves the block, or, unless
    `deferred` (a stream records itself when its response ends), `status`."""

    def __init__(self, metrics: ServerMetrics, app: str) -> None:
        self.metrics = metrics
        self.app = app
        self.status = 200
        self.started = time.perf_counter()
        self.done = False
        self.deferred = False

    def __enter__(self) -> ObservedRequest:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            gone = isinstance(exc, ClientGone) or not isinstance(exc, Exception)
            self.finish(CLIENT_GONE if gone else http_error(exc).status)
        elif not self.deferred:
            self.finish(self.status)

    def finish(self, status: int) -> None:
        if not self.done:
            self.done = True
            self.metrics.observe_request(self.app, status, time.perf_counter() - self.started)
