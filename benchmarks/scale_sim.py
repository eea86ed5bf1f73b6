"""Routing simulation: a long trace replayed through covey's routing policy
(`covey.server.replica_router`) at 8, 64 and 512 replicas, with no model and no Ray.

    python benchmarks/scale_sim.py [--quick] [--json PATH] [--plot PATH]

What it answers: past this machine, does cache-aware routing keep its hit rate as
replicas multiply, and what does it cost in load imbalance? The trace (seeded):
- 2 apps per replica, Zipf(0.8)-popular, each with a ~1000-character static prompt;
- a corpus of 20 passages per replica, Zipf(1.1)-popular, ~400 characters each, two per
  request after the app's prompt;
- 30% of requests are the next turn of a recent chat session (its history grows by ~300
  characters a turn and sits between the app's prompt and the passages).
Each replica is a FIFO server whose cache holds `capacity` characters, LRU, and is exactly
what the router's mirror believes (in the simulation they cannot drift; in a deployment
each replica's report of its load and of what its caches hold corrects the mirror). Each
replica reports, before every arrival, what a covey engine's report holds: its calls in
flight (waiting, prefilling or decoding) and its queued prefill, the uncached prompt
tokens of its calls not started plus what the prefilling one has left (decoding calls
count 0, as in `LLMEngine.cache_report`), at its per-token prefill cost. That is less than
the FIFO server's whole backlog, which also holds 50 ms of decode per call: the system
`covey-backlog` is fed that backlog instead (in prefill-token equivalents, an oracle no
deployment has), to show what the richer signal would be worth.
Service time: 0.25 ms per uncached prompt token (4 characters a token) + 50 ms of decode.
Arrivals are Poisson at 70% of the replicas' capacity with no cache hits at all.

Systems: `covey` (cache-aware, imbalance bound 4 requests: the default), `covey-bound-1`
(the same with a bound of 1), `covey-round-robin`, `covey-pow2`. Metrics per replica
count (`params.replicas`): `prefix_hit_rate` (prompt characters found cached),
`imbalance` (busiest replica's requests / the mean), `ttft_s` and `p99_ttft_s` (queueing
plus prefill, simulated seconds), and `router_us_per_request` (the policy's own cost,
measured: where one router process saturates).
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import parse_args, record, write_results  # noqa: E402

from covey.llm_backend.segments import Segment  # noqa: E402
from covey.server.replica_router import ReplicaRouter, route_key  # noqa: E402

NAME = "scale_sim"
WORKLOAD = "routing_trace"
REPLICAS = (8, 64, 512)
SYSTEMS = (
    ("covey", "cache_aware", 4),
    ("covey-backlog", "cache_aware", 4),
    ("covey-bound-1", "cache_aware", 1),
    ("covey-round-robin", "round_robin", 4),
    ("covey-pow2", "pow2", 4),
)
METRICS = ("prefix_hit_rate", "imbalance", "ttft_s", "p99_ttft_s", "router_us_per_request")
PREFILL_S_PER_TOKEN = 0.00025
DECODE_S = 0.05
CAPACITY_CHARS = 4 * 8192  # an 8192-token KV pool per replica
UTILIZATION = 0.7


def sizes(quick: bool) -> dict[str, Any]:
    return {"requests": {8: 3000, 64: 6000, 512: 6000}} if quick else {
        "requests": {8: 20000, 64: 40000, 512: 60000}
    }


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (i + 1) ** s for i in range(n)]


def trace(replicas: int, requests: int, seed: int = 0) -> list[list[Segment]]:
    rng = random.Random(seed)
    apps = [
        f"App {a} system prompt. " + f"Rule set {a}: answer with care. " * 35
        for a in range(2 * replicas)
    ]
    chunks = [(f"p{c}", f"Passage {c}. " + f"fact {c} " * 48) for c in range(20 * replicas)]
    app_w, chunk_w = zipf_weights(len(apps), 0.8), zipf_weights(len(chunks), 1.1)
    sessions: deque[tuple[int, str]] = deque(maxlen=4 * replicas)  # recent (app, history)
    out = []
    for i in range(requests):
        if sessions and rng.random() < 0.3:
            app, history = sessions[rng.randrange(len(sessions))]
        else:
            app, history = rng.choices(range(len(apps)), app_w)[0], ""
        picked = set()
        while len(picked) < 2:
            picked.add(rng.choices(range(len(chunks)), chunk_w)[0])
        question = f"Question {i}: " + "why " * 20
        prompt = [Segment(apps[app], kind="static")]
        if history:
            prompt.append(Segment(history, kind="dynamic"))
        prompt += [Segment(chunks[c][1], kind="chunk", chunk_id=chunks[c][0]) for c in picked]
        prompt.append(Segment(question, kind="dynamic"))
        out.append(prompt)
        sessions.append((app, history + question + "answer " * 35))
    return out


def simulate(
    replicas: int,
    policy: str,
    bound: int,
    prompts: list[list[Segment]],
    seed: int = 0,
    backlog: bool = False,
):
    rng = random.Random(seed + 1)
    names = [f"r{i}" for i in range(replicas)]
    router = ReplicaRouter(
        names, policy=policy, max_imbalance=bound, capacity_chars=CAPACITY_CHARS, seed=seed
    )
    keys = [route_key(p) for p in prompts]
    mean_service = statistics.fmean(
        DECODE_S + PREFILL_S_PER_TOKEN * k.chars / 4 for k in keys[:500]
    )
    rate = UTILIZATION * replicas / mean_service
    busy = {n: deque() for n in names}  # finish times of requests at each replica
    # (prefill start, first token, uncached tokens) of the calls still to prefill there
    prefills: dict[str, deque[tuple[float, float, int]]] = {n: deque() for n in names}
    free_at = dict.fromkeys(names, 0.0)
    served = dict.fromkeys(names, 0)
    now, hit, total, ttfts, routing_s = 0.0, 0, 0, [], 0.0
    for key in keys:
        now += rng.expovariate(rate)
        for n, q in busy.items():
            while q and q[0] <= now:
                q.popleft()
            if backlog:  # the oracle: all work ahead, decode included
                queued = round(max(free_at[n] - now, 0.0) / PREFILL_S_PER_TOKEN)
            else:  # what the engine reports: prompt tokens still to prefill
                pending = prefills[n]
                while pending and pending[0][1] <= now:
                    pending.popleft()
                queued = sum(
                    tokens if begin >= now else round((first - now) / PREFILL_S_PER_TOKEN)
                    for begin, first, tokens in pending
                )
            router.report(n, len(q), prefill_tokens=queued, profile=(0.0, PREFILL_S_PER_TOKEN))
        started = time.perf_counter()
        name, decision = router.choose(key, remember=False)
        routing_s += time.perf_counter() - started
        router.counters.count(decision)
        view = router.views[name]
        cached = view.matched_units(key)[1]  # exact prefix reuse only
        view.remember(key)
        hit += cached
        total += key.chars
        begin = max(now, free_at[name])
        first_token = begin + PREFILL_S_PER_TOKEN * (key.chars - cached) / 4
        prefills[name].append((begin, first_token, round((key.chars - cached) / 4)))
        free_at[name] = first_token + DECODE_S
        busy[name].append(free_at[name])
        served[name] += 1
        ttfts.append(first_token - now)
    ttfts.sort()
    return {
        "prefix_hit_rate": hit / total,
        "imbalance": max(served.values()) / statistics.fmean(served.values()),
        "ttft_s": statistics.fmean(ttfts),
        "p99_ttft_s": ttfts[int(0.99 * (len(ttfts) - 1))],
        "router_us_per_request": 1e6 * routing_s / len(keys),
        "decisions": dict(router.counters.decisions),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    size = sizes(args.quick)
    results = []
    for replicas in REPLICAS:
        n = size["requests"][replicas]
        prompts = trace(replicas, n)
        for system, policy, bound in SYSTEMS:
            got = simulate(replicas, policy, bound, prompts, backlog=system == "covey-backlog")
            print(f"scale_sim: {replicas} replicas, {system}: {got}", flush=True)
            params = {
                "replicas": replicas,
                "requests": n,
                "capacity_chars": CAPACITY_CHARS,
                "max_imbalance": bound,
                "decisions": got["decisions"],
            }
            for metric in METRICS:
                results.append(record(WORKLOAD, system, metric, got[metric], params))
    write_results(args, NAME, results, "cpu", None)
    plot(results, args.plot)
    return 0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("prefix_hit_rate", "imbalance", "ttft_s", "p99_ttft_s")
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6))
    for ax, metric in zip(axes, shown):
        for system, _, _ in SYSTEMS:
            ys = [
                next(r["value"] for r in results if (r["system"], r["metric"]) == (system, metric)
                     and r["params"]["replicas"] == n)
                for n in REPLICAS
            ]
            ax.plot(REPLICAS, ys, marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_xticks(REPLICAS, [str(n) for n in REPLICAS])
        ax.set_xlabel("replicas")
        ax.set_title(metric)
    axes[0].legend()
    fig.suptitle("Routing policy replayed on a synthetic trace (simulated, no model)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
