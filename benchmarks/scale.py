"""Scale-out benchmark: covey's engine replicas on Ray Serve behind its cache-aware router,
against round robin, Ray Serve's own power-of-two-choices router and one replica, over
real HTTP on 127.0.0.1.

    python benchmarks/scale.py [--quick] [--json PATH] [--plot PATH]
                               [--arrival closed|poisson] [--rate R | --load F]

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

Arrivals (`--arrival`, recorded in every record's params and in the PNG's title):
- `poisson` (the default; open loop, as vLLM's `benchmark_serving` and SGLang's
  `bench_serving` send by default): requests arrive at `--rate` requests/s whatever the
  completions do, at times from `poisson_arrivals` with a fixed seed, so every system and
  pass gets the SAME arrival times. TTFT counts from a request's arrival. Without `--rate`
  the rate is `--load` (0.7) times the requests/s a closed-loop round robin pass sustains,
  measured first in the same run on the same two replicas (a fraction of the baseline's
  capacity: no system is overloaded by choice of rate, and a loaded or quiet machine gets a
  rate it can serve; "capacity" here is that closed-loop throughput at `concurrency`
  clients). A generous bound instead of a client count: at most `IN_FLIGHT` (64) requests in
  flight, a request past it waits, on the clock. `requests_per_s` is, as in the closed loop
  (and vLLM's benchmark), the requests over the seconds from the start to the last
  completion; below `BEHIND` (0.85) of the offered rate, the system fell behind (its queue
  grew, so its last requests ended long after the last arrival) and its params say `behind:
  true`. A system that keeps up loses only its last request's latency (`drain_s`) against
  the offered rate.
- `closed`: `concurrency` clients, each sending its next request when its last one ends.
  By Little's law a request's latency is then clients / throughput, so the prefill a hit
  saves mostly speeds up its neighbours' steps rather than its own TTFT, and covey's TTFT
  gain over round robin is bounded by its throughput gain. A harder test for a router than
  the usual open loop; its figures are reported beside it.
"""

from __future__ import annotations

import argparse
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
IN_FLIGHT = 64  # open loop: requests in flight at most (generous: a bound, not a client cap)
LOAD = 0.7  # open loop without --rate: this fraction of closed-loop round robin's requests/s
BEHIND = 0.85  # open loop: requests/s below this fraction of the offered rate fell behind
ARRIVAL_SEED = 15  # one schedule for every system and pass
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


def poisson_arrivals(n: int, rate: float, seed: int = ARRIVAL_SEED) -> list[float]:
    """The seconds after the start at which each of `n` requests arrives: Poisson arrivals
    (exponential gaps, seeded) at exactly `rate` requests/s, the n-th at n / rate.

    The gaps are scaled to sum to n / rate: a few dozen exponential gaps alone would offer
    a rate 20% off the one named. Scaled this way the times are those of a Poisson process
    given that its n-th arrival falls at n / rate (normalised exponential gaps are uniform
    spacings), so the schedule is still Poisson-like, and the rate it claims is the rate it
    offers. A function of (n, rate, seed) only: every system gets the same times."""
    if n < 1 or not rate > 0 or math.isinf(rate):
        raise ValueError(f"poisson_arrivals needs n >= 1 and a finite rate > 0, got {n}, {rate}")
    rng = random.Random(seed)
    gaps = [rng.expovariate(1.0) for _ in range(n)]
    scale = n / rate / sum(gaps)
    times = list(itertools.accumulate(g * scale for g in gaps))
    times[-1] = n / rate  # the sum's rounding: the last arrival is where the rate puts it
    return times


def request_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streamed, greedy completion of `max_tokens` tokens exactly, with its usage."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(http: Any, body: dict[str, Any], tokens: list[int]) -> tuple[float | None, Any]:
    """Stream one completion; returns (the clock at its first text or None, its completion
    id) and adds its prompt and cached prompt tokens to `tokens`."""
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
    return first, cid


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
            start = time.perf_counter()
            first, cid = await send(http, request_body(model, prompt, max_tokens), tokens)
            ttfts.append((first or time.perf_counter()) - start)
            if first is not None and cid is not None:
                by_id[cid] = first - start

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return ttfts, tokens[0], tokens[1], time.perf_counter() - started, by_id


