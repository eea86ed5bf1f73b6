"""The replicas and the router in `/metrics`: one series per replica and per decision.

A Prometheus collector over a `RayEngine`, registered on the server's own registry. It
reads what the engine already holds (each replica's last report, the router's counters),
so a scrape costs no call to a replica: the server's own `stats()` reads the same
reports, which the engine's report loop refreshes. Series:
- `covey_replica_up`, `covey_replica_queue_depth`, `covey_replica_running`,
  `covey_replica_kv_usage_ratio`, `covey_replica_prefix_cache_hit_rate`,
  `covey_replica_chunk_cache_hit_rate` (host tier), `covey_replica_pins`: per replica
  (with `--routing ray_serve`, per Serve replica behind the pool, labelled
  "<pool>/pid<pid>", from the reports Serve spread over them in the last few rounds);
- `covey_replica_deaths`, `covey_replica_retried_requests`, `covey_replica_failed_requests`
  (requests failed with 503 because their replica died): per replica;
- `covey_router_decisions{policy,decision}`: affinity (the best cache match), fallback
  (the best match was too far ahead in queue), balance (nothing matched: least loaded),
  pin (a pin's holder), round_robin or pow2; with `--routing ray_serve` every call is
  counted as policy and decision ray_serve (Serve's router picked its replica);
- `covey_router_predicted_hit_rate`: prompt characters the router believed cached where it
  sent them, over all it routed.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from covey.server.ray_engine import RayEngine


class RayMetricsCollector:
    def __init__(self, engine: RayEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["replica"])

        up = gauge("covey_replica_up", "1 if the replica answers, 0 while it is replaced")
        queue = gauge("covey_replica_queue_depth", "Requests waiting at the replica")
        running = gauge("covey_replica_running", "Requests running at the replica")
        kv = gauge("covey_replica_kv_usage_ratio", "Share of the replica's KV pool in use")
        hits = gauge("covey_replica_prefix_cache_hit_rate", "The replica's prefix-cache hits")
        chunk = gauge(
            "covey_replica_chunk_cache_hit_rate", "The replica's chunk store hits (host tier)"
        )
        pins = gauge("covey_replica_pins", "Prefixes pinned at the replica")
        deaths = CounterMetricFamily(
            "covey_replica_deaths", "Times the replica was found dead", labels=["replica"]
        )
        retried = CounterMetricFamily(
            "covey_replica_retried_requests",
            "Requests retried elsewhere after this replica died before streaming",
            labels=["replica"],
        )
        failed = CounterMetricFamily(
            "covey_replica_failed_requests",
            "Requests failed (503) because this replica died while streaming them",
            labels=["replica"],
        )
        pooled = self.engine.pooled
        for r in self.engine.replica_states():
            up.add_metric([r.name], 1.0 if r.up else 0.0)
            deaths.add_metric([r.name], r.deaths)
            retried.add_metric([r.name], r.retries)
            failed.add_metric([r.name], r.failed)
            if not r.up:
                continue
            for pid, s in r.member_stats(self.engine.member_ttl_s).items():
                # A pool's Serve replicas are told apart by process id.
                label = [f"{r.name}/pid{pid}" if pooled else r.name]
                queue.add_metric(label, s.num_waiting)
                running.add_metric(label, s.num_running)
                kv.add_metric(label, s.kv_usage)
                hits.add_metric(label, s.prefix_cache_hit_rate)
                host = s.chunk_cache.get("host", {})
                looked = host.get("hits", 0) + host.get("misses", 0)
                chunk.add_metric(label, host.get("hits", 0) / looked if looked else 0.0)
                if not pooled:  # a pool offers no pins
                    pins.add_metric(label, len(r.pins))
        yield from (up, queue, running, kv, hits, chunk, pins, deaths, retried, failed)
        router = self.engine.router
        decisions = CounterMetricFamily(
            "covey_router_decisions",
            "Routing decisions per policy and kind",
            labels=["policy", "decision"],
        )
        if pooled:  # Serve's router picked each call's replica, not covey's
            total = sum(router.counters.decisions.values())
            decisions.add_metric(["ray_serve", "ray_serve"], total)
        else:
            for decision, count in sorted(router.counters.decisions.items()):
                decisions.add_metric([router.policy, decision], count)
        yield decisions
        predicted = GaugeMetricFamily(
            "covey_router_predicted_hit_rate",
            "Prompt characters believed cached at the chosen replica / characters routed",
        )
        predicted.add_metric([], router.counters.predicted_hit_rate)
        yield predicted


def register_ray_metrics(registry: CollectorRegistry, engine: RayEngine) -> None:
    registry.register(RayMetricsCollector(engine))
