"""App benchmark: end-to-end latency of the example apps with the optimizer on (`covey`) and
off (`covey-naive`), on the same engine code and weights.

    python benchmarks/apps.py [--quick] [--json PATH] [--plot PATH]

`covey` runs the optimized plan: independent LLM calls and fan-out elements go to the engine
together (batched, their common prefix prefilled once), static prefixes are pinned once per
app, early prefixes are prefilled while upstream nodes run, the critical path gets priority.
`covey-naive` is a chain of independent calls: the plan without passes, each LLM call
awaited before the next, on an engine with the prefix cache off (no sharing at all).
Workloads: `mapreduce_summary` (one long pydoc topic, split into pieces, summarized piece by
piece, then combined) and `advanced_rag` (three query rewrites, four retrievals, fusion,
one cited answer over the Python-docs index), each one request at a time and several at
once (`*-concurrent`, mean latency per request). One warm-up request per system first (it
pins the static prefixes, as a serving process would have); measured requests use distinct
documents/questions, so nothing is served from an earlier measured request.
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

NAME = "apps"
SYSTEMS = ("covey", "covey-naive")
TARGETS = {"mapreduce_summary": 3.0, "advanced_rag": 1.8}
DOCS = ["compound", "types", "formatstrings", "string-methods", "typesseq", "debugger"]
QUESTIONS = [
    "How do I catch an exception and raise a different one?",
    "What does the with statement do with a context manager?",
    "How are default argument values evaluated in a function definition?",
    "What is the difference between a list and a tuple?",
    "How do I format a float with two decimals in an f-string?",
    "How does a for loop iterate over a dictionary?",
    "What does the global statement do inside a function?",
    "How do I define a class with a custom __init__ method?",
    "What happens when an assert statement fails?",
    "How do I read the lines of a file one by one?",
]


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pieces": 4, "piece_chars": 900, "requests": 1, "concurrent": 2, "questions": 2}
    return {"pieces": 16, "piece_chars": 900, "requests": 2, "concurrent": 3, "questions": 4}


def documents(n: int, chars: int) -> list[str]:
    """The first `chars` characters of long pydoc topics, one per document."""
    from pydoc_data.topics import topics

    return [topics[name][:chars] for name in DOCS[:n]]


def engines() -> dict[str, Any]:
    """Both systems' engines over one set of weights (the engine's default dtype)."""
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    covey = LLMEngine(EngineConfig())
    naive = LLMEngine(EngineConfig(enable_prefix_caching=False), model=covey.model)
    return {"covey": covey, "covey-naive": naive}


async def timed(runtime: Any, app: Any, inputs: list[dict[str, Any]]) -> list[float]:
    """Run every input at once; each one's latency in seconds."""

    async def one(kw: dict[str, Any]) -> float:
        start = time.perf_counter()
        await runtime.run(app, **kw)
        return time.perf_counter() - start

    return list(await asyncio.gather(*(one(kw) for kw in inputs)))


async def bench_system(
    system: str, engine: Any, index: Any, size: dict[str, Any], out: list[dict]
) -> None:
    from covey.apps.advanced_rag import INDEX_NAME, build_advanced_rag_app
    from covey.apps.mapreduce_summary import build_summary_app
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.runtime import Runtime

    summary = build_summary_app(piece_chars=size["piece_chars"], max_pieces=2 * size["pieces"])
    rag = build_advanced_rag_app()
    chars = size["piece_chars"] * size["pieces"]
    n_docs = 1 + size["requests"] + size["concurrent"]
    docs = [{"text": d} for d in documents(n_docs, chars)]
    n_q = 1 + size["questions"] + size["concurrent"]
    questions = [{"question": q} for q in QUESTIONS[:n_q]]
    async with AsyncLLM(engine=engine) as llm:
        runtime = Runtime(llm, {INDEX_NAME: index}, optimize=system == "covey")
        for workload, app, inputs, count in (
            ("mapreduce_summary", summary, docs, size["requests"]),
            ("advanced_rag", rag, questions, size["questions"]),
        ):
            await timed(runtime, app, inputs[:1])  # warm-up: pins, allocator, threads
            single = []
            for kw in inputs[1 : 1 + count]:
                single += await timed(runtime, app, [kw])
            together = await timed(runtime, app, inputs[1 + count :])
            params = {**size, "requests": count}
            print(
                f"{workload:>18} {system:>12}: {statistics.mean(single):7.2f} s one at a time, "
                f"{statistics.mean(together):7.2f} s with {len(together)} at once",
                flush=True,
            )
            out.append(record(workload, system, "latency_s", statistics.mean(single), params))
            out.append(
                record(
                    f"{workload}-concurrent",
                    system,
                    "latency_s",
                    statistics.mean(together),
                    {**params, "requests": len(together)},
                )
            )


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for i, system in enumerate(SYSTEMS):
        values = [
            next((r["value"] for r in results if r["workload"] == w and r["system"] == system), 0)
            for w in workloads
        ]
        xs = [x + (i - 0.5) * width for x in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=system)
        ax.bar_label(bars, fmt="%.1f s", fontsize=8)
    top = max(r["value"] for r in results if r["value"] is not None)
    for x, w in enumerate(workloads):
        fast, slow = (
            next(r["value"] for r in results if r["workload"] == w and r["system"] == s)
            for s in SYSTEMS
        )
        ax.annotate(
            f"{slow / fast:.2f}x faster",
            (x, max(fast, slow) + 0.07 * top),
            ha="center",
            weight="bold",
        )
    ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
    ax.set_ylabel("mean end-to-end latency per request (s), lower is better")
    ax.set_title("covey apps: optimizer on vs naive (one call after the other, no sharing)")
    ax.legend()
    ax.margins(y=0.22)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NAME, "End-to-end app latency: optimizer on vs naive.", argv)
    from covey.apps.rag_chatbot import open_pydocs_index

    size = sizes(args.quick)
    index = open_pydocs_index()
    built = engines()
    results: list[dict] = []
    for system in SYSTEMS:
        asyncio.run(bench_system(system, built[system], index, size, results))
    for workload in list(dict.fromkeys(r["workload"] for r in results)):
        fast, slow = (
            next(r["value"] for r in results if r["workload"] == workload and r["system"] == s)
            for s in SYSTEMS
        )
        target = TARGETS.get(workload.removesuffix("-concurrent"))
        print(f"{workload}: covey {slow / fast:.2f}x faster than naive (target {target}x)")
    engine = built["covey"]
    write_results(args, NAME, results, str(engine.device), engine.model_name)
    plot(results, args.plot)


if __name__ == "__main__":
    main()
