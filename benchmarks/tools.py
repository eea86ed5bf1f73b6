"""Tool calls that pause: the adaptive pause policy against the fixed ones.

    python benchmarks/tools.py [--quick] [--json PATH] [--plot PATH]

Workload `agent`, shaped after INFERCEPT's augmented-LLM workload:

- Each request is one augmentation type, drawn with equal shares, and calls that type's tool
  between its generations on one context (`{{call}}` between gens: every call pauses and
  resumes the same engine request). Calls per request and tool times follow INFERCEPT's
  mix: math (4 calls, ~0 s), QA/search (3 calls, ~0.7 s), chatbot (4 calls, ~28 s), image
  generation (1 call, ~20 s), text-to-speech (1 call, ~17 s); each call's time is drawn
  exponential around its type's mean, and the tools sleep on the event loop as a remote
  service keeps its caller waiting.
- Contexts are long relative to the generations, as INFERCEPT's are (over a thousand tokens
  when math, QA and chatbot call; about half that for image and TTS): what a discard throws
  away is far more than a segment adds.
- Load is closed-loop: `users` clients each send their next request as soon as the last one
  finishes, for a fixed window, and `completed_per_min` counts what finished inside it
  (runs still going at the end are cancelled, their KV freed). Enough users that the engine,
  not the tools' sleeps, is the bottleneck; the KV pool holds the contexts of about a third
  of them, so paused contexts cannot all stay in it next to the running ones.

What is scaled, and why: the slow tools by SLOW_SCALE (0.1: 28 s -> 2.8 s), so a request
lasts seconds and a window sees several per user; math and QA as measured. Contexts and
generations are shortened together (CONTEXT, GEN below: about a third of INFERCEPT's
context, a segment of 16 tokens) so a 135M model on 2 CPU cores completes enough requests
in a short window; the ratio of what a resume recomputes to what it generates stays of
INFERCEPT's order. Every system gets the same users, the same requests in the same order,
the same texts and the same tool times (seeded per user). Nothing here is tuned per system.

Systems: `covey` (adaptive: INFERCEPT's min-waste rule per paused request),
`covey-discard`, `covey-preserve`, `covey-swap` (`EngineConfig.pause_policy`).
Metrics: `completed_per_min` (higher is better) and `normalized_latency_s` (a request's
latency divided by its output tokens, averaged over completed requests; lower is better).
Each row also records the policy's decisions, recomputed tokens and the share of the window
they cost (`recompute_share`, priced by the engine's own profile), swapped bytes, and how
busy the engine was (mean running / waiting / paused requests, sampled).

Each system's engine first serves one short warm-up request (its own tool name and text, so
it touches neither the tool-time history nor the prefix cache of the measured requests),
then its window starts; counters are taken as differences over the window. This keeps
first-run costs (allocator, oneDNN primitive caches) out of whichever system runs first.
The systems still run one after another, one window each: on a loaded machine drift between
windows is of the order of the smaller differences between them.

Reading the figures: where the KV pool bounds how many requests run at once (here, as in
INFERCEPT), adaptive, swap and discard run about as many, and what separates them is engine
time per request. Discard's extra is its recompute; INFERCEPT measured recomputation at
37-40% of forward time in discard-on-call serving. If covey removes all of it and is
otherwise equal, its gain over discard is about 1 / (1 - recompute_share): 1.5x needs
discard to spend a third of its time recomputing. Caveat: `recompute_share` divides by the
window's wall time, not by the engine's forward time; the two agree only when the engine is
busy for the whole window (the sampled queues show how busy it was). When it sits idle part
of the time, the share of forward time is larger than the figure, and INFERCEPT's 37-40% is
a share of forward time. Preserve loses admissions instead: paused
KV holds the pool while tools run. On a CPU a swap is a memcpy (milliseconds for a whole
context) against a recompute of a second or more, so the adaptive policy swaps nearly every
paused request and should match the fixed swap policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import parse_args, record, write_results

NAME = "tools"
SYSTEMS = {
    "covey": "adaptive",
    "covey-discard": "discard",
    "covey-preserve": "preserve",
    "covey-swap": "swap",
}
SLOW_SCALE = 0.1
# INFERCEPT's augmentation types: (mean tool seconds, calls per request, context share).
# The context share scales CONTEXT: image and TTS requests carry about half the context.
TYPES = {
    "math": (0.0001, 4, 1.0),
    "qa": (0.7, 3, 1.0),
    "chatbot": (28.0 * SLOW_SCALE, 4, 1.0),
    "image": (20.0 * SLOW_SCALE, 1, 0.5),
    "tts": (17.0 * SLOW_SCALE, 1, 0.5),
}
# (users, window seconds, context tokens, tokens per generation)
QUICK = (8, 40.0, 384, 16)
FULL = (16, 120.0, 512, 16)
SAMPLE_S = 0.25  # how often the engine's queues are sampled


class Request:
    """One request of the plan: its type, its tool's times per call, its text."""

    def __init__(self, kind: str, times: list[float], text: str, name: str) -> None:
        self.kind, self.times, self.text, self.name = kind, times, text, name


