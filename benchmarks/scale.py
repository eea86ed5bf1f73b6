"""Scale-out benchmark: covey's engine replicas on Ray Serve behind its cache-aware router,
against round robin, power of two choices and one replica, over real HTTP on 127.0.0.1.

    python benchmarks/scale.py [--quick] [--json PATH] [--plot PATH]

Workload `affinity`: several apps, each with its own long static system prompt, answering
RAG requests over passages drawn Zipf-popular from a small corpus (prompt = the app's
prompt, two passages, a question), streamed through `POST /v1/completions` of a covey
server whose engine is a `RayEngine` over the replicas. Each replica's KV pool holds about
half of the workload's prompts and passages: routing decides whether a replica's cache
covers what it is sent.

Systems (each on fresh text: every system's prompts and passages carry its own tag, so no
system finds KV another one left on the same replicas):
- `covey`: 2 replicas, cache-aware routing;
- `covey-round-robin`: 2 replicas, round robin;
- `covey-pow2`: 2 replicas, two random replicas and the shorter queue (Ray Serve's default
  algorithm, run by covey's router so it sees the same load as the others);
- `covey-single`: 1 replica with both threads and the pool of two.
Metrics: `prefix_hit_rate` (prompt tokens the replicas served from their prefix caches /
prompt tokens), `ttft_s` (mean, first text at the client), `p99_ttft_s`, `requests_per_s`.
Target: covey's mean TTFT at least 1.5x lower than round robin's, with a higher hit rate.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import parse_args, record, write_results  # noqa: E402

NAME = "scale"
WORKLOAD = "affinity"
METRICS = ("prefix_hit_rate", "ttft_s", "p99_ttft_s", "requests_per_s")
SYSTEMS = (
    ("covey", "cache_aware", 2),
    ("covey-round-robin", "round_robin", 2),
    ("covey-pow2", "pow2", 2),
    ("covey-single", "cache_aware", 1),
)
REPLICA_KV_TOKENS = 2048
TOPICS = ["files and paths", "dates and times", "regular expressions", "concurrency"]


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"apps": 4, "chunks": 12, "requests": 20, "concurrency": 4, "max_tokens": 4}
    return {"apps": 6, "chunks": 24, "requests": 96, "concurrency": 8, "max_tokens": 16}


def workload(tag: str, size: dict[str, Any], seed: int = 0) -> list[str]:
    """The prompts, in order: per app a ~250-token system prompt, per request two passages
    drawn Zipf(1.1) from the corpus and a question."""
    rng = random.Random(seed)
    apps = [
        f"[{tag}] You are the assistant of app {a}, which answers questions about Python's "
        f"{TOPICS[a % len(TOPICS)]}. "
        + " ".join(f"Rule {r}: cite the passage behind claim {r} of app {a}." for r in range(20))
        for a in range(size["apps"])
    ]
    chunks = [
        f"[{tag}] Passage {c}. "
        + " ".join(f"Fact {c}.{k}: the module m{c} offers function f{k}." for k in range(8))
        for c in range(size["chunks"])
    ]
    weights = [1 / (c + 1) ** 1.1 for c in range(len(chunks))]
    prompts = []
    for i in range(size["requests"]):
        app = apps[rng.randrange(len(apps))]
        picked: list[str] = []
        while len(picked) < 2:
            c = rng.choices(chunks, weights)[0]
            if c not in picked:
                picked.append(c)
        prompts.append(f"{app}\n\nPassages:\n{picked[0]}\n{picked[1]}\n\nQuestion {i}: why?\n")
    return prompts


async def drive(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int):
    """Send every prompt (streamed completions, greedy) from `concurrency` clients; returns
    (TTFTs, wall seconds)."""
    import httpx

    todo = list(enumerate(prompts))
    ttfts: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            _, prompt = todo.pop(0)
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
            start = time.perf_counter()
            first = None
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else "[DONE]"
                    if first is None and data != "[DONE]":
                        choices = json.loads(data).get("choices") or [{}]
                        if choices[0].get("text"):
                            first = time.perf_counter()
            ttfts.append((first or time.perf_counter()) - start)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return ttfts, time.perf_counter() - started


def run_system(system: str, policy: str, handles: dict[str, Any], size: dict[str, Any]):
    from covey.llm_backend.tokenizer import load_tokenizer
    from covey.server.background_server import BackgroundServer
    from covey.server.ray_engine import RayEngine
    from covey.server.replica_router import ReplicaRouter
    from covey.server.server_builder import build_state
    from covey.server.state import ServerSettings

    router = ReplicaRouter(list(handles), policy=policy, capacity_chars=4 * REPLICA_KV_TOKENS)
    engine = RayEngine(handles, router, tokenizer=load_tokenizer(None), report_interval_s=0.5)
    asyncio.run(engine.connect())
    before = asyncio.run(engine.stats(refresh=True))
    state = build_state(engine, None, ServerSettings(max_in_flight=256), apps={})
    front = BackgroundServer(state)
    try:
        prompts = workload(system, size)
        ttfts, wall = asyncio.run(
            drive(front.url, engine.model_name, prompts, size["concurrency"], size["max_tokens"])
        )
    finally:
        front.stop()
    after = asyncio.run(engine.stats(refresh=True))
    queried = after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens
    hits = after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
    ttfts.sort()
    return {
        "prefix_hit_rate": hits / queried if queried else 0.0,
        "ttft_s": statistics.fmean(ttfts),
        "p99_ttft_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "requests_per_s": len(ttfts) / wall,
        "decisions": dict(router.counters.decisions),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    size = sizes(args.quick)
    from covey.server.ray_cluster import init_ray
    from covey.server.ray_deployment import ReplicaSpec, delete_replicas, deploy_specs

    # Ray kills workers when the node's memory is 95% used, by anyone: on a shared machine
    # that kills replicas and the Serve controller mid-run. Off for this local cluster.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    started = time.perf_counter()
    init_ray(num_cpus=2)
    config = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": REPLICA_KV_TOKENS}
    results = []
    params = {**size, "replica_kv_tokens": REPLICA_KV_TOKENS}
    try:
        # Two replicas for the routed systems, then one with both threads and both pools
        # (one after the other: three models at once do not fit a small shared machine).
        for specs in (
            {f"covey-engine-{i}": ReplicaSpec(None, config, threads=1) for i in range(2)},
            {"covey-engine-single": ReplicaSpec(
                None, {**config, "kv_cache_tokens": 2 * REPLICA_KV_TOKENS}, threads=2
            )},
        ):
            handles = deploy_specs(specs)
            print(f"scale: {list(handles)} up at {time.perf_counter() - started:.0f}s", flush=True)
            try:
                for system, policy, n in SYSTEMS:
                    if n != len(handles):
                        continue
                    got = run_system(system, policy, handles, size)
                    print(f"scale: {system}: {got}", flush=True)
                    extra = {"replicas": n, "policy": policy, "decisions": got["decisions"]}
                    for metric in METRICS:
                        value = got[metric]
                        results.append(record(WORKLOAD, system, metric, value, {**params, **extra}))
            finally:
                delete_replicas(list(handles))
    finally:
        import ray

        ray.shutdown()
    write_results(args, NAME, results, "cpu", "SmolLM2-135M-Instruct")
    plot(results, args.plot)
    return 0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [s for s, _, _ in SYSTEMS]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS):
        values = [
            next((r["value"] or 0 for r in results if (r["system"], r["metric"]) == (s, metric)), 0)
            for s in systems
        ]
        ax.bar(range(len(systems)), values, color=["C0", "C1", "C2", "C3"])
        ax.set_xticks(range(len(systems)), [s.replace("covey-", "") for s in systems])
        ax.set_title(metric)
    fig.suptitle("covey on Ray Serve, workload affinity (2 replicas; single: 1 with 2 threads)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