async def drive_open(
    url: str, model: str, prompts: list[str], arrivals: list[float], max_tokens: int,
    bound: int = IN_FLIGHT,
):
    """Send prompt i at `arrivals[i]` seconds after the start whatever the others do (open
    loop), at most `bound` in flight; returns `drive`'s five values, TTFTs counted from each
    request's arrival (a request held back by the bound, or sent late by a busy client,
    waits on the clock), and the schedule's record: the offered rate (n over the last
    arrival), the seconds from the last arrival to the last completion (`drain_s`), the
    most requests in flight, how many waited for the bound and the latest send."""
    import httpx

    ttfts: list[float] = []
    by_id: dict[str, float] = {}
    tokens = [0, 0]
    gate = asyncio.Semaphore(bound)
    flying = [0, 0]  # now, most
    held = 0
    late = 0.0

    async def one(http: httpx.AsyncClient, prompt: str, due: float) -> None:
        nonlocal held
        held += gate.locked()
        async with gate:
            flying[0] += 1
            flying[1] = max(flying)
            try:
                first, cid = await send(http, request_body(model, prompt, max_tokens), tokens)
            finally:
                flying[0] -= 1
        ttfts.append((first or time.perf_counter()) - due)
        if first is not None and cid is not None:
            by_id[cid] = first - due

    limits = httpx.Limits(max_connections=bound, max_keepalive_connections=bound)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        tasks = []
        for prompt, at in zip(prompts, arrivals, strict=True):
            due = started + at
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            late = max(late, time.perf_counter() - due)
            tasks.append(asyncio.create_task(one(http, prompt, due)))
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    schedule = {
        "offered_per_s": len(prompts) / arrivals[-1],
        "drain_s": round(wall - arrivals[-1], 3),
        "max_in_flight": flying[1],
        "held": held,
        "latest_send_s": round(late, 3),
    }
    return ttfts, tokens[0], tokens[1], wall, by_id, schedule