def user_plan(user: int, count: int, seed: int = 0) -> list[tuple[str, list[float]]]:
    """A user's requests in order: type (equal shares) and each call's time (exponential
    around the type's mean). Seeded per user, so every system sees the same ones."""
    rng = random.Random(f"{seed}-{user}")
    out = []
    for _ in range(count):
        kind = rng.choice(list(TYPES))
        mean, calls, _ = TYPES[kind]
        out.append((kind, [rng.expovariate(1 / mean) for _ in range(calls)]))
    return out


def corpus_ids(tokenizer: Any) -> list[int]:
    """Python's own docs as token ids: the requests' texts are slices of them."""
    from pydoc_data.topics import topics

    return tokenizer.encode(" ".join(topics[name] for name in sorted(topics)))


def build_app(request: Request, gen_tokens: int) -> Any:
    """A request's app: one semantic function alternating gens and calls to its tool."""
    import covey.graph as cg
    from covey.llm_backend.sampling_params import SamplingParams

    durations = list(request.times)

    async def tool(text: str) -> str:
        await asyncio.sleep(durations.pop(0))
        return f"{request.kind} result {len(text)}"

    # The engine keeps a duration history per tool name: name it after its type.
    tool.__name__ = tool.__qualname__ = request.kind
    lines = ["{{text}}", "Step 1: {{gen g0}}"]
    for i in range(len(request.times)):
        lines.append(f"Tool {request.kind}: {{{{call {request.kind} g{i}}}}}")
        lines.append(f"Step {i + 2}: {{{{gen g{i + 1}}}}}")

    def agent(text: str):
        pass

    agent.__doc__ = "\n".join(lines)
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    fn = cg.semantic_function(params=params, calls=[cg.tool(timeout=600)(tool)])(agent)

    @cg.app(name=request.name)
    def app(text: str):
        return fn(text)

    return app


