"""App benchmark: end-to-end latency of the example apps with the optimizer on (`covey`) and
off (`covey-naive`), on the same engine code and weights.

    python benchmarks/apps.py [--quick] [--json PATH] [--plot PATH]

`covey` runs the optimized plan: independent LLM calls and fan-out elements go to the engine
together (batched, their common prefix prefilled once), static prefixes are pinned once per
app, early prefixes are prefilled while upstream nodes run, the critical path gets priority.
The `covey` engine is the default one, so its chunk KV store is on (`chunk_cache` at its
default): the RAG answer's passages reuse the KV other requests computed, and each
retrieval's chunks are warmed while fusion runs.
`covey-naive` is a chain of independent calls: the plan without passes, each LLM call
awaited before the next, on an engine with no reuse at all (prefix cache and chunk cache
off); it is the baseline the targets are set against. `covey-naive-prefix-cache` is the
same chain on an engine with its prefix cache on (chunk cache off), to show how much of the
gap is the plan and how much the engine's cache alone would give.
Workloads: `mapreduce_summary` (one long pydoc topic, split into pieces, summarized piece by
piece, then combined) and `advanced_rag` (three query rewrites, four retrievals, fusion,
one cited answer over the Python-docs index), each one request at a time and several at
once (`*-concurrent`, mean latency per request). One warm-up request per system first (it
pins the static prefixes, as a serving process would have); measured requests use distinct
documents and questions (passages retrieved for different questions may still repeat, and
the prefix cache may serve them: that is the engine doing its job). Each record's params
hold every request's latency.
`advanced_rag-reworded` then asks the measured questions again in other words (later users
asking about the same topics): its rewrites and retrievals differ, so any chunk the answer
reuses comes from the chunk store, not from a repeated prompt. The chunk store only helps
where chunks repeat; the cold `advanced_rag` pass shows how often they do not.
Single-request records hold, per LLM node, the mean TTFT and the mean prompt tokens whose
KV came from the chunk store (`node_ttft_mean_s`, `node_reused_tokens_mean`). The console
prints, for advanced_rag, the ratio covey would reach against naive if its answer's
prefill cost nothing (its latency less the answer's TTFT): the ceiling KV reuse can lift
the ratio to; the covey record keeps it as `prefill_free_ratio`.
Every record's `engine_threads` counts its engine steps and their seconds by the torch
thread count they ran on (the thread governor moves it with the machine's load), and the
JSON's `systems` holds, per system, the machine's load before and after its passes
(`machine_load`: the load average and the cores other processes kept busy), the thread
governor's changes during them and the thread count at the end. Both say how comparable two
runs are: the governor runs one thread while other processes hold a core, and the map
fan-out's batched steps are compute-bound, so they slow with it (docs/performance.md, on
mapreduce_summary's fall from 3.48x to 2.21x, has the scratch measurements). Steps that ran
no model (nothing scheduled) are counted too, under the count then set, with ~0 s.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covey.llm_backend.cpu_threads import configure_openmp_env  # noqa: E402

# What `covey serve` runs with (cli/main.py): covey's short OpenMP spin unless the user set
# one, before torch loads. OpenMP's default spin collapses two threads when another
# process takes a core before the governor sees it (docs/performance.md's 37-107 s).
configure_openmp_env()

from bench_common import StepThreads, machine_load, parse_args, record, write_results  # noqa: E402

NAME = "apps"
SYSTEMS = ("covey", "covey-naive", "covey-naive-prefix-cache")
BASELINE = "covey-naive"
TARGETS = {"mapreduce_summary": 3.0, "advanced_rag": 1.8}
DOCS = [
    "compound",
    "types",
    "formatstrings",
    "string-methods",
    "typesseq",
    "debugger",
    "specialnames",
]
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
# The same questions in other words, index for index.
REWORDED = [
    "How can I catch one exception and raise another exception instead?",
    "What does a with statement do with its context manager object?",
    "When are the default values of a function's arguments evaluated?",
    "How is a tuple different from a list?",
    "How can an f-string print a float rounded to two decimal places?",
    "What does a for loop go over when it iterates over a dict?",
    "What is the effect of a global statement inside a function body?",
    "How do I write a class whose __init__ method takes arguments?",
    "What happens if the condition of an assert statement is false?",
    "How can I read a file line by line?",
]
ANSWER_NODE = "answer_from_passages"


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"pieces": 4, "piece_chars": 900, "requests": 1, "concurrent": 2, "questions": 2}
    return {"pieces": 16, "piece_chars": 900, "requests": 3, "concurrent": 3, "questions": 6}


def documents(n: int, chars: int) -> list[str]:
    """The first `chars` characters of long pydoc topics, one per document."""
    from pydoc_data.topics import topics

    if n > len(DOCS):
        raise ValueError(f"{n} documents asked for, {len(DOCS)} long topics listed")
    return [topics[name][:chars] for name in DOCS[:n]]


def engines() -> dict[str, Any]:
    """Every system's engine over one set of weights (the engine's default dtype)."""
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    covey = LLMEngine(EngineConfig())
    off = EngineConfig(enable_prefix_caching=False, chunk_cache="off")
    naive = LLMEngine(off, model=covey.model)
    cached = LLMEngine(EngineConfig(chunk_cache="off"), model=covey.model)
    return {"covey": covey, "covey-naive": naive, "covey-naive-prefix-cache": cached}


async def timed(
    runtime: Any, app: Any, inputs: list[dict[str, Any]], nodes: dict[str, dict[str, list]]
) -> list[float]:
    """Run every input at once; each one's latency in seconds. From each run's trace, per
    node name, `nodes[name]` gathers the node's seconds ("s"), and for each of its engine
    requests its TTFT ("ttft"), its prompt tokens ("prompt") and of those the ones reused
    from the chunk store ("reused")."""

    async def one(kw: dict[str, Any]) -> float:
        start = time.perf_counter()
        result = await runtime.run_traced(app, **kw)
        for name, node in result.trace.nodes.items():
            if node.duration is not None:
                got = nodes.setdefault(name, {"s": [], "ttft": [], "reused": [], "prompt": []})
                got["s"].append(node.duration)
                for req in node.requests:
                    if req.ttft is not None:
                        got["ttft"].append(req.ttft)
                    got["reused"].append(req.reused_tokens)
                    got["prompt"].append(req.prompt_tokens)
        return time.perf_counter() - start

    return list(await asyncio.gather(*(one(kw) for kw in inputs)))


async def bench_system(
    system: str,
    engine: Any,
    index: Any,
    size: dict[str, Any],
    out: list[dict],
    machine: dict[str, dict[str, Any]],
) -> None:
    """Run both workloads on `engine`, appending records to `out`, and `machine[system]`:
    the load around its passes and the thread counts its steps ran on."""
    from covey.apps.advanced_rag import build_advanced_rag_app
    from covey.apps.mapreduce_summary import build_summary_app
    from covey.llm_backend.async_llm import AsyncLLM
    from covey.retrieval.default_corpus import DEFAULT_INDEX_NAME
    from covey.runtime import Runtime

    summary = build_summary_app(piece_chars=size["piece_chars"], max_pieces=2 * size["pieces"])
    rag = build_advanced_rag_app()
    chars = size["piece_chars"] * size["pieces"]
    n_docs = 1 + size["requests"] + size["concurrent"]
    docs = [{"text": d} for d in documents(n_docs, chars)]
    n_q = 1 + size["questions"] + size["concurrent"]
    questions = [{"question": q} for q in QUESTIONS[:n_q]]
    load_before = machine_load()
    decisions_before = engine.stats().thread_decisions
    threads = StepThreads(engine)
    async with AsyncLLM(engine=engine) as llm:
        runtime = Runtime(llm, {DEFAULT_INDEX_NAME: index}, optimize=system == "covey")
        for workload, app, inputs, count in (
            ("mapreduce_summary", summary, docs, size["requests"]),
            ("advanced_rag", rag, questions, size["questions"]),
        ):
            await timed(runtime, app, inputs[:1], {})  # warm-up: pins, allocator, threads
            single, nodes = [], {}
            snap = threads.snapshot()
            for kw in inputs[1 : 1 + count]:
                single += await timed(runtime, app, [kw], nodes)
            single_threads, snap = threads.since(snap), threads.snapshot()
            together = await timed(runtime, app, inputs[1 + count :], {})
            runs = [
                (workload, single, nodes, single_threads),
                (f"{workload}-concurrent", together, None, threads.since(snap)),
            ]
            if workload == "mapreduce_summary":
                params = {"piece_chars": size["piece_chars"], "document_chars": chars}
            else:
                params = {"rewrites": 3, "retrievals": 4, "answer_max_tokens": 64}
                again, again_nodes = [], {}
                snap = threads.snapshot()
                for q in REWORDED[1 : 1 + count]:
                    again += await timed(runtime, app, [{"question": q}], again_nodes)
                runs.append((f"{workload}-reworded", again, again_nodes, threads.since(snap)))
            print(
                f"{workload:>18} {system:>24}: {statistics.mean(single):6.2f} s one at a time, "
                f"{statistics.mean(together):6.2f} s with {len(together)} at once",
                flush=True,
            )
            for name, samples, per_node, used in runs:
                detail = {
                    **params,
                    "chunk_cache": engine.config.chunk_cache,
                    "requests": len(samples),
                    "latencies_s": [round(x, 3) for x in samples],
                    "engine_threads": used,
                }
                if per_node is not None:  # one request at a time: what each node cost
                    detail.update(node_summary(per_node))
                out.append(record(name, system, "latency_s", statistics.mean(samples), detail))
    stats = engine.stats()
    machine[system] = {
        "load_before": load_before,
        "load_after": machine_load(),
        "engine_threads": threads.since(),
        "num_threads_end": stats.num_threads,
        # The process's one governor serves every engine: its changes during these passes.
        "thread_decisions": {
            k: n - decisions_before.get(k, 0)
            for k, n in stats.thread_decisions.items()
            if n > decisions_before.get(k, 0)
        },
    }


def node_summary(nodes: dict[str, dict[str, list]]) -> dict[str, dict[str, float]]:
    """Per node: mean seconds per request; per LLM node (one with engine requests), its
    requests' mean prompt tokens, mean prompt tokens reused from the chunk store, and mean
    TTFT where the engine reports one."""
    llm = {n: got for n, got in nodes.items() if got["prompt"]}

    def means(key: str, digits: int) -> dict[str, float]:
        return {n: round(statistics.mean(g[key]), digits) for n, g in llm.items() if g[key]}

    return {
        "node_mean_s": {n: round(statistics.mean(got["s"]), 3) for n, got in nodes.items()},
        "node_ttft_mean_s": means("ttft", 3),
        "node_prompt_tokens_mean": means("prompt", 1),
        "node_reused_tokens_mean": means("reused", 1),
    }


def prefill_free_ratio(results: list[dict], workload: str) -> float | None:
    """naive's latency over covey's less its answer's mean TTFT: the ratio covey would reach
    if KV reuse made the answer's prefill free (decode and the rewrites stay)."""
    covey = _record(results, workload, "covey")
    ttft = covey["params"].get("node_ttft_mean_s", {}).get(ANSWER_NODE)
    if ttft is None:
        return None
    return _value(results, workload, BASELINE) / (covey["value"] - ttft)