def run_system(
    tag: str, policy: str, handles: dict[str, Any], size: dict[str, Any], pooled: bool,
    arrivals: list[float] | None = None,
) -> dict[str, Any]:
    """One pass of the workload, on text tagged `tag`, through a fresh front: closed loop,
    or open loop at `arrivals` (`poisson_arrivals`) when given."""
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
        schedule = None
        if arrivals is None:
            ttfts, prompt_tokens, cached, wall, by_id = asyncio.run(
                drive(front.url, engine.model_name, prompts, size["concurrency"],
                      size["max_tokens"])
            )
        else:
            ttfts, prompt_tokens, cached, wall, by_id, schedule = asyncio.run(
                drive_open(front.url, engine.model_name, prompts, arrivals, size["max_tokens"])
            )
    finally:
        front.stop()
    return {
        "schedule": schedule,
        "ttfts": ttfts,
        "client": by_id,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "wall_s": wall,
        "decisions": dict(router.counters.decisions),
        # Calls each replica served: how evenly the policy spread the load (and, under
        # cache-aware routing, the apps whose calls follow their prefix).
        "served": {r.name: r.served for r in engine.replica_states()},
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
    got = {
        "prefix_hit_rate": sum(r["cached_tokens"] for r in runs) / max(prompt_tokens, 1),
        "ttft_s": statistics.fmean(ttfts),
        "p99_ttft_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "requests_per_s": len(ttfts) / sum(run["wall_s"] for run in runs),
        "decisions": decisions,
        "passes": len(runs),
        "ttft_breakdown": breakdown(runs),
        "served": [run["served"] for run in runs if "served" in run],  # calls per replica
    }
    schedules = [run["schedule"] for run in runs if run.get("schedule")]
    if schedules:
        got["open_loop"] = open_loop(schedules, got["requests_per_s"])
    return got


def open_loop(schedules: list[dict[str, Any]], requests_per_s: float) -> dict[str, Any]:
    """An open-loop system's passes pooled: whether its `requests_per_s` fell behind the
    offered rate, how long its last requests ran past the last arrival, and how close it
    came to the in-flight bound."""
    offered = statistics.fmean(s["offered_per_s"] for s in schedules)
    return {
        "offered_per_s": round(offered, 4),
        "completed_of_offered": round(requests_per_s / offered, 3),
        "behind": requests_per_s < BEHIND * offered,
        "drain_s": max(s["drain_s"] for s in schedules),
        "max_in_flight": max(s["max_in_flight"] for s in schedules),
        "held": sum(s["held"] for s in schedules),
        "latest_send_s": max(s["latest_send_s"] for s in schedules),
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


def openmp_settings(handles: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Each replica's OpenMP wait and thread count, asked of the replica itself: a team of 2
    threads that spins collapses on a loaded machine (docs/scale.md), so a reader comparing
    runs needs them."""

    async def all_of_them() -> list[dict[str, str | None]]:
        return list(await asyncio.gather(*(h.openmp_env.remote() for h in handles.values())))

    return dict(zip(handles, asyncio.run(all_of_them())))


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """bench_common's `--quick/--json/--plot`, and the arrival options: parsed first, the
    rest handed on (their help is in the description, as bench_common builds `--help`)."""
    own = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", add_help=False)
    own.add_argument("--arrival", choices=("closed", "poisson"), default="poisson")
    own.add_argument("--rate", type=float, default=None)
    own.add_argument("--load", type=float, default=None)
    known, rest = own.parse_known_args(argv)
    if known.arrival == "closed" and (known.rate is not None or known.load is not None):
        own.error("--rate and --load set an open loop's rate: drop --arrival closed")
    if known.rate is not None and known.load is not None:
        own.error("give --rate (requests/s) or --load (a fraction of round robin's), not both")
    if known.rate is not None and not 0 < known.rate < math.inf:
        own.error(f"--rate must be a number of requests/s above 0, got {known.rate}")
    if known.load is not None and not 0 < known.load < math.inf:
        own.error(f"--load must be a fraction above 0 (0.7: 70% of capacity), got {known.load}")
    description = (
        f"{__doc__.splitlines()[0].rstrip(',')}. --arrival closed|poisson: closed-loop "
        "clients or "
        "open-loop Poisson arrivals (default); --rate R: their requests/s; --load F (default "
        f"{LOAD}): without --rate, F times what closed-loop round robin sustains, measured "
        "first."
    )
    args = parse_args(NAME, description, rest)
    args.arrival, args.rate = known.arrival, known.rate
    args.load = LOAD if known.load is None else known.load
    return args


def calibrate(
    handles: dict[str, Any], size: dict[str, Any], pooled: bool, load: float, tag: str
) -> tuple[float, str]:
    """The open loop's rate when none is given: `load` times the requests/s of one
    closed-loop round robin pass (on its own text) over these replicas."""
    got = run_system(tag, "round_robin", handles, size, pooled)
    sustained = len(got["ttfts"]) / got["wall_s"]
    how = f"{load} x covey-round-robin closed loop ({sustained:.3f}/s, pass {tag})"
    print(f"scale: open loop at {load * sustained:.3f} requests/s: {how}", flush=True)
    return load * sustained, how


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
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
    params = {**size, "replica_kv_tokens": pool, "app_share": APP_SHARE, "arrival": args.arrival}
    arrivals = None
    if args.arrival == "poisson" and args.rate is not None:
        arrivals = poisson_arrivals(size["requests"], args.rate)
        params.update(rate=args.rate, rate_from="--rate", in_flight_bound=IN_FLIGHT)
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
    replica_openmp: dict[str, dict[str, str | None]] = {}
    try:
        for systems, spec in zip(setups, specs):
            handles = deploy_specs(spec)
            pooled = any(s.num_replicas > 1 for s in spec.values())
            warm(handles, 2 * REPLICAS if pooled else 2)
            replica_openmp.update(openmp_settings(handles))
            print(f"scale: {list(handles)} up at {time.perf_counter() - started:.0f}s", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {}
            try:
                if args.arrival == "poisson" and arrivals is None:
                    rate, how = calibrate(handles, size, pooled, args.load, pass_tag(next(passes)))
                    arrivals = poisson_arrivals(size["requests"], rate)
                    params.update(rate=round(rate, 4), rate_from=how, in_flight_bound=IN_FLIGHT)
                for system, policy in systems:
                    tag = pass_tag(next(passes))
                    got = run_system(tag, policy, handles, size, pooled, arrivals)
                    runs.setdefault(system, []).append(got)
                    mean = statistics.fmean(got["ttfts"])
                    print(
                        f"scale: {system} ({tag}): mean TTFT {mean:.2f}s, {got['decisions']}, "
                        f"served {got['served']}, "
                        f"prefill ms/token {got['per_token_ms']}, {breakdown([got])}"
                        + (f", {got['schedule']}" if got["schedule"] else ""),
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
                    "served": got["served"],
                }
                if "open_loop" in got:
                    extra["open_loop"] = got["open_loop"]
                    if got["open_loop"]["behind"]:
                        print(f"scale: {system} fell behind: {got['open_loop']}", flush=True)
                for metric in METRICS:
                    value = got[metric]
                    results.append(record(WORKLOAD, system, metric, value, {**params, **extra}))
    finally:
        import ray

        ray.shutdown()
    data = write_results(args, NAME, results, "cpu", "SmolLM2-135M-Instruct")
    # bench_common records the front's environment; the replicas' OpenMP settings are theirs.
    data["environment"]["replica_openmp"] = replica_openmp
    Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    plot(results, args.plot, arrival_title(params), params.get("rate"))
    return 0


def arrival_title(params: dict[str, Any]) -> str:
    """How the requests arrived, for the PNG's title."""
    if params["arrival"] == "closed":
        return f"closed loop, {params['concurrency']} clients"
    return f"open loop, Poisson arrivals at {params['rate']:.2f} requests/s"


def plot(
    results: list[dict[str, Any]], path: Path, arrival: str, offered: float | None = None
) -> None:
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
        if metric == "requests_per_s" and offered:
            ax.axhline(offered, color="k", linestyle="--", linewidth=1, label="offered")
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        "covey on Ray Serve, workload affinity (2 replicas; single: 1 with 2 threads)\n"
        + arrival
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
