"""Tool calls that pause: the adaptive pause policy against the fixed ones.

    python benchmarks/tools.py [--quick] [--json PATH] [--plot PATH]

Workload `agent`: requests that each call several tools between their generations, on
one context (`{{call}}` between gens, so every request pauses and resumes the same engine
request). Tool durations follow INFERCEPT's mix of augmentations, scaled down so a run
stays short: math ~0 s, QA/search ~0.7 s, and chatbot/image/TTS in the tens of seconds
(scaled by `SLOW_SCALE`). Each call's tool is drawn from that mix with a fixed seed, so
every system gets the same requests and the same tool durations; the tools sleep on the
event loop, as a remote service would keep the caller waiting. The KV pool is small enough
that the paused requests' contexts do not all fit next to the running ones.

Systems: `covey` (adaptive: INFERCEPT's min-waste rule per paused request),
`covey-discard`, `covey-preserve`, `covey-swap` (`EngineConfig.pause_policy`).
Metrics: `completed_per_min` (higher is better) and `normalized_latency_s` (a request's
latency divided by its output tokens, averaged over requests; lower is better).
"""

from __future__ import annotations

import asyncio
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
# INFERCEPT's augmentation types (mean seconds): math and QA as measured, the slow ones
# (chatbot, image generation, text-to-speech) in the tens of seconds, scaled down.
SLOW_SCALE = 0.1
MIX = {
    "math": (0.0002, 0.3),  # (mean seconds, share of calls)
    "qa": (0.7, 0.3),
    "chatbot": (28.0 * SLOW_SCALE, 0.15),
    "image": (20.0 * SLOW_SCALE, 0.15),
    "tts": (17.0 * SLOW_SCALE, 0.1),
}


def make_tool(kind: str, durations: list[float]) -> Any:
    """An async tool named after its kind (the engine keeps a duration history per tool
    name) that sleeps for its request's next scripted duration."""
    import covey.graph as cg

    async def tool(text: str) -> str:
        await asyncio.sleep(durations.pop(0))
        return f"{kind} result {len(text)}"

    tool.__name__ = tool.__qualname__ = kind
    return cg.tool(timeout=600)(tool)


def build_app(kinds: tuple[str, ...], times: list[float], gen_tokens: int, index: int) -> Any:
    """A request's app: one semantic function alternating gens and calls to `kinds`, each
    call sleeping for its scripted time."""
    import covey.graph as cg
    from covey.llm_backend.sampling_params import SamplingParams

    lines = ["{{text}}", "Step 1: {{gen g0}}"]
    for i, kind in enumerate(kinds):
        lines.append(f"Tool {kind}: {{{{call {kind} g{i}}}}}")
        lines.append(f"Step {i + 2}: {{{{gen g{i + 1}}}}}")

    def agent(text: str):
        pass

    agent.__doc__ = "\n".join(lines)
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    per_kind = {k: [t for kind, t in zip(kinds, times) if kind == k] for k in kinds}
    used = [make_tool(k, per_kind[k]) for k in per_kind]
    fn = cg.semantic_function(params=params, calls=used)(agent)

    @cg.app(name=f"agent_{index}")
    def app(text: str):
        return fn(text)

    return app


def workload(requests: int, calls: int, seed: int = 0) -> list[tuple[tuple[str, ...], list]]:
    """Per request: the tools it calls in order, and each call's duration (exponential
    around the kind's mean)."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), [share for _, share in MIX.values()]
    out = []
    for _ in range(requests):
        seq = tuple(rng.choices(kinds, weights)[0] for _ in range(calls))
        out.append((seq, [rng.expovariate(1 / MIX[k][0]) for k in seq]))
    return out


def documents(tokenizer: Any, count: int, tokens: int) -> list[str]:
    from pydoc_data.topics import topics

    ids = tokenizer.encode(" ".join(topics[name] for name in sorted(topics)))
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(count)]


async def run_system(
    policy: str, model: Any, config: dict[str, Any], plan: list, texts: list[str], gen: int
) -> dict[str, Any]:
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.runtime import Runtime

    engine = LLMEngine(EngineConfig(pause_policy=policy, **config), model=model)
    apps = [build_app(seq, list(times), gen, i) for i, (seq, times) in enumerate(plan)]
    async with AsyncLLM(engine=engine) as llm:
        runtime = Runtime(llm)
        latencies: list[float] = []
        tokens: list[int] = []

        async def one(app: Any, text: str) -> None:
            start = time.perf_counter()
            result = await runtime.run_traced(app, text=text)
            latencies.append(time.perf_counter() - start)
            tokens.append(result.trace.generated_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(one(app, text) for app, text in zip(apps, texts)))
        wall = time.perf_counter() - start
        stats = await llm.stats()
        runtime.tools.close()
    return {
        "completed_per_min": len(latencies) / wall * 60,
        "normalized_latency_s": statistics.mean(lat / n for lat, n in zip(latencies, tokens)),
        "wall_s": wall,
        "decisions": dict(getattr(stats, "pause_decisions", {}) or {}),
        "recompute_tokens": getattr(stats, "pause_recompute_tokens", None),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NAME, "Tool calls that pause: adaptive vs fixed pause policies.", argv)
    import torch

    from covey.llm_backend.model_source import resolve_model
    from covey.llm_backend.tokenizer import load_default_tokenizer
    from covey.llm_backend.weight_loader import load_model

    requests, calls, prompt, gen = (6, 3, 192, 8) if args.quick else (24, 4, 384, 16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(resolve_model(None), torch.float32, torch.device(device))
    texts = documents(load_default_tokenizer(), requests, prompt)
    plan = workload(requests, calls)
    # Room for about a third of the requests' full contexts: the rest must wait, or their
    # paused KV must move out of the pool.
    context = prompt + (calls + 1) * (gen + 24)
    pool = max(context * requests // 3, 2 * context)
    config = {"device": device, "dtype": "float32", "kv_cache_tokens": pool}
    params = {
        "requests": requests,
        "calls_per_request": calls,
        "prompt_tokens": prompt,
        "gen_tokens": gen,
        "kv_cache_tokens": pool,
        "tool_mix_s": {k: v[0] for k, v in MIX.items()},
    }
    results: list[dict[str, Any]] = []
    for system, policy in SYSTEMS.items():
        try:
            got = asyncio.run(run_system(policy, model, config, plan, texts, gen))
        except Exception as e:  # a policy this engine cannot run: recorded, never hidden
            reason = f"{type(e).__name__}: {e}"
            for metric in ("completed_per_min", "normalized_latency_s"):
                results.append(record("agent", system, metric, None, params, reason))
            print(f"{system:>15}: could not run ({reason})", flush=True)
            continue
        extra = {**params, "wall_s": round(got["wall_s"], 2), "decisions": got["decisions"]}
        extra["recompute_tokens"] = got["recompute_tokens"]
        for metric in ("completed_per_min", "normalized_latency_s"):
            results.append(record("agent", system, metric, got[metric], extra))
        print(
            f"{system:>15}: {got['completed_per_min']:.2f} completed/min, "
            f"{got['normalized_latency_s']:.3f} s/token, wall {got['wall_s']:.1f} s, "
            f"decisions {got['decisions']}",
            flush=True,
        )
    write_results(args, NAME, results, device, "SmolLM2-135M-Instruct")
    plot(results, args.plot)


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
