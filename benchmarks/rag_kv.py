"""RAG KV-reuse benchmark: time to first token and answer accuracy when the retrieved chunks'
KV is reused (exact RAGCache, blended CacheBlend) against full prefill, covey and llama.cpp.

    python benchmarks/rag_kv.py [--quick] [--json PATH] [--plot PATH]

Workload `rag`: a stream of RAG questions, one at a time, over chunks of the default
corpus' text (Python-docs prose from `pydoc_data`, ~256 tokens each) in which
benchmarks/planted_facts.py planted one made-up fact per chunk. Each prompt is the RAG apps'
format (numbered passages as chunk segments in the chat template) with 5 chunks drawn by
Zipf popularity (a few chunks are read often, most rarely, as retrievals over a corpus are),
in a random order, and asks for the fact of one of them; the answer is scored by exact
match (`accuracy`). The first `prime` requests are served but not measured (a server that
has been up for a while); the measured ones report `ttft_s` (mean), `p99_ttft_s` and the
share of prompt tokens whose KV was reused (`reuse_rate`) or came from the prefix cache.

Systems: `covey` (the engine's defaults), `covey-full` (no reuse: chunk cache and prefix
cache off), `covey-prefix-cache` (prefix cache only), `covey-exact`, `covey-blend-R`
(blend with recompute ratio R; R=0 is plain concatenation of the reused KV) and `llama.cpp`
(llama-cpp-python on the same GGUF, full prefill per request: it keeps only the previous
prompt's KV, which a shuffled chunk order defeats anyway, and it is reset per request).
Workload `rag-standalone-kv`: the same measured requests on blend engines whose chunk KV was
first computed standalone (`warm_chunks`, each chunk alone at position 0) instead of taken
from an earlier request's prefill. Accuracy targets: within 0.02 of `covey-full`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import parse_args, record, write_results

NAME = "rag_kv"
BASELINE = "covey-full"
TARGETS = {"covey-full": 3.0, "llama.cpp": 5.0}  # covey's TTFT at least this many x lower
ACCURACY_MARGIN = 0.02
ZIPF_S = 1.1
MAX_TOKENS = 6


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"chunks": 20, "prime": 6, "requests": 10, "chars": 1000, "ratios": (0.0, 0.15)}
    return {"chunks": 64, "prime": 24, "requests": 64, "chars": 1000, "ratios": (0.0, 0.15, 0.3)}


def systems(ratios: tuple[float, ...]) -> dict[str, dict[str, Any]]:
    """System name -> EngineConfig overrides ({} is the engine's defaults)."""
    out: dict[str, dict[str, Any]] = {
        "covey": {},
        "covey-full": {"chunk_cache": "off", "enable_prefix_caching": False},
        "covey-prefix-cache": {"chunk_cache": "off"},
        "covey-exact": {"chunk_cache": "exact"},
    }
    for r in ratios:
        out[f"covey-blend-{r:g}"] = {"chunk_cache": "blend", "blend_recompute_ratio": r}
    return out


def workload(size: dict[str, Any], tokenizer: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """(prime questions, measured questions, their prompts as segments)."""
    import planted_facts as pf

    chunks = pf.make_chunks(size["chunks"], size["chars"])
    questions = pf.make_questions(chunks, size["prime"] + size["requests"], zipf_s=ZIPF_S)
    prompts = [pf.prompt(tokenizer, q) for q in questions]
    return questions, prompts, chunks


def serve(engine: Any, prompts: list[Any]) -> list[Any]:
    """Each prompt alone, in order; its finished RequestOutput."""
    from covey.llm_backend.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = []
    for p in prompts:
        rid = engine.add_request(p, params)
        outs.extend(engine.run_to_completion([rid]))
    return outs


def summarize(
    name: str,
    system: str,
    outs: list[Any],
    questions: list[Any],
    extra: dict[str, Any],
    results: list[dict],
) -> None:
    import planted_facts as pf

    ttfts = sorted(o.metrics.ttft for o in outs)
    prompt_tokens = sum(o.metrics.num_prompt_tokens for o in outs)
    acc = pf.accuracy([o.text for o in outs], questions)
    params = {
        **pf.describe(questions),
        "max_tokens": MAX_TOKENS,
        "zipf_s": ZIPF_S,
        "prompt_tokens_mean": round(prompt_tokens / len(outs), 1),
        "reuse_rate": round(sum(o.metrics.num_reused_tokens for o in outs) / prompt_tokens, 4),
        "recomputed_tokens": sum(o.metrics.num_recomputed_tokens for o in outs),
        "prefix_cache_rate": round(
            sum(o.metrics.num_cached_tokens for o in outs) / prompt_tokens, 4
        ),
        "ttfts_s": [round(t, 4) for t in ttfts],
        **extra,
    }
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    results.append(record(name, system, "ttft_s", statistics.mean(ttfts), params))
    results.append(record(name, system, "p99_ttft_s", p99, {}))
    results.append(record(name, system, "accuracy", acc, {}))
    print(
        f"{name:>17} {system:>20}: ttft {statistics.mean(ttfts):.3f} s (p99 {p99:.3f}), "
        f"accuracy {acc:.3f}, reused {params['reuse_rate']:.2f}, "
        f"prefix cache {params['prefix_cache_rate']:.2f}",
        flush=True,
    )


def bench_covey(size, model, questions, prompts, results) -> None:
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    prime = size["prime"]
    for system, overrides in systems(size["ratios"]).items():
        engine = LLMEngine(EngineConfig(**overrides), model=model)
        serve(engine, prompts[:prime])
        outs = serve(engine, prompts[prime:])
        extra = {
            "chunk_cache": engine.config.chunk_cache,
            "blend_recompute_ratio": engine.config.blend_recompute_ratio,
            "prefix_cache": engine.config.enable_prefix_caching,
            "primed_requests": prime,
            "chunk_store": engine.stats().chunk_cache,
        }
        summarize("rag", system, outs, questions[prime:], extra, results)
        engine.close()


def bench_standalone(size, model, results) -> None:
    """Blend engines whose chunk KV was first computed alone (warm_chunks), not taken from
    an earlier request's prefill."""
    import planted_facts as pf

    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    ratios = sorted({0.0, EngineConfig().blend_recompute_ratio})
    for r in ratios:
        engine = LLMEngine(
            EngineConfig(chunk_cache="blend", blend_recompute_ratio=r), model=model
        )
        questions, prompts, _ = workload(size, engine.tokenizer)
        measured = questions[size["prime"] :]
        start = time.perf_counter()
        warmed = engine.warm_chunks(
            [s for q in measured for s in pf.chunk_segments(q)], compute=True
        )
        warm_s = time.perf_counter() - start
        outs = serve(engine, prompts[size["prime"] :])
        extra = {"kv_source": "standalone", "warmed_chunks": warmed, "warm_s": round(warm_s, 2)}
        summarize("rag-standalone-kv", f"covey-blend-{r:g}", outs, measured, extra, results)
        engine.close()


def bench_llama_cpp(size, tokenizer, results) -> None:
    import planted_facts as pf

    from covey.runtime.render import to_text

    questions, prompts, _ = workload(size, tokenizer)
    prime = size["prime"]
    names = ("ttft_s", "p99_ttft_s", "accuracy")
    try:
        from llama_cpp import Llama
    except ImportError:
        why = "llama-cpp-python is not installed (make bench installs it)"
        results.extend(record("rag", "llama.cpp", m, None, {}, why) for m in names)
        return
    import torch

    from covey.llm_backend.model_source import resolve_model

    llm = Llama(
        model_path=str(resolve_model(None).path),
        n_ctx=4096,
        n_batch=512,
        n_threads=torch.get_num_threads(),
        verbose=False,
    )
    ttfts, texts = [], []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(to_text(p))  # the same tokens covey's plain text would give
        llm.reset()
        start = time.perf_counter()
        first, out = None, []
        for n, tok in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if first is None:
                first = time.perf_counter() - start
            if tok == llm.token_eos():
                break
            out.append(tok)
            if n == MAX_TOKENS:
                break
        if i >= prime:
            ttfts.append(first)
            texts.append(tokenizer.decode(out))
    ttfts.sort()
    measured = questions[prime:]
    acc = pf.accuracy(texts, measured)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    params = {
        **pf.describe(measured),
        "gguf": "as shipped",
        "ttfts_s": [round(t, 4) for t in ttfts],
    }
    results.append(record("rag", "llama.cpp", "ttft_s", statistics.mean(ttfts), params))
    results.append(record("rag", "llama.cpp", "p99_ttft_s", p99, {}))
    results.append(record("rag", "llama.cpp", "accuracy", acc, {}))
    print(f"{'rag':>17} {'llama.cpp':>20}: ttft {statistics.mean(ttfts):.3f} s, accuracy {acc:.3f}")


def value(results: list[dict], workload: str, system: str, metric: str) -> float | None:
    for r in results:
        if (r["workload"], r["system"], r["metric"]) == (workload, system, metric):
            return r["value"]
    return None


def report(results: list[dict]) -> None:
    covey = value(results, "rag", "covey", "ttft_s")
    full_acc = value(results, "rag", BASELINE, "accuracy")
    for peer, target in TARGETS.items():
        other = value(results, "rag", peer, "ttft_s")
        if covey and other:
            print(f"covey TTFT {other / covey:.2f}x lower than {peer} (target {target}x)")
    for r in results:
        if r["metric"] == "accuracy" and r["value"] is not None and full_acc is not None:
            gap = r["value"] - full_acc
            ok = "ok" if gap >= -ACCURACY_MARGIN else "MISSED"
            where = f"{r['workload']}/{r['system']}"
            print(f"accuracy {where}: {r['value']:.3f} ({gap:+.3f} vs full, {ok})")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (f"{r['system']}" + (" (standalone KV)" if r["workload"] != "rag" else ""), r)
        for r in results
        if r["metric"] == "ttft_s" and r["value"] is not None
    ]
    accs = {
        (r["workload"], r["system"]): r["value"] for r in results if r["metric"] == "accuracy"
    }
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    labels = [name for name, _ in rows]
    bars = ax.barh(labels, [r["value"] for _, r in rows])
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xlabel("mean time to first token (s), lower is better")
    ax.invert_yaxis()
    bars = bx.barh(labels, [accs.get((r["workload"], r["system"])) or 0 for _, r in rows])
    bx.bar_label(bars, fmt="%.2f", fontsize=7)
    bx.set_xlabel("planted-facts accuracy (exact match), higher is better")
    bx.set_xlim(0, 1.05)
    bx.invert_yaxis()
    fig.suptitle("RAG prompts of 5 chunks (Zipf popularity): KV reuse vs full prefill")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NAME, "RAG chunk KV reuse: TTFT and accuracy.", argv)
    from covey.llm_backend.config import EngineConfig
    from covey.llm_backend.llm_engine import LLMEngine

    size = sizes(args.quick)
    engine = LLMEngine(EngineConfig())
    questions, prompts, _ = workload(size, engine.tokenizer)
    serve(engine, prompts[:1])  # warm-up: allocator, threads
    results: list[dict] = []
    bench_covey(size, engine.model, questions, prompts, results)
    bench_standalone(size, engine.model, results)
    bench_llama_cpp(size, engine.tokenizer, results)
    report(results)
    print(f"covey's default chunk_cache: {engine.config.chunk_cache!r}")
    write_results(args, NAME, results, str(engine.device), engine.model_name)
    plot(results, args.plot)


if __name__ == "__main__":
    main()
