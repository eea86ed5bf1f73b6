"""Where AsyncLLM steps the engine: on the event loop's thread (the CPU default) or on a
worker thread (the CUDA default), against the engine stepped directly.

    python benchmarks/async_engine.py [--quick] [--json PATH] [--plot PATH]

On CPU, PyTorch's OpenMP pool belongs to a thread: a worker thread stepping an engine whose
weights were loaded on the main thread makes a second pool, and with more threads than
cores libgomp stops spinning between ops. This benchmark is the evidence for the default.
Workloads: `latency` (one request, 512-token prompt, 64 tokens: TTFT and TPOT) and
`concurrent` (8 requests of 256 tokens at once, 64 tokens each: output tokens/s). Systems:
`covey` (AsyncLLM, inline), `covey-worker-thread` (AsyncLLM, worker thread), `covey-sync`
(`LLMEngine.step` in a loop, no asyncio). Medians of 3.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import parse_args, record, write_results

NAME = "async_engine"
SYSTEMS = ("covey", "covey-worker-thread", "covey-sync")


def prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    from pydoc_data.topics import topics

    ids = tokenizer.encode(" ".join(topics[name] for name in sorted(topics)))
    return [ids[i * length : (i + 1) * length] for i in range(count)]


async def run_async(llm: Any, batch: list[list[int]], params: Any) -> list[Any]:
    return list(await asyncio.gather(*(llm.generate_full(p, params) for p in batch)))


def run_sync(engine: Any, batch: list[list[int]], params: Any) -> list[Any]:
    rids = [engine.add_request(p, params) for p in batch]
    return engine.run_to_completion(rids)


def measure(system: str, engine: Any, batch: list[list[int]], params: Any) -> tuple[float, list]:
    from covey.llm_backend.async_llm import AsyncLLM

    start = time.perf_counter()
    if system == "covey-sync":
        outs = run_sync(engine, batch, params)
    else:

        async def go() -> list[Any]:
            async with AsyncLLM(engine=engine, worker_thread=system != "covey") as llm:
                return await run_async(llm, batch, params)

        outs = asyncio.run(go())
    return time.perf_counter() - start, outs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NAME, "AsyncLLM on the loop thread vs a worker thread.", argv)
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine
    from covey.llm_backend.sampling_params import SamplingParams

    repeats = 1 if args.quick else 3
    out_tokens = 16 if args.quick else 64
    engine = LLMEngine(EngineConfig(enable_prefix_caching=False))
    params = SamplingParams(max_tokens=out_tokens, ignore_eos=True)
    single = prompts(engine.tokenizer, 1, 512)
    several = prompts(engine.tokenizer, 8, 256)
    measure("covey-sync", engine, single, params)  # warm-up
    results: list[dict] = []
    for system in SYSTEMS:
        ttft, tpot, rate = [], [], []
        for _ in range(repeats):
            _, (out,) = measure(system, engine, single, params)
            ttft.append(out.metrics.ttft)
            tpot.append(out.metrics.tpot)
            wall, outs = measure(system, engine, several, params)
            rate.append(sum(len(o.token_ids) for o in outs) / wall)
        lat = {"prompt_tokens": 512, "output_tokens": out_tokens, "repeats": repeats}
        conc = {"requests": 8, "prompt_tokens": 256, "output_tokens": out_tokens}
        results.append(record("latency", system, "ttft_s", statistics.median(ttft), lat))
        results.append(record("latency", system, "tpot_s", statistics.median(tpot), lat))
        results.append(
            record("concurrent", system, "output_tokens_per_s", statistics.median(rate), conc)
        )
        print(
            f"{system:>20}: TTFT {statistics.median(ttft):.3f} s, "
            f"TPOT {statistics.median(tpot) * 1e3:.1f} ms, "
            f"8 at once {statistics.median(rate):.1f} tok/s",
            flush=True,
        )
    write_results(args, NAME, results, str(engine.device), engine.model_name)
    plot(results, args.plot)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("latency", "tpot_s", "TPOT (ms), lower is better", 1e3),
        ("concurrent", "output_tokens_per_s", "8 requests: output tokens/s, higher is better", 1),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (workload, metric, title, scale) in zip(axes, panels):
        rows = [r for r in results if r["workload"] == workload and r["metric"] == metric]
        bars = ax.bar([r["system"] for r in rows], [r["value"] * scale for r in rows])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("AsyncLLM: engine steps on the loop thread vs a worker thread (CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