async def run_system(
    policy: str,
    model: Any,
    config: dict[str, Any],
    plans: list[list[Request]],
    window: float,
    gen: int,
    warmup: Request,
) -> dict[str, Any]:
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.runtime import Runtime

    engine = LLMEngine(EngineConfig(pause_policy=policy, **config), model=model)
    latencies: list[float] = []
    tokens: list[int] = []
    samples: list[tuple[int, int, int]] = []
    async with AsyncLLM(engine=engine) as llm:
        runtime = Runtime(llm)
        await runtime.run_traced(build_app(warmup, gen), text=warmup.text)
        before = await llm.stats()
        start = time.perf_counter()

        async def user(plan: list[Request]) -> None:
            for request in plan:
                app = build_app(request, gen)
                began = time.perf_counter()
                result = await runtime.run_traced(app, text=request.text)
                if time.perf_counter() - start > window:
                    return
                latencies.append(time.perf_counter() - began)
                tokens.append(result.trace.generated_tokens)

        async def sample() -> None:
            while True:
                s = await llm.stats()
                samples.append((s.num_running, s.num_waiting, s.num_paused))
                await asyncio.sleep(SAMPLE_S)

        users = [asyncio.ensure_future(user(plan)) for plan in plans]
        sampler = asyncio.ensure_future(sample())
        done, pending = await asyncio.wait(users, timeout=window)
        for task in [*pending, sampler]:
            task.cancel()
        for task in [*pending, sampler]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in done:
            task.result()  # a user that failed is a failed run, never a quiet zero
        stats = await llm.stats()
        runtime.tools.close()
    mean = [round(statistics.fmean(col), 2) for col in zip(*samples)] if samples else None
    recomputed = stats.pause_recompute_tokens - before.pause_recompute_tokens
    return {
        "completed_per_min": len(latencies) / window * 60,
        # None when nothing completed (a machine far slower than the window allows).
        "normalized_latency_s": (
            statistics.fmean(lat / n for lat, n in zip(latencies, tokens)) if latencies else None
        ),
        "completed": len(latencies),
        "decisions": {
            k: n - before.pause_decisions.get(k, 0) for k, n in stats.pause_decisions.items()
        },
        "recompute_tokens": recomputed,
        "swap_out_mb": round((stats.swap_out_bytes - before.swap_out_bytes) / 2**20, 1),
        # The window's share (of wall time, not of forward time: see the docstring) spent
        # recomputing discarded KV, priced by the engine's own profile.
        "recompute_share": round(
            recomputed * engine.pause_policy.costs.recompute_per_token_s / window, 3
        ),
        "mean_running_waiting_paused": mean,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NAME, "Tool calls that pause: adaptive vs fixed pause policies.", argv)
    import torch

    from covey.llm_backend.model_source import resolve_model
    from covey.llm_backend.tokenizer import load_default_tokenizer
    from covey.llm_backend.weight_loader import load_model

    users, window, context, gen = QUICK if args.quick else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(resolve_model(None), torch.float32, torch.device(device))
    per_user = 64  # more than a user can finish in the window
    tokenizer = load_default_tokenizer()
    ids = corpus_ids(tokenizer)
    # Distinct slices (a step apart), so no two requests share a prefix the cache reuses.
    step = max(1, (len(ids) - context) // (users * per_user))
    plans = []
    for u in range(users):
        plan = []
        for j, (kind, times) in enumerate(user_plan(u, per_user)):
            at = (u * per_user + j) * step
            text = tokenizer.decode(ids[at : at + int(context * TYPES[kind][2])])
            plan.append(Request(kind, times, text, f"agent_{u}_{j}"))
        plans.append(plan)
    # Not from the corpus, and its own tool name: it shares no prefix with a measured request
    # and adds nothing to the history of the measured tools.
    warmup = Request("warmup", [0.0], "Warm-up. " + "The engine starts here. " * 24, "warmup")
    # Room for the full contexts of about a third of the users: the rest must wait, or
    # paused KV must leave the pool.
    full = context + (max(c for _, c, _ in TYPES.values()) + 1) * (gen + 16)
    pool = max(full * users // 3, 2 * full)
    config = {"device": device, "dtype": "float32", "kv_cache_tokens": pool}
    params = {
        "users": users,
        "window_s": window,
        "context_tokens": context,
        "gen_tokens": gen,
        "kv_cache_tokens": pool,
        "types": {k: {"tool_s": v[0], "calls": v[1]} for k, v in TYPES.items()},
    }
    results: list[dict[str, Any]] = []
    for system, policy in SYSTEMS.items():
        try:
            got = asyncio.run(run_system(policy, model, config, plans, window, gen, warmup))
        except Exception as e:  # a policy this engine cannot run: recorded, never hidden
            reason = f"{type(e).__name__}: {e}"
            for metric in ("completed_per_min", "normalized_latency_s"):
                results.append(record("agent", system, metric, None, params, reason))
            print(f"{system:>15}: could not run ({reason})", flush=True)
            continue
        extra = {**params, **{k: v for k, v in got.items() if k not in METRICS}}
        for metric in METRICS:
            reason = None if got[metric] is not None else "no request completed in the window"
            results.append(record("agent", system, metric, got[metric], extra, reason))
        latency = got["normalized_latency_s"]
        print(
            f"{system:>15}: {got['completed_per_min']:.2f} completed/min "
            f"({got['completed']}), "
            f"{f'{latency:.3f}' if latency is not None else 'n/a'} s/token, "
            f"decisions {got['decisions']}, recomputed {got['recompute_tokens']} tokens "
            f"({got['recompute_share']:.0%} of the window), "
            f"swapped out {got['swap_out_mb']} MiB, "
            f"running/waiting/paused {got['mean_running_waiting_paused']}",
            flush=True,
        )
    write_results(args, NAME, results, device, "SmolLM2-135M-Instruct")
    plot(results, args.plot)


METRICS = ("completed_per_min", "normalized_latency_s")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("completed_per_min", "completed requests / min, higher is better"),
        ("normalized_latency_s", "latency per output token (s), lower is better"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (metric, title) in zip(axes, panels):
        rows = [r for r in results if r["metric"] == metric]
        values = [r["value"] if r["value"] is not None else 0.0 for r in rows]
        bars = ax.bar([r["system"] for r in rows], values)
        labels = [f"{v:.2f}" if r["value"] is not None else "n/a" for r, v in zip(rows, values)]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Agent requests pausing for tools: pause policies (small KV pool)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