def _record(results: list[dict], workload: str, system: str) -> dict:
    return next(r for r in results if r["workload"] == workload and r["system"] == system)


def _value(results: list[dict], workload: str, system: str) -> float:
    return _record(results, workload, system)["value"]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        values = [_value(results, w, system) for w in workloads]
        xs = [x + (i - (len(SYSTEMS) - 1) / 2) * width for x in range(len(workloads))]
        bars = ax.bar(xs, values, width, label=system)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    top = max(r["value"] for r in results if r["value"] is not None)
    for x, w in enumerate(workloads):
        values = [_value(results, w, s) for s in SYSTEMS]
        ratio = _value(results, w, BASELINE) / _value(results, w, "covey")
        ax.annotate(
            f"{ratio:.2f}x vs naive", (x, max(values) + 0.08 * top), ha="center", weight="bold"
        )
    ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
    ax.set_ylabel("mean end-to-end latency per request (s), lower is better")
    ax.set_title("covey apps: optimizer on vs naive (one call after the other)")
    ax.legend(fontsize=8)
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
    machine: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:
        asyncio.run(bench_system(system, built[system], index, size, results, machine))
    for workload in list(dict.fromkeys(r["workload"] for r in results)):
        covey = _value(results, workload, "covey")
        naive = _value(results, workload, BASELINE) / covey
        cached = _value(results, workload, "covey-naive-prefix-cache") / covey
        target = TARGETS.get(workload.removesuffix("-concurrent").removesuffix("-reworded"))
        print(
            f"{workload}: covey {naive:.2f}x faster than naive (target {target}x), "
            f"{cached:.2f}x faster than naive with the prefix cache"
        )
        if workload.startswith("advanced_rag") and not workload.endswith("-concurrent"):
            bound = prefill_free_ratio(results, workload)
            if bound is not None:
                print(f"{workload}: {bound:.2f}x vs naive if the answer's prefill were free")
                _record(results, workload, "covey")["params"]["prefill_free_ratio"] = round(
                    bound, 3
                )
    engine = built["covey"]
    print(f"covey engine: chunk_cache={engine.config.chunk_cache!r}")
    write_results(args, NAME, results, str(engine.device), engine.model_name, {"systems": machine})
    plot(results, args.plot)


if __name__ == "__main__":
    main()
