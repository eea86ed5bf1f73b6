"""Scale-out benchmark: covey's engine replicas on Ray Serve behind its cache-aware router,
against round robin, Ray Serve's own power-of-two-choices router and one replica, over
real HTTP on 127.0.0.1.

    python benchmarks/scale.py [--quick] [--json PATH] [--plot PATH]

Workload `affinity`: several apps, each with its own long static system prompt (~470
tokens), answering RAG requests: prompt = the app's prompt, two passages drawn
Zipf(1.1)-popular from a corpus, a question; the app drawn uniformly. Streamed through
`POST /v1/completions` of a covey server whose engine is a `RayEngine` over the replicas.

Sizing (the situation a cache-aware router is for, as in SGLang's router benchmark): the
working set, all the apps' prompts, exceeds what one replica's KV pool can cache but fits
in the two pools together. Each replica's pool is computed, not picked: room for its share
of the running requests (concurrency / 2 of the mean request's tokens) plus `APP_SHARE`
(0.55) of all the apps' prompt tokens. Cache-aware routing can keep half of the apps on
each replica (0.5 < 0.55: they fit); round robin and pow2 send every app to both replicas,
whose pools can then cache about half of them each (LRU under uniform draws: a hit about
half the time). Every routed system runs the same prompts (each on its own text, see
below) on replicas with the same pool; `covey-single` has both threads and both pools, so
the whole working set fits it. The prompts of a hit are long on purpose: a hit saves the
prefill of ~470 tokens out of ~620.

Systems (each pass on fresh text: every pass's prompts and passages carry its own tag, so
no pass finds KV another one left; the tags are of one length, `p00`, `p01`, ..., not the
systems' names, so every system runs prompts of the same length; covey and round robin share
their 2 replicas and run alternately, covey, round robin, round robin, covey, their two passes
pooled):
- `covey`: 2 replicas (one Serve application each), cache-aware routing;
- `covey-round-robin`: the same 2 replicas, round robin;
- `covey-pow2`: Ray Serve's own default router (power of two choices over the replicas'
  queue lengths) over one Serve deployment of 2 replicas, which the front calls as one;
- `covey-single`: 1 replica with both threads and the pool of two.
Metrics: `prefix_hit_rate` (prompt tokens served from the replicas' prefix caches over all
prompt tokens, from each response's `usage.prompt_tokens_details.cached_tokens`),
`ttft_s` (mean, first text at the client), `p99_ttft_s`, `requests_per_s`; and in each
record's params, `ttft_breakdown`: where the mean TTFT goes (`breakdown`: at the replica's
engine, in the hand-off between the front and the replica, in HTTP).
Target: covey's mean TTFT at least 1.5x lower than round robin's, with a higher hit rate.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
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
SYSTEMS = ("covey", "covey-round-robin", "covey-pow2", "covey-single")
APP_SHARE = 0.55  # of all apps' prompt tokens, one replica's pool caches (beyond live use)
REPLICAS = 2
BLOCK = 16  # the engine's KV block size: pools are whole blocks
TOPICS = ["files and paths", "dates and times", "regular expressions", "concurrency"]


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"apps": 8, "chunks": 16, "requests": 32, "concurrency": 4, "max_tokens": 4}
    return {"apps": 16, "chunks": 48, "requests": 160, "concurrency": 8, "max_tokens": 16}


def workload(tag: str, size: dict[str, Any], seed: int = 0) -> tuple[list[str], list[str]]:
    """(the prompts in order, the apps' prompts): per app a ~470-token system prompt, per
    request two passages drawn Zipf(1.1) from the corpus and a question."""
    rng = random.Random(seed)
    apps = [
        f"[{tag}] You are the assistant of app {a}, which answers questions about Python's "
        f"{TOPICS[a % len(TOPICS)]}. "
        + " ".join(f"Rule {r}: cite the passage behind claim {r} of app {a}." for r in range(26))
        for a in range(size["apps"])
    ]
    chunks = [
        f"[{tag}] Passage {c}. "
        + " ".join(f"Fact {c}.{k}: the module m{c} offers function f{k}." for k in range(4))
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
    return prompts, apps


def pool_tokens(size: dict[str, Any]) -> int:
    """One replica's KV pool: its running requests plus `APP_SHARE` of all app prompts
    (see the module's docstring), in whole blocks."""
    from covey.llm_backend.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    prompts, apps = workload(pass_tag(99), size)  # a tag as long as every pass's
    request = statistics.fmean(len(tok.encode(p)) for p in prompts) + size["max_tokens"]
    app_tokens = sum(len(tok.encode(a)) for a in apps)
    live = size["concurrency"] / REPLICAS * request
    return BLOCK * math.ceil((live + APP_SHARE * app_tokens) / BLOCK)


def pass_tag(index: int) -> str:
    """The tag of the `index`-th pass: one length for every pass and system (the tag is in
    every prompt three times, and a longer one would mean more prefill for that system)."""
    return f"p{index:02d}"


async def drive(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int):
    """Send every prompt (streamed completions, greedy) from `concurrency` clients; returns
    (TTFTs, prompt tokens, cached prompt tokens, wall seconds, completion id -> TTFT of
    those whose text came, for `breakdown` to join with the front's view)."""
    import httpx

    todo = list(enumerate(prompts))
    ttfts: list[float] = []
    by_id: dict[str, float] = {}
    tokens = [0, 0]

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
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            first, cid = None, None
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for line in reply.aiter_lines():
                    data = line[5:].strip() if line.startswith("data:") else "[DONE]"
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    cid = cid or chunk.get("id")
                    choices = chunk.get("choices") or [{}]
                    if first is None and choices[0].get("text"):
                        first = time.perf_counter()
                    usage = chunk.get("usage")
                    if usage:
                        tokens[0] += usage["prompt_tokens"]
                        tokens[1] += usage["prompt_tokens_details"]["cached_tokens"]
            ttfts.append((first or time.perf_counter()) - start)
            if first is not None and cid is not None:
                by_id[cid] = first - start

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return ttfts, tokens[0], tokens[1], time.perf_counter() - started, by_id


def run_system(
    tag: str, policy: str, handles: dict[str, Any], size: dict[str, Any], pooled: bool
) -> dict[str, Any]:
    """One pass of the workload, on text tagged `tag`, through a fresh front."""
    from covey.llm_backend.tokenizer import load_tokenizer
    from covey.server.background_server import BackgroundServer
    from covey.server.ray_engine import RayEngine
    from covey.server.replica_router import ReplicaRouter
    from covey.server.server_builder import build_state
    from covey.server.state import ServerSettings

    router = ReplicaRouter(list(handles), policy=policy)  # the mirror: sized by reports
    engine = RayEngine(
        handles, router, tokenizer=load_tokenizer(None), report_interval_s=0.5, pooled=pooled,
        pool_size=REPLICAS,
    )
    asyncio.run(engine.connect())
    inside = observe(engine)
    state = build_state(engine, None, ServerSettings(max_in_flight=256), apps={})
    front = BackgroundServer(state)
    try:
        prompts, _ = workload(tag, size)
        ttfts, prompt_tokens, cached, wall, by_id = asyncio.run(
            drive(front.url, engine.model_name, prompts, size["concurrency"], size["max_tokens"])
        )
    finally:
        front.stop()
    return {
        "ttfts": ttfts,
        "client": by_id,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "wall_s": wall,
        "decisions": dict(router.counters.decisions),
        "inside": inside,
        # The replicas' measured prefill speeds, as the cost model used them (ms a token).
        "per_token_ms": {n: round(1e3 * (v.per_token_s or 0), 3) for n, v in router.views.items()},
    }


def observe(engine: Any) -> dict[str, dict[str, float | None]]:
    """Where each request's TTFT goes, seen from the front (instrumentation only), by
    engine request id: the front's TTFT (its call to its first output with text, as the
    client counts), the replica engine's own TTFT (its arrival to its first token, from
    the outputs' metrics) and of that its wait before the first step that ran it
    (`queue`); None where one was not seen. The client's TTFT less the front's is HTTP,
    the rest of the front's is the hand-off to and from the replica (Ray, its loop)."""
    seen: dict[str, dict[str, float | None]] = {}
    generate = engine.generate

    async def observed(prompt: Any, *args: Any, **kwargs: Any):
        start, first = time.perf_counter(), None
        async for out in generate(prompt, *args, **kwargs):
            if first is None and out.delta_text:
                first = time.perf_counter() - start
            if out.finished:
                rid = kwargs.get("request_id") or out.request_id
                seen[rid] = {
                    "front": first, "engine": out.metrics.ttft, "queue": out.metrics.queue_time
                }
            yield out

    engine.generate = observed
    return seen


def breakdown(runs: list[dict[str, Any]]) -> dict[str, float | int | None]:
    """Mean seconds of a request's TTFT: at the replica's engine (`engine_ttft_s`, of which
    `engine_queue_s` before its first step), in the hand-off between the front and the
    replica (`handoff_s`: the front's first text less the engine's first token, so it
    also holds any steps the detokenizer waits before a token makes text), and in HTTP and
    the front's routes (`http_s`).

    Every mean is over the same requests, `requests` of the `of` whose first text reached
    the client: those the front and the engine timed too, joined by id (the completion's
    id is its engine request's less the `-index` of its prompt). `engine_queue_s` is over
    the `queued` of them whose engine reported a queue time: a missing one is not zero."""
    rows = []
    for run in runs:
        inside = {rid.rsplit("-", 1)[0]: got for rid, got in run["inside"].items()}
        for cid, client in run["client"].items():
            got = inside.get(cid)
            if got and got["front"] is not None and got["engine"] is not None:
                rows.append((client, got["front"], got["engine"], got["queue"]))
    of = sum(len(run["client"]) for run in runs)
    if not rows:
        return {"requests": 0, "of": of}
    client, front, engine = (statistics.fmean(r[k] for r in rows) for k in range(3))
    queues = [r[3] for r in rows if r[3] is not None]
    return {
        "engine_ttft_s": round(engine, 3),
        "engine_queue_s": round(statistics.fmean(queues), 3) if queues else None,
        "handoff_s": round(front - engine, 3),
        "http_s": round(client - front, 3),
        "requests": len(rows),
        "of": of,
        "queued": len(queues),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics over a system's passes, pooled."""
    ttfts = sorted(t for run in runs for t in run["ttfts"])
    prompt_tokens = sum(run["prompt_tokens"] for run in runs)
    decisions: dict[str, int] = {}
    for run in runs:
        for k, v in run["decisions"].items():
            decisions[k] = decisions.get(k, 0) + v
    return {
        "prefix_hit_rate": sum(r["cached_tokens"] for r in runs) / max(prompt_tokens, 1),
        "ttft_s": statistics.fmean(ttfts),
        "p99_ttft_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "requests_per_s": len(ttfts) / sum(run["wall_s"] for run in runs),
        "decisions": decisions,
        "passes": len(runs),
        "ttft_breakdown": breakdown(runs),
    }


def warm(handles: dict[str, Any], calls: int) -> None:
    """A few tiny requests per handle: the first forward passes of a process are slow."""
    from covey.llm_backend.sampling_params import SamplingParams

    async def one(handle: Any) -> None:
        params = SamplingParams(max_tokens=2, temperature=0)
        async for _ in handle.generate.options(stream=True).remote("Hello there", params, None, 0):
            pass

    async def all_of_them() -> None:
        await asyncio.gather(*(one(h) for h in handles.values() for _ in range(calls)))

    asyncio.run(all_of_them())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    size = sizes(args.quick)
    from covey.server.ray_cluster import init_ray
    from covey.server.ray_deployment import ReplicaSpec, delete_replicas, deploy_specs

    # Ray kills workers when the node's memory is 95% used, by anyone: on a shared machine
    # that kills replicas and the Serve controller mid-run. Off for this local cluster.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    started = time.perf_counter()
    pool = pool_tokens(size)
    init_ray(num_cpus=REPLICAS)
    config = {"device": "cpu", "dtype": "float32", "kv_cache_tokens": pool}
    results = []
    params = {**size, "replica_kv_tokens": pool, "app_share": APP_SHARE}
    one = ReplicaSpec(None, config, threads=1)
    # One deployment at a time (three models at once do not fit a small shared machine),
    # each serving passes of (system, routing policy). covey and round robin share their
    # replicas, so they alternate A, B, B, A: a machine whose load drifts (shared, noisy)
    # weighs on both alike. Each pass runs on its own text.
    setups = [
        (("covey", "cache_aware"), ("covey-round-robin", "round_robin"))
        + (("covey-round-robin", "round_robin"), ("covey", "cache_aware")),
        (("covey-pow2", "pow2"),),
        (("covey-single", "cache_aware"),),
    ]
    specs = [
        {f"covey-engine-{i}": one for i in range(REPLICAS)},
        {"covey-engine-pool": ReplicaSpec(None, config, threads=1, num_replicas=REPLICAS)},
        {"covey-engine-single": ReplicaSpec(
            None, {**config, "kv_cache_tokens": REPLICAS * pool}, threads=REPLICAS
        )},
    ]
    passes = itertools.count()
    try:
        for systems, spec in zip(setups, specs):
            handles = deploy_specs(spec)
            pooled = any(s.num_replicas > 1 for s in spec.values())
            warm(handles, 2 * REPLICAS if pooled else 2)
            print(f"scale: {list(handles)} up at {time.perf_counter() - started:.0f}s", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {}
            try:
                for system, policy in systems:
                    tag = pass_tag(next(passes))
                    got = run_system(tag, policy, handles, size, pooled)
                    runs.setdefault(system, []).append(got)
                    mean = statistics.fmean(got["ttfts"])
                    print(
                        f"scale: {system} ({tag}): mean TTFT {mean:.2f}s, {got['decisions']}, "
                        f"prefill ms/token {got['per_token_ms']}, {breakdown([got])}",
                        flush=True,
                    )
            finally:
                delete_replicas(list(handles))
            for system, policy in dict(systems).items():
                got = summary(runs[system])
                print(f"scale: {system}: {got}", flush=True)
                n = sum(s.num_replicas for s in spec.values())
                router = "ray_serve_pow2" if pooled else policy
                extra = {
                    "replicas": n,
                    "policy": router,
                    "decisions": got["decisions"],
                    "passes": got["passes"],
                    "ttft_breakdown": got["ttft_breakdown"],
                }
                for metric in METRICS:
                    value = got[metric]
                    results.append(record(WORKLOAD, system, metric, value, {**params, **extra}))
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

    systems = list(SYSTEMS)
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
